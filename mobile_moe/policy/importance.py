"""Importance criteria: how confident a pass is in its next token (higher = more confident)."""

from __future__ import annotations

import math

import torch


def confidence_tensor(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """logits: [V] -> 0-d confidence in [0, 1] on the logits' device: max probability, normalised entropy, or top-1/top-2 margin."""
    probs = logits.float().softmax(-1)
    if criterion == "max_prob":
        return probs.max()
    if criterion == "entropy":
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
        return 1.0 - entropy / math.log(probs.numel())
    if criterion == "margin":
        top2 = probs.topk(2).values
        return top2[0] - top2[1]
    raise ValueError(f"unknown criterion {criterion!r}")


def confidence(logits: torch.Tensor, criterion: str) -> float:
    """The confidence of one row of logits as a Python float."""
    return float(confidence_tensor(logits, criterion))
