"""Importance criteria: how confident a pass is in its next token (higher = more confident)."""

from __future__ import annotations

import math

import torch


def confidence(logits: torch.Tensor, criterion: str) -> float:
    """logits: [V] -> confidence in [0, 1] by max probability, normalised entropy, or top-1/top-2 margin."""
    probs = logits.float().softmax(-1)
    if criterion == "max_prob":
        return float(probs.max())
    if criterion == "entropy":
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
        return float(1.0 - entropy / math.log(probs.numel()))
    if criterion == "margin":
        top2 = probs.topk(2).values
        return float(top2[0] - top2[1])
    raise ValueError(f"unknown criterion {criterion!r}")
