"""Decisions of the big / little / MoBiLE policies: which experts each pass uses and when to fall back."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mobile_moe.config import PolicyConfig
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.importance import confidence_tensor, signal_confidence, step_signals


@dataclass(frozen=True)
class Policy:
    """Decisions only: no model code, no devices."""

    config: PolicyConfig

    @property
    def prefill_mode(self) -> ExpertMode:
        """Experts for the prompt."""
        return ExpertMode(self.config.prefill_mode)

    @property
    def decode_mode(self) -> ExpertMode:
        """Experts of the first pass of every decode step."""
        return ExpertMode.BIG if self.config.name == "big" else ExpertMode.LITTLE

    @property
    def may_fall_back(self) -> bool:
        """Whether a step may be recomputed with big experts."""
        return self.config.name == "mobile"

    @property
    def needs_confidence(self) -> bool:
        """Whether decode steps must measure the first pass's confidence."""
        return self.may_fall_back and self.config.forced_fallback_rate is None

    @property
    def needs_signals(self) -> bool:
        """Whether decode steps measure every importance signal (the learned criterion, or recording them for calibration)."""
        return self.needs_confidence and (self.config.criterion == "learned" or self.config.record_signals)

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
