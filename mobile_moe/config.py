"""Frozen configuration dataclasses shared by every layer of the engine."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from mobile_moe.errors import InvalidParameter

EXPERT_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32", "int8", "int4", "mxfp4")
DENSE_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32", "int8", "int4")  # attention, shared experts, dense MLPs, LM head

PolicyName = Literal["big", "little", "mobile", "exact"]
LittleWeights = Literal["native", "rescale"]
PrefillMode = Literal["big", "little"]
Criterion = Literal["max_prob", "entropy", "margin", "learned"]
POLICIES: tuple[str, ...] = ("big", "little", "mobile", "exact")
DRAFT_MAX = 4  # exact: little tokens drafted before big verifies them, unless a policy sets it
CRITERIA: tuple[str, ...] = ("max_prob", "entropy", "margin", "learned")
LEARNED_VERSION = 1
DEFAULT_PREFIX_CACHE_GB = 1.0  # prefix reuse on: attention-only models hold nothing beyond their KV caches, a hybrid's snapshots are small


@dataclass(frozen=True)
class LearnedImportance:
    """A fitted logistic model of P(little's token differs from big's) over named step signals (docs/design.md §1).

    confidence = 1 - sigmoid(bias + sum_i weights[i] * (signal_i - mean[i]) / scale[i]).
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    version: int = LEARNED_VERSION

    def __post_init__(self) -> None:
        n = len(self.features)
        if n == 0 or not (len(self.mean) == len(self.scale) == len(self.weights) == n):
            raise InvalidParameter(f"learned importance needs one mean, scale and weight per feature ({n} features)")
        values = (*self.mean, *self.scale, *self.weights, self.bias)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or min(self.scale) <= 0:
            raise InvalidParameter("learned importance weights must be finite numbers and its scales > 0")
        if self.version != LEARNED_VERSION:
            raise InvalidParameter(f"learned importance version {self.version} is not supported (this engine reads {LEARNED_VERSION}); recalibrate")

    def to_dict(self) -> dict:
        """JSON-ready (stored in mobile_moe.json)."""
        return {
            "version": self.version,
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
        }

    @classmethod
    def from_dict(cls, data: object) -> LearnedImportance:
        """Parse what to_dict wrote; anything else is an InvalidParameter naming the problem."""
        if not isinstance(data, dict):
            raise InvalidParameter("learned importance must be a JSON object")
        try:
            return cls(
                features=tuple(str(f) for f in data["features"]),
                mean=tuple(data["mean"]),
                scale=tuple(data["scale"]),
                weights=tuple(data["weights"]),
                bias=data["bias"],
                version=data.get("version", LEARNED_VERSION),
            )
        except (KeyError, TypeError) as e:
            raise InvalidParameter(f"learned importance is malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn from logits and when generation stops."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    logprobs: int | None = None  # record each emitted token's log-probability and this many most probable alternatives (0-20)
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time it was generated (-2 to 2, as OpenAI's)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once (-2 to 2)
    json_schema: dict | None = None  # constrained decoding (the [structured] extra): the reply is JSON valid under this schema
    grammar: object | None = field(default=None, repr=False, compare=False)  # json_schema compiled (by LLM.prepare; engine/grammar.py)

    def __post_init__(self) -> None:
        self._check_processing()
        if self.max_new_tokens < 1:
            raise InvalidParameter(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameter(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise InvalidParameter(f"seed must be an integer in [0, 2**64), got {self.seed}")

    def _check_processing(self) -> None:
        """Ranges of the fields that change the logits before sampling."""
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidParameter(f"logprobs must be in [0, 20], got {self.logprobs}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise InvalidParameter(f"{name} must be in [-2, 2], got {value}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise InvalidParameter(f"json_schema must be a JSON schema (a dict), got {type(self.json_schema).__name__}")


@dataclass(frozen=True)
class PolicyConfig:
    """Which experts each pass uses (docs/design.md §1)."""

    name: PolicyName = "big"
    tau: float | None = None  # None: the model's calibrated tau, else 0.9 (resolved by the engine)
    criterion: Criterion | None = None  # None: the model's calibrated criterion, else max_prob
    little_weights: LittleWeights = "native"
    little_k: int | None = None  # experts per token of the little model, 1 <= n < top-k (None: what the model's calibration
    # was made with, else ceil(top-k / 2), the paper's half)
    prefill: PrefillMode | None = None  # None: little for `little`, big otherwise
    prefetch_on_fallback: bool = True
    lookahead: bool = False  # apply layer l+1's router to layer l's input to start its loads early
    forced_fallback_rate: float | None = None  # benchmarks on random weights: fall back at this rate, evenly spaced
    learned: LearnedImportance | None = None  # criterion `learned`: the fitted predictor (from the calibration)
    layer_adaptive: float | None = None  # little decode: a layer runs all top-k when the dropped half carries more than this share of the weight
    cache_prior: float | None = None  # little decode: a resident dropped expert replaces a kept non-resident one scoring at most this factor more
    kv_repair: int | None = None  # on a fallback, big also recomputes up to this many earlier positions whose KV entries little
    # wrote (None: what the model's calibration was made with, else 0)
    rollback: bool | None = None  # greedy, with kv_repair: a repairing fallback also checks little's tokens at the repaired
    # positions and takes back those from the first big disagrees with (None: as the calibration was made, else off)
    partial_fallback: float | None = None  # on a fallback, big's pass starts at the first MoE layer where little dropped more
    # than this share of the routing weight (else at the layer it dropped most in); the layers before keep little's output
    record_signals: bool = False  # measure every importance signal at each step (calibration data), whatever the criterion
    draft_max: int | None = None  # exact: little tokens drafted before big verifies them (None: DRAFT_MAX)

    def __post_init__(self) -> None:
        if self.forced_fallback_rate is not None and not (0.0 <= self.forced_fallback_rate <= 1.0):
            raise InvalidParameter(f"fallback rate must be in [0, 1], got {self.forced_fallback_rate}")
        if self.name not in POLICIES:
            raise InvalidParameter(f"policy must be one of {', '.join(POLICIES)}, got {self.name!r}")
        if self.tau is not None and (not math.isfinite(self.tau) or self.tau < 0):
            raise InvalidParameter(f"tau must be a finite number >= 0, got {self.tau}")
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise InvalidParameter(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.little_weights not in ("native", "rescale"):
            raise InvalidParameter(f"little_weights must be native or rescale, got {self.little_weights!r}")
        if self.little_k is not None and (isinstance(self.little_k, bool) or not isinstance(self.little_k, int) or self.little_k < 1):
            raise InvalidParameter(f"little_k must be an integer >= 1, got {self.little_k!r}")
        if self.layer_adaptive is not None and not (0.0 <= self.layer_adaptive <= 1.0):
            raise InvalidParameter(f"layer-adaptive threshold must be in [0, 1], got {self.layer_adaptive}")
        if self.partial_fallback is not None and not (0.0 <= self.partial_fallback <= 1.0):
            raise InvalidParameter(f"partial-fallback share must be in [0, 1], got {self.partial_fallback}")
        if self.cache_prior is not None and not (math.isfinite(self.cache_prior) and self.cache_prior >= 1.0):
            raise InvalidParameter(f"cache-prior factor must be a finite number >= 1, got {self.cache_prior}")
        self._check_repair()

    def _check_repair(self) -> None:
        """The repair, rollback, prefill and draft fields."""
        if self.kv_repair is not None and (not isinstance(self.kv_repair, int) or self.kv_repair < 0):
            raise InvalidParameter(f"kv repair must be an integer >= 0, got {self.kv_repair!r}")
        if self.rollback not in (None, True, False):
            raise InvalidParameter(f"rollback must be true or false, got {self.rollback!r}")
        if self.rollback and self.kv_repair == 0:
            raise InvalidParameter("rollback checks the positions a fallback repairs: it needs kv repair >= 1 (--kv-repair N)")
        if self.prefill not in (None, "big", "little"):
            raise InvalidParameter(f"prefill must be big or little, got {self.prefill!r}")
        if self.draft_max is not None and (isinstance(self.draft_max, bool) or not isinstance(self.draft_max, int) or not 1 <= self.draft_max <= 64):
            raise InvalidParameter(f"draft max must be an integer in [1, 64], got {self.draft_max!r}")

    @property
    def rollback_window(self) -> int:
        """Positions a repairing fallback checks and may take back: the repair window when rollback is on (exact: its
        draft), else 0."""
        if self.name == "exact":
            return self.draft_window
        return (self.kv_repair or 0) if self.rollback else 0

    @property
    def draft_window(self) -> int:
        """Exact: little tokens drafted before big verifies them."""
        return DRAFT_MAX if self.draft_max is None else self.draft_max

    @property
    def prefill_mode(self) -> PrefillMode:
        """Experts used for the prompt: explicit knob, else little only for the `little` policy."""
        if self.prefill is not None:
            return self.prefill
        return "little" if self.name == "little" else "big"


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Size of the device expert cache: a slot count, a memory budget, or neither (automatic)."""

    slots: int | None = None
    gpu_memory_gb: float | None = None
    eviction: Literal["lru", "lfu"] = "lru"
    host_memory_gb: float | None = None  # with an on-disk store: host RAM for experts (on CPU, the compute cache)

    def __post_init__(self) -> None:
        if self.slots is not None and self.gpu_memory_gb is not None:
            raise InvalidParameter("give either an expert cache size or a GPU memory budget, not both")
        if self.gpu_memory_gb is not None and not (self.gpu_memory_gb > 0 and math.isfinite(self.gpu_memory_gb)):
            raise InvalidParameter(f"gpu memory budget must be > 0 GB, got {self.gpu_memory_gb}")
        if self.host_memory_gb is not None and not (self.host_memory_gb > 0 and math.isfinite(self.host_memory_gb)):
            raise InvalidParameter(f"host memory budget must be > 0 GB, got {self.host_memory_gb}")
        if self.eviction not in ("lru", "lfu"):
            raise InvalidParameter(f"eviction must be lru or lfu, got {self.eviction!r}")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Where and in which precision the engine runs."""

    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache: CacheConfig = CacheConfig()
    progress: bool = True
    max_context: int = 4096  # longest prompt + generation served; a memory budget reserves its KV cache
    expert_dtype: str = "auto"  # auto | bf16 | fp16 | fp32 | int8 | int4: how routed experts are stored and moved
    group_size: int | None = None  # int4 only: weights per (scale, zero) group along the input dim
    dense_dtype: str = "auto"  # auto | bf16 | fp16 | fp32 | int8 | int4: how dense linears are stored and computed (loading/dense.py)
    fused_kernels: bool = True  # quantized experts through fused weight-only kernels where the device has them (experts/kernels.py)
    compile: bool | None = None  # True: torch.compile'd layer segments (CPU; each start's first request pays seconds of warm-up);
    # None: a CPU model under 200M parameters decodes through layers compiled ahead of time once per machine (engine/aot.py); False: eager
    cuda_graphs: bool = False  # CUDA: decode passes with every expert resident replayed from captured CUDA graphs (engine/graphs.py)
    offload_dir: str | None = None  # an on-disk expert store (built there on first use): experts are read from it on demand
    direct_io: bool = True  # read the store with O_DIRECT where the file system allows it (False: buffered + fadvise)
    max_batch: int = 1  # sequences decoded together (LLM.generate with many prompts, the server); the memory plan reserves their KV
    batch_little: Literal["auto", "always"] = "auto"  # at batch >= 2, mobile rows decode little first only where measured cheaper (auto)
    prefix_cache_gb: float = DEFAULT_PREFIX_CACHE_GB  # prefix reuse: held sequences keep their prompts for the next requests (0: off);
    # the KV entries are the held caches' own, this bounds the recurrent-state snapshots kept beside them

    def __post_init__(self) -> None:
        if self.max_context < 2:
            raise InvalidParameter(f"max context must be >= 2 tokens, got {self.max_context}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise InvalidParameter(f"device must be cpu or cuda, got {self.device!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise InvalidParameter(f"expert dtype must be one of {', '.join(EXPERT_DTYPES)}, got {self.expert_dtype!r}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise InvalidParameter(f"dense dtype must be one of {', '.join(DENSE_DTYPES)}, got {self.dense_dtype!r}")
        if self.group_size is not None and "int4" not in (self.expert_dtype, self.dense_dtype):
            raise InvalidParameter(f"--group-size applies to int4 experts only (or int4 dense weights), not {self.expert_dtype}")
        if self.cache.host_memory_gb is not None and self.offload_dir is None:
            raise InvalidParameter("--host-memory bounds the experts held in RAM when they live on disk: give --offload-dir too")
        if not (math.isfinite(self.prefix_cache_gb) and self.prefix_cache_gb >= 0):
            raise InvalidParameter(f"--prefix-cache must be a finite number of GB >= 0, got {self.prefix_cache_gb}")
        if self.max_batch < 1:
            raise InvalidParameter(f"max batch must be >= 1, got {self.max_batch}")
        if self.batch_little not in ("auto", "always"):
            raise InvalidParameter(f"batch little must be auto or always, got {self.batch_little!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidParameter(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


POLICY_KNOBS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {  # the policies each knob of PolicyConfig applies to
        "tau": ("mobile", "exact"),
        "criterion": ("mobile", "exact"),
        "kv_repair": ("mobile",),  # exact repairs and checks its whole draft
        "rollback": ("mobile",),
        "partial_fallback": ("mobile",),
        "little_k": ("little", "mobile", "exact"),
        "layer_adaptive": ("little", "mobile", "exact"),
        "cache_prior": ("little", "mobile", "exact"),
        "draft_max": ("exact",),
    }
)


def check_options(policy: PolicyConfig, temperature: float = 0.0, name: Callable[[str], str] = str) -> None:
    """The rules a user's options follow, one for every front end (generate, chat, eval, bench, the server): tau in [0, 1]
    (every criterion's confidence is; PolicyConfig itself takes a larger tau, always falling back, for tests), a knob
    set for a policy it does not apply to, or rollback with sampling (exact mode samples by speculative sampling), is an
    InvalidParameter naming it (`name` spells a field as the caller's user knows it: a command-line flag, or the request's
    JSON field)."""
    if policy.tau is not None and not 0.0 <= policy.tau <= 1.0:
        raise InvalidParameter(f"{name('tau')} must be in [0, 1] (a confidence), got {policy.tau:g}")
    for knob, policies in POLICY_KNOBS.items():
        value = getattr(policy, knob)
        if value is not None and value is not False and policy.name not in policies:
            listed = ", ".join(policies[:-1]) + " or " + policies[-1] if len(policies) > 1 else policies[0]
            raise InvalidParameter(f"{name(knob)} applies to {name('policy')} {listed} only, not {policy.name}")
    if policy.rollback and temperature > 0:
        raise InvalidParameter(f"{name('rollback')} checks little's tokens against big's greedy choice: it needs {name('temperature')} 0, got {temperature:g}")


def flag_name(field: str) -> str:
    """A PolicyConfig / SamplingParams field as its command-line flag (`kv_repair` -> `--kv-repair`)."""
    return "--" + field.replace("_", "-")
