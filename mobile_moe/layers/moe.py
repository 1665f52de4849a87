"""Routing (per-architecture semantics, big and little selections) and the MoE block that combines experts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMode(Enum):
    """Which of the router's experts a pass uses."""

    BIG = "big"  # all top-k
    LITTLE = "little"  # the little_k highest-ranked of the top-k (ceil(k/2) unless set)


@dataclass(frozen=True)
class RouterSpec:
    """How an architecture turns router logits into experts and weights (docs/design.md §3)."""

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid", "topk_softmax"] = "softmax"  # topk_softmax: top-k of the logits, softmax over those k (gpt-oss)
    renormalize: bool = False
    renorm_eps: float = 0.0  # added to the denominator (DeepSeek-V3, GLM-4.5)
    renorm_min: float = 0.0  # lower bound of the denominator (ERNIE-4.5's moe_norm_min)
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    correction_bias: bool = False
    logits_fp32: bool = False  # compute the router matmul in float32 (DeepSeek keeps the gate in fp32)
    bias: bool = False  # the router linear has a bias [E] (gpt-oss)

    @property
    def little_k(self) -> int:
        """Experts per token of the little model unless a policy sets it."""
        return half_of(self.top_k)


def half_of(top_k: int) -> int:
    """The paper's little model: half the router's top-k experts, rounded up."""
    return math.ceil(top_k / 2)


@dataclass(frozen=True)
class Routing:
    """Top-k choice for T tokens, ranked best first."""

    indices: torch.Tensor  # [T, k] int64, sorted by selection score, descending
    raw_weights: torch.Tensor  # [T, k] float32 gate values before renormalisation and scaling


def route(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None) -> Routing:
    """logits: [T, E] -> the architecture's top-k, sorted best first."""
    logits = logits.float()
    if spec.scoring == "topk_softmax":  # weights: softmax over the selected logits (the sum renormalises a kept prefix)
        top = logits.topk(spec.top_k, dim=-1, sorted=True)  # [T, k]
        return Routing(indices=top.indices, raw_weights=top.values.softmax(-1))
    scores = logits.softmax(-1) if spec.scoring == "softmax" else logits.sigmoid()  # [T, E]
    choice = scores + bias.float() if bias is not None else scores
    if spec.n_group > 1 and spec.topk_group < spec.n_group:
        choice = _mask_groups(choice, spec)
    indices = choice.topk(spec.top_k, dim=-1, sorted=True).indices  # [T, k]
    return Routing(indices=indices, raw_weights=scores.gather(1, indices))


def _mask_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Keep only experts of the topk_group best groups (DeepSeek group-limited routing)."""
    T = choice.shape[0]
    grouped = choice.view(T, spec.n_group, -1)  # [T, G, E/G]
    if spec.group_score == "max":
        group_scores = grouped.max(-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)  # [T, G]
    return choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(T, -1), float("-inf"))


def _finish(raw: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Apply the architecture's renormalisation and scaling to gathered gate values [T, n]."""
    if spec.renormalize:
        raw = raw / (raw.sum(-1, keepdim=True).clamp(min=spec.renorm_min) + spec.renorm_eps)
    return raw * spec.scaling


def select(
    routing: Routing,
    spec: RouterSpec,
    mode: ExpertMode,
    little_weights: str = "native",
    little_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [T, n], weights [T, n]) for the big (n = k) or little (n = little_k, default ceil(k/2)) model."""
    big = _finish(routing.raw_weights, spec)
    if mode is ExpertMode.BIG:
        return routing.indices, big
    n = spec.little_k if little_k is None else little_k
    little = _finish(routing.raw_weights[:, :n], spec)
    if little_weights == "rescale":
        little = little * (big.sum(-1, keepdim=True) / little.sum(-1, keepdim=True))
    return routing.indices[:, :n], little


class LayerExperts(Protocol):
    """What one MoE layer needs from the engine in a pass: its routed experts' output for a routing.

    Bound to its layer by the engine (`ExpertRunner.at`), so the block itself never passes a layer number: a compiled
    block then serves every layer of its type."""

    def __call__(self, x: torch.Tensor, routing: Routing, spec: RouterSpec) -> torch.Tensor:
        """x: [T, H] and its top-k routing -> the weighted sum of the experts the pass chooses from it (see `select`) [T, H]."""
        ...


class ExpertRunner(Protocol):
    """The engine side of a forward pass: each layer's bound experts."""

    def at(self, layer: int) -> LayerExperts:
        """The experts handle of decoder layer `layer` for the current pass."""
        ...


class Router(nn.Module):
    """Linear gate over experts, with an optional score-correction bias [E] added to the scores for selection only."""

    def __init__(self, hidden: int, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(spec.num_experts)) if spec.bias else None  # [E]
        if spec.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [T, H] -> routing for T tokens."""
        if self.spec.logits_fp32:
            logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        else:
            logits = F.linear(x, self.weight, self.bias)  # [T, E]
        return route(logits, self.spec, self.e_score_correction_bias)


class RoutedExperts(nn.Module):
    """The routed part of an MoE layer (no parameters here: the engine holds and runs the experts)."""

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor, routing: Routing, experts: LayerExperts) -> torch.Tensor:
        """x: [T, H] and its routing -> the routed experts' weighted sum [T, H]."""
        return experts(x, routing, self.spec)


class MoEBlock(nn.Module):
    """Routed experts (run by the engine) plus optional shared experts, optionally sigmoid-gated."""

    def __init__(self, layer: int, hidden: int, spec: RouterSpec, shared: nn.Module | None, shared_gate: bool) -> None:
        super().__init__()
        self.layer, self.spec = layer, spec
        self.gate = Router(hidden, spec)
        self.routed_experts = RoutedExperts(spec)
        self.shared_expert = shared
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_gate else None

    def forward(self, x: torch.Tensor, experts: LayerExperts) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        out = self.routed_experts(x, self.gate(x), experts)
        shared = self.shared_output(x)
        return out if shared is None else out + shared

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: [T, H] -> the shared experts' (gated) output [T, H], or None without shared experts."""
        if self.shared_expert is None:
            return None
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared
