"""How many expert slots the device cache gets: explicit, from a memory budget, or automatic."""

from __future__ import annotations

import torch

from mobile_moe.config import CacheConfig
from mobile_moe.errors import CacheTooSmall
from mobile_moe.experts.store import ExpertStore
from mobile_moe.models.transformer import CausalLM

GIB = 1024**3
KV_RESERVE_TOKENS = 4096  # KV-cache room reserved inside a --gpu-memory budget
AUTO_FREE_FRACTION = 0.9  # share of free device memory an automatic budget takes


def dense_bytes(model: CausalLM) -> int:
    """Bytes of every weight on the device (dense part only: routed experts are not parameters)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    """KV-cache bytes one position takes across all layers."""
    k_shapes, v_shapes = model.kv_shapes()
    return sum(h * d for h, d in k_shapes + v_shapes) * torch.empty((), dtype=dtype).element_size()


def plan_slots(cfg: CacheConfig, model: CausalLM, store: ExpertStore, device: torch.device) -> int:
    """Number of expert slots; raises CacheTooSmall when one layer's top-k would not fit."""
    top_k, total = model.info.top_k, store.total_experts
    if cfg.slots is not None:
        slots = cfg.slots
        reason = f"--expert-cache {cfg.slots}"
    else:
        budget = _budget_bytes(cfg, model, device)
        if budget is None:
            return total  # CPU without a budget: every expert gets a slot
        context = min(model.info.max_context, KV_RESERVE_TOKENS)
        left = budget - dense_bytes(model) - context * kv_bytes_per_token(model, store.dtype)
        slots = max(0, left // store.expert_bytes)
        reason = (
            f"a {budget / GIB:.2f} GiB budget ({dense_bytes(model) / GIB:.2f} GiB dense weights, "
            f"{context}-token KV cache, {store.expert_bytes / 2**20:.1f} MiB per expert) leaves {slots} expert slots"
        )
    if slots < top_k:
        raise CacheTooSmall(f"{reason}: too small for one layer's top-{top_k} experts (need >= {top_k} slots)")
    return min(slots, total)


def _budget_bytes(cfg: CacheConfig, model: CausalLM, device: torch.device) -> int | None:
    """The memory budget in bytes, or None when no budget applies."""
    if cfg.gpu_memory_gb is not None:
        return int(cfg.gpu_memory_gb * GIB)
    if device.type == "cuda":  # dense weights are already on the device: free memory excludes them
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_FREE_FRACTION) + dense_bytes(model)
    return None
