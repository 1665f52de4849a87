"""The public Python API: `LLM(model_dir).generate(prompt, sampling, policy)`."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar, overload

import torch

from mobile_moe.config import DEFAULT_PREFIX_CACHE_GB, CacheConfig, EngineConfig, PolicyConfig, SamplingParams
from mobile_moe.engine.aot import AUTO_MAX_PARAMS
from mobile_moe.engine.batch import BatchDecoder
from mobile_moe.engine.calibration import CALIBRATION_FILE, DEMO_MODEL, read_calibration, resolve_policy
from mobile_moe.engine.generate import GenerationResult, TokenCallback, generate
from mobile_moe.engine.grammar import Grammars
from mobile_moe.engine.passes import PassSpec
from mobile_moe.engine.prefix import PrefixIndex
from mobile_moe.engine.processors import check_processing
from mobile_moe.engine.runner import Runner, RunnerOptions
from mobile_moe.errors import CheckpointError, InvalidParameter, PromptTooLong
from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.disk import DiskStore
from mobile_moe.experts.kernels import TiledFormat
from mobile_moe.experts.native import cache_dir as aot_cache_dir
from mobile_moe.experts.reader import ReadPool
from mobile_moe.experts.trace import Trace
from mobile_moe.experts.transfer import TransferEngine, cuda_capture
from mobile_moe.layers.kv_cache import KVCache
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.loading.budget import dequant_scratch_bytes, host_plan_for_config, host_tier_slots, plan_slots
from mobile_moe.loading.checkpoint import read_config
from mobile_moe.loading.hub import ConfigCheck, resolve_model
from mobile_moe.loading.loader import LoadedModel, check_fits_in_ram, load, model_params
from mobile_moe.policy.governor import LittleGovernor
from mobile_moe.policy.policies import Policy

log = logging.getLogger("mobile_moe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
T = TypeVar("T")
Many = T | list[T] | None  # one value for every prompt, one per prompt, or the default
RowCallback = Callable[[int, int], bool]  # (prompt index, token) -> go on


def _each(value: Many[T], n: int, what: str) -> list:
    """One value per prompt from a single value, a list of n, or None."""
    if isinstance(value, list):
        if len(value) != n:
            raise InvalidParameter(f"{len(value)} {what} values for {n} prompts")
        return value
    return [value] * n


def resolve_device(name: str) -> torch.device:
    """A torch device, checking that CUDA exists when asked for."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter("device cuda was requested but CUDA is not available on this machine")
    return device


