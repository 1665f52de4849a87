"""What a newcomer runs first: transformers generate, offloaded with accelerate's device_map at the same budget."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import transformers as T

from mobile_moe.engine.loader import LoadedModel


@dataclass(frozen=True)
class BaselineResult:
    """Timings of transformers' own generate."""

    decode_tok_s: float
    ttft_s: float
    placement: str


def _hf_model(loaded: LoadedModel, device: torch.device, gpu_memory_gb: float | None) -> tuple[T.PreTrainedModel, str]:
    """transformers' model of the same checkpoint (random weights for synthetic shapes), placed by accelerate."""
    dtype = loaded.dtype
    synthetic = str(loaded.path).startswith("synthetic:")
    if device.type != "cuda":
        model = T.AutoModelForCausalLM.from_config(loaded.config, dtype=dtype) if synthetic else T.AutoModelForCausalLM.from_pretrained(loaded.path, dtype=dtype)
        return model.eval(), "cpu (no accelerator: nothing to offload)"
    from accelerate import dispatch_model, infer_auto_device_map

    budget = f"{gpu_memory_gb}GiB" if gpu_memory_gb else None
    max_memory = {0: budget, "cpu": "200GiB"} if budget else None
    if synthetic:
        model = T.AutoModelForCausalLM.from_config(loaded.config, dtype=dtype).eval()
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
        model = dispatch_model(model, device_map=device_map)
    else:
        model = T.AutoModelForCausalLM.from_pretrained(loaded.path, dtype=dtype, device_map="auto", max_memory=max_memory).eval()
        device_map = model.hf_device_map
    on_cpu = sum(1 for v in device_map.values() if v in ("cpu", "disk"))
    return model, f"accelerate device_map, {on_cpu} of {len(device_map)} modules on cpu"


def run_baseline(loaded: LoadedModel, device: torch.device, gpu_memory_gb: float | None, prompts: list[list[int]], new_tokens: int, progress: bool = True) -> BaselineResult:
    """Greedy generate on the prompts; decode speed from the time beyond a 1-token generate (the prefill)."""
    if not progress:
        T.utils.logging.disable_progress_bar()
    try:
        model, placement = _hf_model(loaded, device, gpu_memory_gb)
    finally:
        T.utils.logging.enable_progress_bar()
    first = next(model.parameters()).device if device.type != "cuda" else device
    decode_s = ttft_s = 0.0
    steps = 0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=first)
            ttft, _ = _timed(model, x, 1, device)
            full, n = _timed(model, x, new_tokens, device)
            ttft_s += ttft
            decode_s += max(full - ttft, 1e-9)
            steps += n - 1
    del model
    return BaselineResult(decode_tok_s=steps / decode_s if decode_s else 0.0, ttft_s=ttft_s / len(prompts), placement=placement)


def _timed(model: T.PreTrainedModel, x: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, int]:
    """(seconds, tokens generated) of one greedy generate."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out.shape[1] - x.shape[1]
