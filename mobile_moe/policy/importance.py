"""Importance criteria: how confident the little pass is in its next token (higher = more confident).

`max_prob`, `entropy` and `margin` read little's output distribution only. `learned` combines step signals
(those three plus what the router already computed in the little pass) with a fitted logistic model.
"""

from __future__ import annotations

import math

import torch

from mobile_moe.config import LearnedImportance

# Signals of one little step, all computed on the device after the little pass (see step_signals).
SIGNALS: tuple[str, ...] = (
    "margin",  # top-1 minus top-2 probability of little's output
    "log_margin",  # log(margin + 1e-4): the margin's low end spread out
    "max_prob",  # little's top-1 probability
    "entropy",  # 1 - normalised entropy of little's output
    "dropped_max",  # over MoE layers, the largest share of the top-k routing weight that little dropped
    "dropped_mean",  # the mean of that share over MoE layers
    "cut_gap_min",  # over MoE layers, the smallest router score gap between the last kept and first dropped expert
    "cut_gap_mean",  # the mean of that gap over MoE layers
    "logit_gap",  # top-1 minus top-2 logit of little's output (unbounded where the margin saturates)
    "log_max_prob",  # log of little's top-1 probability
    "dropped_min",  # over MoE layers, the smallest dropped share
    "dropped_last",  # the dropped share at the last MoE layer (nearest the output)
    "router_top1_mean",  # over MoE layers, the mean share of the top-k weight on the best expert
)
LOGIT_CRITERIA = ("max_prob", "entropy", "margin")


def confidence_tensor(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """logits: [V] -> 0-d confidence in [0, 1] on the logits' device: max probability, normalised entropy, or top-1/top-2 margin."""
    probs = logits.float().softmax(-1)  # [V]
    if criterion == "max_prob":
        return probs.max()
    if criterion == "margin":
        top2 = probs.topk(2).values
        return top2[0] - top2[1]
    if criterion == "entropy":
        return 1.0 - _entropy(probs) / math.log(probs.numel())
    raise ValueError(f"criterion {criterion!r} needs more than the logits")


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs: [V] -> 0-d entropy in nats."""
    return -(probs * probs.clamp_min(1e-30).log()).sum()


def output_signals(logits: torch.Tensor) -> torch.Tensor:
    """logits: [V] -> [5]: max probability, 1 - normalised entropy, top-1/top-2 margin, top-1/top-2 logit gap, log max probability."""
    logits = logits.float()
    probs = logits.softmax(-1)  # [V]
    top2 = probs.topk(2).values
    gap = (top2[0] / top2[1].clamp_min(1e-30)).log()  # = the logit gap, read off the probabilities
    return torch.stack([top2[0], 1.0 - _entropy(probs) / math.log(probs.numel()), top2[0] - top2[1], gap, top2[0].clamp_min(1e-30).log()])


def router_signals(raw_weights: torch.Tensor, little_k: int) -> torch.Tensor:
    """raw_weights: [L, k] each MoE layer's top-k gate values, best first -> [7]: dropped share max/mean, cut gap
    min/mean, dropped share min/at the last layer, mean top-1 share."""
    if raw_weights.numel() == 0 or little_k >= raw_weights.shape[1]:
        return raw_weights.new_zeros(7)
    w = raw_weights.float()
    total = w.sum(1).clamp_min(1e-30)  # [L]
    dropped = w[:, little_k:].sum(1) / total  # [L]
    gap = w[:, little_k - 1] - w[:, little_k]  # [L]
    return torch.stack([dropped.max(), dropped.mean(), gap.min(), gap.mean(), dropped.min(), dropped[-1], (w[:, 0] / total).mean()])


def step_signals(logits: torch.Tensor, raw_weights: torch.Tensor, little_k: int) -> torch.Tensor:
    """logits [V], raw_weights [L, k] -> the SIGNALS of one little step [len(SIGNALS)], on the device."""
    max_prob, entropy, margin, logit_gap, log_max_prob = output_signals(logits)
    router = router_signals(raw_weights, little_k)
    return torch.cat([torch.stack([margin, (margin + 1e-4).log(), max_prob, entropy]), router[:4],
                      torch.stack([logit_gap, log_max_prob]), router[4:]])


def signal_confidence(signals: torch.Tensor, criterion: str, learned: LearnedImportance | None) -> torch.Tensor:
    """signals: [..., len(SIGNALS)] -> confidence [...] under the criterion (learned: 1 - P(little differs from big))."""
    if criterion in LOGIT_CRITERIA:
        return signals[..., SIGNALS.index(criterion)]
    if criterion != "learned" or learned is None:
        raise ValueError(f"criterion {criterion!r} needs a fitted predictor" if criterion == "learned" else f"unknown criterion {criterion!r}")
    return 1.0 - differs_probability(signals, learned)


def differs_probability(signals: torch.Tensor, learned: LearnedImportance) -> torch.Tensor:
    """signals: [..., len(SIGNALS)] -> the fitted P(little's token differs from big's) [...]."""
    columns = signals[..., [SIGNALS.index(f) for f in learned.features]].float()  # [..., F]
    mean, scale, weights = (signals.new_tensor(v, dtype=torch.float32) for v in (learned.mean, learned.scale, learned.weights))
    return torch.sigmoid(((columns - mean) / scale) @ weights + learned.bias)


def confidence(logits: torch.Tensor, criterion: str) -> float:
    """The confidence of one row of logits as a Python float."""
    return float(confidence_tensor(logits, criterion))
