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
    """logits: [V] -> [5]: max probability, 1 - normalised entropy, top-1/top-2 margin, top-1/top-2 logit gap, log max
    probability. Read off log-probabilities in a few whole-vector ops (each small op costs ~10 us of dispatch on a CPU)."""
    logits = logits.float()
    logp = logits.log_softmax(-1)  # [V]
    entropy = -(logp.exp() * logp).sum()
    top = logp.topk(2).values  # [2] log-probabilities of the best two
    p = top.exp()
    return torch.stack([p[0], 1.0 - entropy / math.log(logits.numel()), p[0] - p[1], top[0] - top[1], top[0]])


def router_signals(raw_weights: torch.Tensor, little_k: int) -> torch.Tensor:
    """raw_weights: [L, k] each MoE layer's top-k gate values, best first -> [7]: dropped share max/mean, cut gap
    min/mean, dropped share min/at the last layer, mean top-1 share."""
    if raw_weights.numel() == 0 or little_k >= raw_weights.shape[1]:
        return raw_weights.new_zeros(7)
    w = raw_weights.float()
    share = w / w.sum(1, keepdim=True).clamp_min(1e-30)  # [L, k]
    per_layer = torch.stack([share[:, little_k:].sum(1), w[:, little_k - 1] - w[:, little_k], share[:, 0]], 1)  # [L, 3]: dropped, gap, top-1
    lo, mean = per_layer.amin(0), per_layer.mean(0)  # [3] each
    return torch.stack([per_layer[:, 0].amax(), mean[0], lo[1], mean[1], lo[0], per_layer[-1, 0], mean[2]])


def step_signals(logits: torch.Tensor, raw_weights: torch.Tensor, little_k: int) -> torch.Tensor:
    """logits [V], raw_weights [L, k] -> the SIGNALS of one little step [len(SIGNALS)], on the device."""
    out = output_signals(logits)  # max_prob, entropy, margin, logit_gap, log_max_prob
    router = router_signals(raw_weights, little_k)
    return torch.cat([out[2:3], (out[2:3] + 1e-4).log(), out[0:2], router[:4], out[3:5], router[4:]])


def signal_confidence(signals: torch.Tensor, criterion: str, learned: LearnedImportance | None) -> torch.Tensor:
    """signals: [..., len(SIGNALS)] -> confidence [...] under the criterion (learned: 1 - P(little differs from big))."""
    if criterion in LOGIT_CRITERIA:
        return signals[..., SIGNALS.index(criterion)]
    if criterion != "learned" or learned is None:
        raise ValueError(f"criterion {criterion!r} needs a fitted predictor" if criterion == "learned" else f"unknown criterion {criterion!r}")
    return 1.0 - differs_probability(signals, learned)


def differs_probability(signals: torch.Tensor, learned: LearnedImportance) -> torch.Tensor:
    """signals: [..., len(SIGNALS)] -> the fitted P(little's token differs from big's) [...]: the standardisation folded
    into one coefficient per signal (zero for signals the fit did not use), so a step costs one dot product."""
    coef, offset = dense_coefficients(learned)
    return torch.sigmoid(signals.float() @ signals.new_tensor(coef, dtype=torch.float32) + offset)


def dense_coefficients(learned: LearnedImportance) -> tuple[list[float], float]:
    """(a coefficient per entry of SIGNALS, offset) with sum_i weights[i] * (s_i - mean[i]) / scale[i] + bias = coef . s + offset."""
    coef = [0.0] * len(SIGNALS)
    offset = learned.bias
    for feature, mean, scale, weight in zip(learned.features, learned.mean, learned.scale, learned.weights):
        coef[SIGNALS.index(feature)] += weight / scale
        offset -= mean * weight / scale
    return coef, offset


def confidence(logits: torch.Tensor, criterion: str) -> float:
    """The confidence of one row of logits as a Python float."""
    return float(confidence_tensor(logits, criterion))
