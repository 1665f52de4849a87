"""The memory roofline of a decode token: bytes it must read, and how fast this machine reads memory.

A decode step at batch 1 reads every dense weight once (the embedding table only for its one row, unless the LM
head shares it), each expert it computes, and the KV cache up to its position. A step can go no faster than
those bytes over the machine's read bandwidth, probed here with a large torch reduction on the same threads.
"""

from __future__ import annotations

import time

import torch

from mobile_moe.loading.budget import dense_bytes, kv_bytes_per_token
from mobile_moe.models.transformer import CausalLM

PROBE_BYTES = 1 << 30
PROBE_ROUNDS = 3


def memory_probe_gb_s(nbytes: int = PROBE_BYTES, device: torch.device | None = None) -> float:
    """Best read bandwidth (GB/s) of `PROBE_ROUNDS` sums over `nbytes` of float32 on `device` (default: the CPU)."""
    device = torch.device("cpu") if device is None else device
    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    data.sum()  # first touch
    best = float("inf")
    for _ in range(PROBE_ROUNDS):
        start = time.perf_counter()
        data.sum().item()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def dense_read_bytes(model: CausalLM) -> int:
    """Dense bytes one decode step reads: every weight (quantized ones as packed), but of an untied embedding table only one row."""
    emb, head = model.model.embed_tokens.weight, getattr(model.lm_head, "weight", None)
    tied = head is not None and emb.data_ptr() == head.data_ptr()
    unread = 0 if tied else (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return dense_bytes(model) - unread


def bytes_per_token(model: CausalLM, expert_bytes: int, experts_per_token: float, mean_context: float) -> float:
    """Weight and KV bytes one decode step reads, given the experts it computed and its mean attended length."""
    return dense_read_bytes(model) + experts_per_token * expert_bytes + mean_context * kv_bytes_per_token(model, model.dtype)
