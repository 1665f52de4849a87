"""Decisions of the big / little / MoBiLE policies: which experts each pass uses and when to fall back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mobile_moe.config import PolicyConfig
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.importance import signal_confidence


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

    def confidence(self, signals: torch.Tensor) -> torch.Tensor:
        """The configured importance criterion on one step's signals [len(SIGNALS)] (0-d tensor on their device)."""
        return signal_confidence(signals, self.config.criterion, self.config.learned)

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
