"""Choose MoBiLE's tau: the lowest fallback rate whose greedy agreement with big meets a target, allowing for noise.

A handful of divergences decides agreement near 98%, so by default a setting qualifies only when the lower end
of its 95% bootstrap interval (over prompts) meets the target (rule `lower-bound`); rule `point` uses the
point estimate alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mobile_moe.config import LearnedImportance
from mobile_moe.eval.quality import Run

# Each criterion's confidence lives on its own scale, so each gets its own grid of thresholds.
TAU_GRIDS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "max_prob": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
        "margin": (0.02, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3),
        "entropy": (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),
        "learned": (0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98),  # eval's neighbours of a calibrated learned tau
    }
)
# The learned confidence is fitted per model, so its taus are chosen as the thresholds giving these fallback rates on the fitting data.
LEARNED_FALLBACK_RATES: tuple[float, ...] = (0.1, 0.14, 0.18, 0.2, 0.22, 0.24, 0.26, 0.28, 0.3, 0.33, 0.36, 0.4)


RULES: tuple[str, ...] = ("lower-bound", "point")
RECORD_VERSION = 2  # 1: tau and criterion only; 2: + rule, agreement_ci, the learned predictor


@dataclass(frozen=True)
class Calibration:
    """The chosen run (None when no tau meets the target) and every mobile run tried."""

    target: float
    chosen: Run | None
    runs: list[Run]
    rule: str = "lower-bound"
    learned: LearnedImportance | None = None  # the predictor fitted for criterion `learned`, if it was tried
    learned_report: dict | None = None  # which signals matter (feature_report)

    def best_taus(self) -> dict[str, float]:
        """Per criterion, the tau of its qualifying run with the lowest fallback rate (used when that criterion is asked for)."""
        best: dict[str, Run] = {}
        for run in self.runs:
            if qualifies(run, self.target, self.rule) and (run.criterion not in best or run.fallback_rate < best[run.criterion].fallback_rate):
                best[run.criterion] = run
        return {criterion: run.tau for criterion, run in best.items()}

    def record(self, prompts: int, data: str, dtype: str, kv_repair: int = 0, rollback: bool = False, little_k: int | None = None) -> dict:
        """What gets written next to the model; `dtype`: the compute dtype the runs were made in; `kv_repair`, `rollback`:
        the mobile recovery they ran with, `little_k` the little model's experts (each the default of a policy that leaves it unset)."""
        assert self.chosen is not None
        return {
            "version": RECORD_VERSION,
            "dtype": dtype,
            "tau": self.chosen.tau,
            "criterion": self.chosen.criterion,
            "kv_repair": kv_repair,
            "rollback": rollback and kv_repair > 0,
            **({"little_k": little_k} if little_k is not None else {}),
            "target_agreement": self.target,
            "rule": self.rule,
            "agreement": self.chosen.agreement,
            "agreement_ci": list(self.chosen.agreement_ci),
            "fallback_rate": self.chosen.fallback_rate,
            "taus": self.best_taus(),
            "prompts": prompts,
            "data": data,
            "runs": [r.to_dict() for r in self.runs],
            **({"learned": self.learned.to_dict(), "learned_report": self.learned_report} if self.learned is not None else {}),
        }


def qualifies(run: Run, target: float, rule: str) -> bool:
    """Whether a run's agreement meets the target under the rule."""
    return (run.agreement_ci[0] if rule == "lower-bound" else run.agreement) >= target


def choose(runs: list[Run], target: float, rule: str = "lower-bound") -> Calibration:
    """Among mobile runs that qualify, the one with the lowest fallback rate (then highest agreement)."""
    mobile = [r for r in runs if r.policy == "mobile"]
    meeting = [r for r in mobile if qualifies(r, target, rule)]
    chosen = min(meeting, key=lambda r: (r.fallback_rate, -r.agreement)) if meeting else None
    return Calibration(target=target, chosen=chosen, runs=mobile, rule=rule)