class LLM:
    """An offloaded MoE model: dense weights on the device, experts in host memory behind a bounded cache.

    Safe to share between threads: calls that run the model (`generate`, `logits`, `reset_cache`) hold one
    lock, so concurrent calls run one after another, each exactly as it would alone. A call that fails
    (e.g. a cache too small for a step) leaves the object usable.
    """

    def __init__(self, model: str | Path | LoadedModel | None = None, config: EngineConfig | None = None, options: RunnerOptions | None = None) -> None:
        """Load `model`: a checkpoint directory, "ORG/NAME[@REVISION]" on the hub, a loaded model, or None for the bundled demo model."""
        started = time.perf_counter()
        self._lock = threading.RLock()
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        if isinstance(model, LoadedModel):
            self.loaded = model
        else:
            offload = None if self.config.offload_dir is None else Path(self.config.offload_dir)
            model = DEMO_MODEL if model is None else model
            model = resolve_model(model, self.config.progress, ram_check(self.config))  # a directory, or "ORG/NAME[@REVISION]" from the hub
            if offload is not None:  # before the first minute of a model larger than RAM: what it will hold, or why it cannot run
                announce_host_plan(model, self.config)
            self.loaded = load(
                model,
                self.device,
                self.config.dtype,
                self.config.progress,
                self.config.expert_dtype,
                self.config.group_size,
                self.config.fused_kernels,
                offload,
                self.config.direct_io,
                self.config.dense_dtype,
            )
        self.path = self.loaded.path
        self.info = self.loaded.model.info
        self.max_context = min(self.info.max_context, self.config.max_context)
        store = self.loaded.store
        self.reader = ReadPool(store) if isinstance(store, DiskStore) else None  # the disk tier's readers, shared by every cache
        cfg = self.config.cache
        # three tiers (disk -> host -> compute cache) on CUDA, and on CPU when both caches are sized (the CUDA data path, testable here)
        self.host_slots = (
            host_tier_slots(cfg, store, self.info.top_k)
            if self.reader is not None and (self.device.type == "cuda" or (cfg.slots is not None and cfg.host_memory_gb is not None))
            else None
        )
        slot_bytes = store.record_bytes if self.reader is not None and self.host_slots is None else store.expert_bytes
        self.plan = plan_slots(
            self.config.cache,
            self.loaded.model,
            slot_bytes,
            store.total_experts,
            self.device,
            self.loaded.dtype,
            self.config.max_context,
            dequant_scratch_bytes(store.layout, self.loaded.dtype),
            self.config.max_batch,
            self.config.prefix_cache_gb,
        )
        self.planned_slots = self.plan.slots
        if self.config.compile and self.device.type != "cpu":
            log.warning("--compile is measured and tested on CPU only; decoding on %s runs eagerly", self.device)
        if self.config.cuda_graphs and self.device.type != "cuda":
            log.warning("--cuda-graphs needs a CUDA device; decoding on %s runs without graphs", self.device)
        # how passes run (`RunnerOptions`): by default what the device calls for, CUDA graphs with `--cuda-graphs` on CUDA
        graphs = self.config.cuda_graphs and self.device.type == "cuda"
        self.options = options if options is not None else RunnerOptions(graph_capture=cuda_capture(self.device) if graphs else None)
        # by default on CPU, compiled once per machine: small models (per-op overhead dominates), and any whose experts are in
        # a tiled layout (the compiled layer is the glue around the project's kernels, ~0.5 ms a layer at OLMoE widths)
        glue_bound = model_params(self.loaded.model) < AUTO_MAX_PARAMS or isinstance(store.format, TiledFormat)
        self.compiled_dir = aot_cache_dir() if self.config.compile is None and self.device.type == "cpu" and glue_bound else None
        self.governor = LittleGovernor(self.config.batch_little == "auto")  # its step costs persist across batches
        self.reset_cache(self.planned_slots)
        self.tokenizer = _load_tokenizer(self.path) if self.path.is_dir() else None
        self.grammars = Grammars(self.tokenizer, self.loaded.model.vocab_size, self.eos_token_ids)  # compiles on first use
        self.calibration = read_calibration(self.path)  # not re-read per request
        fitted, running = self.calibration.get("dtype"), str(self.loaded.dtype).removeprefix("torch.")
        if fitted is not None and fitted != running:
            log.warning(
                "the calibration in %s was fitted in %s; running in %s, its tau may give another fallback rate (recalibrate with "
                "`mobile-moe calibrate --dtype %s`)",
                CALIBRATION_FILE,
                fitted,
                running,
                running,
            )
        self.load_s = time.perf_counter() - started  # reported in each request's stats, as llama.cpp's timings do

    @property
    def compiles(self) -> bool:
        """Whether decode runs compiled layers (`EngineConfig.compile`, or by default the ahead-of-time compiled ones of
        `compiled_dir`; CPU only until a GPU run measures CUDA)."""
        return self.device.type == "cpu" and (self.config.compile is True or self.compiled_dir is not None)

    def reset_cache(self, slots: int, trace: Trace | None = None, graphs: bool = True) -> None:
        """Start over with an empty expert cache of `slots` slots (benchmarks compare systems from the same state); without
        `graphs`, decoding runs eagerly even where the options capture graphs."""
        with self._lock:
            if getattr(self, "cache", None) is not None:
                self.cache.close()  # copies and reads still writing into the old pools finish first
            self.cache = self.runner = None  # free the old slot pool before the new one is made, rather than hold two
            eviction, store, host = self.config.cache.eviction, self.loaded.store, None
            if self.host_slots is not None:  # the pinned host tier, filled by the readers
                host = ExpertCache(
                    store,
                    self.host_slots,
                    torch.device("cpu"),
                    TransferEngine(torch.device("cpu")),
                    eviction,
                    reader=self.reader,
                    pin_pool=self.device.type == "cuda",
                )
            self.cache = ExpertCache(
                store, slots, self.device, TransferEngine(self.device), eviction, trace=trace, reader=self.reader if host is None else None, host=host
            )
            options = self.options if graphs else self.options.without_graphs()
            if self.compiled_dir is not None:
                options = replace(options, compiled_dir=self.compiled_dir, progress=self.config.progress)
            prefixes = PrefixIndex(self.config.prefix_cache_gb > 0, self.plan.prefix_snapshots)  # a new runner holds no prefix
            self.runner = Runner(self.loaded.model, self.cache, compile_layers=self.compiles, options=options, prefixes=prefixes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end generation."""
        ids = set(self.info.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def encode(self, text: str) -> list[int]:
        """Token ids of a text (needs the checkpoint's tokenizer)."""
        if self.tokenizer is None:
            raise InvalidParameter(f"{self.path} has no tokenizer; pass token ids (--prompt-ids) instead of text")
        check_utf8(text, "the prompt")
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))  # long texts are fine: we check length ourselves

    def decode(self, ids: list[int]) -> str | None:
        """Text of token ids, or None without a tokenizer."""
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    @overload
    def generate(
        self, prompt: str | list[int], sampling: SamplingParams | None = None, policy: PolicyConfig | None = None, on_token: TokenCallback | None = None
    ) -> GenerationResult: ...

    @overload
    def generate(
        self, prompt: list[str] | list[list[int]], sampling: Many[SamplingParams] = None, policy: Many[PolicyConfig] = None, on_token: RowCallback | None = None
    ) -> list[GenerationResult]: ...

    def generate(self, prompt, sampling=None, policy=None, on_token=None):
        """Generate a continuation of a text or of token ids under a policy (big / little / mobile); given a list of
        prompts (texts or id lists), decode them together (see `generate_many`) and return one result per prompt.

        `on_token` sees each token as it is emitted (EOS excluded); returning False stops after that token
        (finish_reason "cancelled"): how a streaming client that went away frees the engine.
        """
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return self.generate_many(prompt, sampling, policy, on_token)
        started = time.perf_counter()
        ids, sampling, policy = self.prepare(prompt, sampling, policy)
        with self._lock:
            result = generate(self.runner, ids, sampling, Policy(policy), self.eos_token_ids, on_token)
        result.text = self.decode(result.token_ids)
        self._time(result, started)
        result.stats.dense_path = self.loaded.dense_path
        return result

    def generate_many(
        self,
        prompts: list[str] | list[list[int]],
        sampling: Many[SamplingParams] = None,
        policy: Many[PolicyConfig] = None,
        on_token: RowCallback | None = None,
    ) -> list[GenerationResult]:
        """Decode many prompts together, up to `EngineConfig.max_batch` at a time (the rest join as rows finish); each
        prompt has its own sampling parameters, policy and stop conditions (a single value applies to all).
        `on_token(i, token)` sees prompt i's tokens; returning False stops that prompt alone."""
        started, n = time.perf_counter(), len(prompts)
        samplings, policies = _each(sampling, n, "sampling"), _each(policy, n, "policy")
        prepared = [self.prepare(p, s, pol) for p, s, pol in zip(prompts, samplings, policies)]
        rows = min(n, self.config.max_batch)
        if rows < n:
            log.info("decoding %d prompts %d at a time (EngineConfig.max_batch)", n, rows)
        results: list[GenerationResult | None] = [None] * n
        with self._lock:
            batch = BatchDecoder(self.runner, rows, max(len(ids) + s.max_new_tokens for ids, s, _ in prepared), self.eos_token_ids, self.governor)
            waiting = list(range(n))
            while waiting or batch.rows:
                while waiting and batch.room:
                    i = waiting.pop(0)
                    ids, s, pol = prepared[i]
                    batch.add(ids, s, Policy(pol), None if on_token is None else (lambda t, i=i: on_token(i, t)), tag=i)
                for row in batch.step():
                    results[row.tag] = row.result
        for result in results:
            assert result is not None
            result.text = self.decode(result.token_ids)
            self._time(result, started)
            result.stats.dense_path = self.loaded.dense_path
        return results  # type: ignore[return-value]

    def _time(self, result: GenerationResult, started: float) -> None:
        """Fill the stats' threads, load time and the request's wall time (since `started`)."""
        result.stats.threads, result.stats.load_s = torch.get_num_threads(), self.load_s
        result.stats.total_s = time.perf_counter() - started

    def prepare(self, prompt: str | list[int], sampling: SamplingParams | None, policy: PolicyConfig | None) -> tuple[list[int], SamplingParams, PolicyConfig]:
        """(checked prompt ids, sampling with max_new_tokens cut to the context's room, resolved policy) of one request."""
        sampling, policy = sampling or SamplingParams(), self.resolve_policy(policy or PolicyConfig())
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids)
        check_processing(sampling, policy)
        if sampling.json_schema is not None and sampling.grammar is None:
            sampling = replace(sampling, grammar=self.grammars.compile(sampling.json_schema))
        room = self.max_context - len(ids)
        if sampling.max_new_tokens > room:
            log.warning(f"{len(ids)} prompt tokens leave room for {room} of the {sampling.max_new_tokens} new tokens asked (context {self.max_context})")
            sampling = replace(sampling, max_new_tokens=room)
        return ids, sampling, policy

    def batch_decoder(self, max_rows: int, max_len: int | None = None) -> BatchDecoder:
        """A long-lived batch of up to max_rows sequences of up to max_len positions (default: the context; the server's
        engine worker); step it while holding `lock`."""
        return BatchDecoder(self.runner, max_rows, max_len or self.max_context, self.eos_token_ids, self.governor)

    @property
    def lock(self) -> threading.RLock:
        """The lock every model-running call holds."""
        return self._lock

    def resolve_policy(self, policy: PolicyConfig) -> PolicyConfig:
        """Unset criterion and tau from this model's calibration (mobile_moe.json, read once at load), else max_prob and 0.9;
        a little_k this model cannot take is an InvalidParameter."""
        resolved = resolve_policy(policy, self.calibration)
        self._check_little_k(resolved.little_k)
        fitted = self.runner.little_k_of(self.calibration.get("little_k"))
        if policy.little_k is not None and policy.little_k != fitted and policy.tau is None and resolved.name in ("mobile", "exact"):
            log.warning(
                "the calibration in %s was fitted with little_k %d; running with %d, its tau may give another fallback rate "
                "(recalibrate with `mobile-moe calibrate --little-k %d`)",
                CALIBRATION_FILE,
                fitted,
                policy.little_k,
                policy.little_k,
            )
        return resolved

    def little_k(self, policy: PolicyConfig) -> int:
        """Experts per token of the policy's little model on this model."""
        return self.runner.little_k_of(policy.little_k)

    def _check_little_k(self, little_k: int | None) -> None:
        """A one-line InvalidParameter unless little_k is None or in [1, top-k): little runs fewer experts than big."""
        if little_k is not None and not 1 <= little_k < self.info.top_k:
            raise InvalidParameter(f"little_k must be in [1, {self.info.top_k - 1}] (below this model's top-k {self.info.top_k}), got {little_k}")

    def logits(self, ids: list[int], mode: str = "big", little_k: int | None = None) -> torch.Tensor:
        """Teacher-forced logits [T, V] of a token sequence with big or little experts (little_k of them; None: half of top-k)."""
        self._check_prompt(ids)
        with self._lock:
            kv = self._teacher_forced(len(ids), little_k)
            return self.runner.forward(self.runner.ids(ids), kv, PassSpec(ExpertMode(mode), little_k), all_logits=True)

    def routed_logits(self, ids: list[int], mode: str = "little", little_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits [T, V] and each position's raw gate values of every MoE layer [T, L, k] (the router
        signals a decode step of that position would see)."""
        self._check_prompt(ids)
        with self._lock:
            kv = self._teacher_forced(len(ids), little_k)
            return self.runner.routed_logits(self.runner.ids(ids), kv, PassSpec(ExpertMode(mode), little_k))

    def _teacher_forced(self, length: int, little_k: int | None) -> KVCache:
        """A fresh KV cache of length, once little_k (None: the model's default) is checked."""
        self._check_little_k(little_k)
        return self.runner.new_kv(length)

    def check_prompt(self, ids: list[int]) -> None:
        """Raise a one-line error for an empty, out-of-vocabulary or over-long prompt."""
        self._check_prompt(ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the checkpoint's chat template, ending where the assistant answers."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameter(f"{self.path} has no chat template; use completions with a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def _check_prompt(self, ids: list[int]) -> None:
        """Reject empty, out-of-vocabulary or over-long prompts."""
        if not ids:
            raise InvalidParameter("the prompt is empty")
        vocab = self.loaded.model.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidParameter(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_context:
            limit = (
                f"the model's context of {self.info.max_context} tokens"
                if self.info.max_context <= self.config.max_context
                else f"--max-context {self.config.max_context} (the model's own context is {self.info.max_context} tokens)"
            )
            raise PromptTooLong(f"prompt has {len(ids)} tokens; it must be shorter than {limit}")


def check_utf8(text: str, what: str) -> None:
    """A one-line InvalidParameter naming the first character of `text` that is not Unicode text: a byte that was not UTF-8
    (carried as a surrogate escape, as Python reads command lines and surrogateescape streams) or a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise InvalidParameter(f"{what} is not valid UTF-8 text: {bad} at character {e.start}") from None


def ram_check(config: EngineConfig) -> ConfigCheck | None:
    """What a hub download checks from config.json before fetching weights: that the model, loaded under `config`, fits
    in RAM (with an on-disk expert store: that the dense weights, the KV cache and the host tier do)."""
    if config.offload_dir is not None:
        return lambda directory: host_plan_for_config(read_config(directory), config).check()
    device = resolve_device(config.device)
    return lambda directory: check_fits_in_ram(directory, device, config.dtype, config.expert_dtype, config.group_size)


def announce_host_plan(directory: Path, config: EngineConfig) -> None:
    """Print (with progress on) what a load with an on-disk store will hold in RAM, then refuse in one line one that cannot run."""
    if not (directory / "config.json").is_file():
        return  # the loader names what is missing
    plan = host_plan_for_config(read_config(directory), config)
    if config.progress:
        print(f"mobile-moe: {plan.describe()}", file=sys.stderr, flush=True)
    plan.check()


PARTIAL_CHARACTER = "\ufffd"  # what a byte-level tokenizer decodes a character to while some of its bytes are still to come


def settled(text: str) -> str:
    """A streamed reply's text without its trailing partial characters, which the next tokens may still turn into others."""
    return text.rstrip(PARTIAL_CHARACTER)


def _load_tokenizer(path: Path):  # -> PreTrainedTokenizerBase | None
    """The checkpoint's tokenizer when it ships one."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {' '.join(str(e).split())}") from None


def engine_config(  # noqa: PLR0913 - every engine setting, by keyword
    device: str = "cpu",
    dtype: str = "auto",
    expert_cache: int | None = None,
    gpu_memory: float | None = None,
    eviction: str = "lru",
    progress: bool = True,
    max_context: int = 4096,
    expert_dtype: str = "auto",
    group_size: int | None = None,
    fused_kernels: bool = True,
    compile: bool | None = None,
    offload_dir: str | None = None,
    host_memory: float | None = None,
    direct_io: bool = True,
    max_batch: int = 1,
    batch_little: str = "auto",
    cuda_graphs: bool = False,
    dense_dtype: str = "auto",
    prefix_cache: float = DEFAULT_PREFIX_CACHE_GB,
) -> EngineConfig:
    """EngineConfig from flat keyword arguments (what the CLI and API users pass)."""
    return EngineConfig(
        device=device,
        dtype=dtype,
        cache=CacheConfig(slots=expert_cache, gpu_memory_gb=gpu_memory, eviction=eviction, host_memory_gb=host_memory),
        progress=progress,
        max_context=max_context,
        expert_dtype=expert_dtype,
        group_size=group_size,
        fused_kernels=fused_kernels,
        compile=compile,
        offload_dir=offload_dir,
        direct_io=direct_io,
        max_batch=max_batch,
        batch_little=batch_little,
        cuda_graphs=cuda_graphs,  # type: ignore[arg-type]
        dense_dtype=dense_dtype,
        prefix_cache_gb=prefix_cache,
    )
