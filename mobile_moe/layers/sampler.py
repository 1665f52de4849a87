"""Greedy, temperature and nucleus (top-p) sampling from one row of logits."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [V] -> 0-d int64 token id on the logits' device (no host sync). temperature 0 means greedy."""
    if temperature == 0.0:
        return logits.argmax()
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return exponential_race(probs, generator)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs: [V] -> 0-d int64 token drawn from them, argmax(p / Exp(1)): the draw `torch.multinomial(probs, 1)` makes
    (same generator use, so the same token for the same generator state) without its checks that read to the host."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)  # [V]
    return (probs / race).argmax()


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches top_p; renormalise."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()
