"""Decisions of the big / little / MoBiLE policies: which experts each pass uses and when to fall back."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mobile_moe.config import PolicyConfig
from mobile_moe.errors import InvalidParameter
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.importance import confidence_tensor, signal_confidence, step_signals


@dataclass(frozen=True)
class Policy:
    """Decisions only: no model code, no devices. Its facts about a step are worked out once, when it is made."""

    config: PolicyConfig
    prefill_mode: ExpertMode = field(init=False)  # experts for the prompt
    decode_mode: ExpertMode = field(init=False)  # experts of the first pass of every decode step
    may_fall_back: bool = field(init=False)  # whether a step may be recomputed with big experts
    needs_confidence: bool = field(init=False)  # whether decode steps must measure the first pass's confidence
    needs_signals: bool = field(init=False)  # whether they measure every importance signal (the learned criterion, or recording them)
    verifies: bool = field(init=False)  # exact: every little token is checked by big before it is final
    draft_max: int = field(init=False)  # exact: little tokens drafted before big must verify them
    forced_acceptance: float | None = None  # exact, benchmarks on random weights only (bench --accept-rate): big also keeps a
    # drafted token at this rate (policy/acceptance.py); set where bench makes its Policy, never from a PolicyConfig

    def __post_init__(self) -> None:
        config = self.config
        if self.forced_acceptance is not None and not (config.name == "exact" and 0.0 <= self.forced_acceptance <= 1.0):
            raise InvalidParameter(f"a forced acceptance rate needs policy exact and a rate in [0, 1], got {config.name} {self.forced_acceptance}")
        mobile = config.name in ("mobile", "exact")  # exact: mobile's fallback, where big also checks the draft
        confidence = mobile and config.forced_fallback_rate is None
        facts = {
            "prefill_mode": ExpertMode(config.prefill_mode),
            "decode_mode": ExpertMode.BIG if config.name == "big" else ExpertMode.LITTLE,
            "may_fall_back": mobile,
            "needs_confidence": confidence,
            "needs_signals": confidence and (config.criterion == "learned" or config.record_signals),
            "verifies": config.name == "exact",
            "draft_max": config.draft_window,
        }
        for name, value in facts.items():
            object.__setattr__(self, name, value)

    def measure(self, logits: torch.Tensor, router_weights: Callable[[], torch.Tensor], little_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(0-d confidence, signals [len(SIGNALS)] or None) of a little pass's logits [V], on their device.

        A logits-only criterion costs just its own few ops; the router's signals ([L, k] gate values) are gathered only when used.
        """
        if not self.needs_signals:
            return confidence_tensor(logits, self.config.criterion), None
        signals = step_signals(logits, router_weights(), little_k)
        return signal_confidence(signals, self.config.criterion, self.config.learned), signals

    def falls_back(self, conf: float, step: int) -> bool:
        """MoBiLE: decode step `step` (1, 2, ...) is recomputed with big when the little pass is not confident enough.

        With a forced fallback rate R (benchmarks on random weights, whose confidences mean nothing) the
        decision ignores confidence: step s falls back iff floor(s * R) > floor((s - 1) * R), i.e. evenly spaced.
        """
        if not self.may_fall_back:
            return False
        rate = self.config.forced_fallback_rate
        if rate is not None:
            return math.floor(step * rate) > math.floor((step - 1) * rate)
        return conf < self.config.tau
