"""What a newcomer runs first: transformers' own generate, whole on the device or offloaded with accelerate's device_map at the same budget."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import transformers as T

from mobile_moe.loading.loader import LoadedModel

WARMUP_TOKENS = 2  # one short untimed generate: kernels, allocator, accelerate's hooks


@dataclass(frozen=True)
class BaselineResult:
    """Timings of transformers' own generate."""

    decode_tok_s: float
    ttft_s: float
    placement: str
    decode_s: float = 0.0  # summed over prompts: last token's clock minus first token's clock
    steps: int = 0  # decode intervals timed: prompts x (new_tokens - 1)
    token_ids: list[list[int]] = field(default_factory=list)  # generated ids per prompt


class TokenClock(T.LogitsProcessor):
    """Records a timestamp each time generate has the logits of a new token (after a device sync on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Stamp the token; the scores pass through unchanged."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def clock_timings(start: float, stamps: list[float]) -> tuple[float, float, int]:
    """(time to first token, decode seconds, decode intervals) of one generate from its start and token stamps."""
    if not stamps:
        raise ValueError("generate produced no tokens")
    return stamps[0] - start, stamps[-1] - stamps[0], len(stamps) - 1


def max_memory_map(gpu: int, gpu_memory_gb: float | None, free_bytes: int) -> dict[int | str, int | str]:
    """accelerate's max_memory placing on GPU `gpu` alone: the budget there (else its `free_bytes`), the rest on the CPU."""
    return {gpu: f"{gpu_memory_gb}GiB" if gpu_memory_gb else free_bytes, "cpu": "200GiB"}


def bench_gpu(device: torch.device) -> int:
    """The index of the CUDA device bench runs on (the current one for a bare `cuda`)."""
    return torch.cuda.current_device() if device.index is None else device.index


def _hf_model(loaded: LoadedModel, device: torch.device, gpu_memory_gb: float | None, offload: bool) -> tuple[T.PreTrainedModel, str]:
    """transformers' model of the same checkpoint (random weights for synthetic shapes): whole on the device, or placed by accelerate."""
    dtype = loaded.dtype
    synthetic = str(loaded.path).startswith("synthetic:")
    if not offload or device.type != "cuda":
        model = (
            T.AutoModelForCausalLM.from_config(loaded.config, dtype=dtype) if synthetic else T.AutoModelForCausalLM.from_pretrained(loaded.path, dtype=dtype)
        )
        return model.to(device).eval(), f"whole model on {device.type} (no offload)"
    from accelerate import dispatch_model, infer_auto_device_map

    gpu = bench_gpu(device)
    max_memory = max_memory_map(gpu, gpu_memory_gb, torch.cuda.mem_get_info(gpu)[0])
    if synthetic:
        model = T.AutoModelForCausalLM.from_config(loaded.config, dtype=dtype).eval()
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
        model = dispatch_model(model, device_map=device_map)
    else:
        model = T.AutoModelForCausalLM.from_pretrained(loaded.path, dtype=dtype, device_map="auto", max_memory=max_memory).eval()
        device_map = model.hf_device_map
    on_cpu = sum(1 for v in device_map.values() if v in ("cpu", "disk"))
    return model, f"accelerate device_map, {on_cpu} of {len(device_map)} modules on cpu"


class HFBaseline:
    """transformers' own generate on the same checkpoint, built once and warmed up, timed per token by a clock."""

    def __init__(
        self, loaded: LoadedModel, device: torch.device, gpu_memory_gb: float | None, offload: bool, warmup_ids: list[int], progress: bool = True
    ) -> None:
        if not progress:
            T.utils.logging.disable_progress_bar()
        try:
            self.model, self.placement = _hf_model(loaded, device, gpu_memory_gb, offload)
        finally:
            T.utils.logging.enable_progress_bar()
        self.device = device
        self.first = next(self.model.parameters()).device if device.type != "cuda" else device
        with torch.inference_mode():
            _generate(self.model, torch.tensor([warmup_ids], device=self.first), WARMUP_TOKENS, TokenClock(device))

    def run(self, prompts: list[list[int]], new_tokens: int) -> BaselineResult:
        """Greedy generate of exactly `new_tokens` per prompt; decode time is last token's clock minus first token's."""
        ttft_s = decode_s = 0.0
        steps = 0
        token_ids = []
        with torch.inference_mode():
            for ids in prompts:
                clock = TokenClock(self.device)
                start, out = _generate(self.model, torch.tensor([ids], device=self.first), new_tokens, clock)
                ttft, decode, intervals = clock_timings(start, clock.stamps)
                ttft_s, decode_s, steps = ttft_s + ttft, decode_s + decode, steps + intervals
                token_ids.append(out[0, len(ids) :].tolist())
        return BaselineResult(steps / decode_s if steps else 0.0, ttft_s / len(prompts), self.placement, decode_s, steps, token_ids)


def run_baseline(
    loaded: LoadedModel,
    device: torch.device,
    gpu_memory_gb: float | None,
    prompts: list[list[int]],
    new_tokens: int,
    progress: bool = True,
    offload: bool = True,
) -> BaselineResult:
    """Build, warm up and time transformers' generate once over the prompts."""
    baseline = HFBaseline(loaded, device, gpu_memory_gb, offload, prompts[0], progress)
    try:
        return baseline.run(prompts, new_tokens)
    finally:
        del baseline.model


def _generate(model: T.PreTrainedModel, x: torch.Tensor, new_tokens: int, clock: TokenClock) -> tuple[float, torch.Tensor]:
    """Run one greedy generate of exactly `new_tokens` tokens with the clock attached; returns its start time and the sequences."""
    if clock.device.type == "cuda":
        torch.cuda.synchronize(clock.device)
    start = time.perf_counter()
    out = model.generate(
        x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, logits_processor=T.LogitsProcessorList([clock])
    )
    return start, out
