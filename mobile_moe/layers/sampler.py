"""Greedy, temperature and nucleus (top-p) sampling from one row of logits."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [V] -> 0-d int64 token id on the logits' device (no host sync). temperature 0 means greedy."""
    if temperature == 0.0:
        return logits.argmax()
    return exponential_race(probabilities(logits, temperature, top_p), generator)


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits: [..., V] -> the distribution `sample` draws from [..., V] float32: softmax at `temperature` (> 0), then top-p."""
    probs = (logits.float() / temperature).softmax(-1)
    return _nucleus(probs, top_p) if top_p < 1.0 else probs


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs: [..., V] -> int64 token drawn from each row [...], argmax(p / Exp(1)): the draw `torch.multinomial(probs, 1)`
    makes (same generator use, so the same token for the same generator state) without its checks that read to the host."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)  # [..., V]
    return (probs / race).argmax(-1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [..., V]: zero every token outside each row's smallest set whose probability mass reaches top_p; renormalise."""
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)
