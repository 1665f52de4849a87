"""Choose MoBiLE's tau: the lowest fallback rate whose greedy agreement with big meets a target."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mobile_moe.eval.quality import Run

# Each criterion's confidence lives on its own scale, so each gets its own grid of thresholds.
TAU_GRIDS: Mapping[str, tuple[float, ...]] = MappingProxyType({
    "max_prob": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "margin": (0.02, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3),
    "entropy": (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),
})


@dataclass(frozen=True)
class Calibration:
    """The chosen run (None when no tau meets the target) and every mobile run tried."""

    target: float
    chosen: Run | None
    runs: list[Run]

    def record(self, prompts: int, data: str) -> dict:
        """What gets written next to the model."""
        assert self.chosen is not None
        return {
            "tau": self.chosen.tau, "criterion": self.chosen.criterion, "target_agreement": self.target,
            "agreement": self.chosen.agreement, "fallback_rate": self.chosen.fallback_rate,
            "prompts": prompts, "data": data, "runs": [r.to_dict() for r in self.runs],
        }


def choose(runs: list[Run], target: float) -> Calibration:
    """Among mobile runs with agreement >= target, the one with the lowest fallback rate (then highest agreement)."""
    mobile = [r for r in runs if r.policy == "mobile"]
    meeting = [r for r in mobile if r.agreement >= target]
    chosen = min(meeting, key=lambda r: (r.fallback_rate, -r.agreement)) if meeting else None
    return Calibration(target=target, chosen=chosen, runs=mobile)
