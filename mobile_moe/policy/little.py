"""Knobs of the little pass at one MoE layer for one token (run big where it matters, prefer resident experts), and where a partial fallback starts."""

from __future__ import annotations

from collections.abc import Callable

import torch


def dropped_share(scores: list[float], little_k: int) -> float:
    """Share of the top-k routing weight (scores best first) that little drops."""
    total = sum(scores)
    return sum(scores[little_k:]) / total if total > 0 else 0.0


def runs_big_here(scores: list[float], little_k: int, threshold: float) -> bool:
    """Layer-adaptive little: the layer uses all top-k when the dropped half carries more than `threshold` of the weight."""
    return dropped_share(scores, little_k) > threshold


def prefer_resident(experts: list[int], scores: list[float], little_k: int, resident: Callable[[int], bool], factor: float) -> list[int]:
    """Cache-aware little: the ranks (into the top-k, best first) little uses.

    Each kept expert that is not resident is swapped, weakest first, for the best dropped resident one whose
    score is at least 1/factor of its own; every top-k expert is still the router's choice.
    """
    kept = list(range(little_k))
    spare = [r for r in range(little_k, len(experts)) if resident(experts[r])]  # best first
    for rank in reversed(range(little_k)):
        if not spare or resident(experts[rank]):
            continue
        if scores[spare[0]] * factor >= scores[rank]:
            kept[rank] = spare.pop(0)
    return sorted(kept)


def first_dropping_layer(raw_weights: torch.Tensor, little_k: int, share: float) -> torch.Tensor:
    """raw_weights: [L, k] each MoE layer's top-k gate values of a little step, best first -> the MoE layer (row) a partial
    fallback starts at, on the device []: the first whose dropped half carries more than `share` of the weight, else
    the one dropping most."""
    w = raw_weights.float()
    dropped = w[:, little_k:].sum(1) / w.sum(1).clamp_min(1e-30)  # [L]
    high = dropped > share
    return torch.where(high.any(), high.int().argmax(), dropped.argmax())
