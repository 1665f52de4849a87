"""Calibration across sources: tau per source, a stated rule over them, and leave-one-source-out estimates.

A tau chosen on pooled prompts of one source does not transfer to another (measured: 98.2% agreement at 25.7%
fallbacks on the calibration split, 97.9% at 31.2% on other code). So `calibrate --source A --source B ...` runs
every candidate tau on each source apart and reports:
- the tau each source alone needs (the lowest-fallback tau meeting the target there, under the rule);
- the final tau: the **strictest** of those, so every calibration source meets the target by itself;
- leave-one-source-out: for each source s, the tau chosen on the other sources pooled (the learned criterion is
  refitted without s, its taus taken at fixed fallback rates of the other sources' steps) and what it gives on s:
  the honest estimate for a source the calibration never saw.
Given one source only, `split_source` deals its files at random (seeded) into RANDOM_SPLIT_PARTS pseudo-sources, so the
same machinery still holds files out; those estimates then speak for unseen files of that source, not for other code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from mobile_moe.errors import InvalidParameter
from mobile_moe.eval.agreement import pooled_agreement
from mobile_moe.eval.calibrate import qualifies
from mobile_moe.eval.quality import Run

RANDOM_SPLIT_PARTS = 3


def split_source(name: str, texts: list[str], parts: int = RANDOM_SPLIT_PARTS, seed: int = 0) -> dict[str, list[str]]:
    """One source's files dealt in a seeded random order into `parts` pseudo-sources named NAME/1 ... NAME/parts."""
    if len(texts) < parts:
        raise InvalidParameter(
            f"one source ({name}) with {len(texts)} file(s) cannot be split into {parts} parts; give at least two --source, or a directory of >= {parts} files"
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return {f"{name}/{part + 1}": [texts[i] for i in order[part::parts]] for part in range(parts)}


def pool(runs: list[Run]) -> Run:
    """One run of the same policy over several sources' prompts: agreement and its bootstrap CI over all their prompts."""
    per_prompt = [pair for run in runs for pair in run.per_prompt]
    agreement, ci = pooled_agreement(per_prompt)
    steps = sum(r.decode_steps for r in runs)
    fallbacks = sum(r.fallback_rate * r.decode_steps for r in runs)
    rolled_back = sum(r.rolled_back_rate * r.decode_steps for r in runs)
    return replace(
        runs[0],
        agreement=agreement,
        agreement_ci=ci,
        fallback_rate=fallbacks / steps if steps else 0.0,
        decode_steps=steps,
        tokens=sum(r.tokens for r in runs),
        judged_tokens=sum(r.judged_tokens for r in runs),
        per_prompt=tuple(per_prompt),
        rolled_back_rate=rolled_back / steps if steps else 0.0,
    )


def pick(runs: list[Run], target: float, rule: str) -> Run | None:
    """The qualifying run with the lowest fallback rate (then the highest agreement), or None."""
    meeting = [r for r in runs if qualifies(r, target, rule)]
    return min(meeting, key=lambda r: (r.fallback_rate, -r.agreement)) if meeting else None


@dataclass(frozen=True)
class SourceRow:
    """One source's line of the report."""

    source: str
    prompts: int
    tau_alone: float | None  # the tau this source alone needs (None: none of the candidates meets the target here)
    at_final: Run | None  # this source at the final tau
    tau_from_others: float | None  # leave-one-source-out: the tau chosen on the other sources
    held_out: Run | None  # this source at that tau (with the criterion fitted without it, for learned)

    def to_dict(self) -> dict:
        """JSON-ready."""
        brief = lambda r: (
            None
            if r is None
            else {
                "tau": r.tau,
                "agreement": r.agreement,
                "agreement_ci": list(r.agreement_ci),  # noqa: E731
                "fallback_rate": r.fallback_rate,
                "judged_tokens": r.judged_tokens,
            }
        )
        return {
            "source": self.source,
            "prompts": self.prompts,
            "tau_alone": self.tau_alone,
            "at_final": brief(self.at_final),
            "tau_from_others": self.tau_from_others,
            "held_out": brief(self.held_out),
        }


@dataclass(frozen=True)
class SourceCalibration:
    """One criterion calibrated across sources."""

    criterion: str
    final_tau: float | None  # the strictest of the per-source taus; None when some source meets the target at no candidate
    pooled: Run | None  # every source's prompts together at the final tau
    rows: list[SourceRow]

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "criterion": self.criterion,
            "rule": "strictest per-source tau",
            "final_tau": self.final_tau,
            "pooled": None if self.pooled is None else self.pooled.to_dict(),
            "sources": [r.to_dict() for r in self.rows],
        }


def calibrate_across(
    runs: Mapping[str, list[Run]],
    folds: Mapping[str, Mapping[str, list[Run]]] | None,
    prompts: Mapping[str, int],
    target: float,
    rule: str,
) -> SourceCalibration:
    """runs: source -> the criterion's mobile runs on it (the same taus on every source). folds: for a fitted criterion,
    held-out source -> source -> runs of the criterion fitted without the held-out one (None: the criterion is fixed,
    so `runs` serve every fold)."""
    sources = list(runs)
    criterion = runs[sources[0]][0].criterion or ""
    alone = {s: pick(runs[s], target, rule) for s in sources}
    final = None if any(r is None for r in alone.values()) else max(r.tau for r in alone.values() if r is not None)
    at_final = {s: next((r for r in runs[s] if r.tau == final), None) for s in sources}
    rows = []
    for s in sources:
        fold = runs if folds is None else folds[s]
        others = [o for o in sources if o != s]
        chosen = pick([pool([fold[o][i] for o in others]) for i in range(len(fold[s]))], target, rule) if others else None
        held_out = None if chosen is None else next(r for r in fold[s] if r.tau == chosen.tau)
        rows.append(SourceRow(s, prompts[s], None if alone[s] is None else alone[s].tau, at_final[s], None if chosen is None else chosen.tau, held_out))
    pooled = None if final is None else pool([r for r in at_final.values() if r is not None])
    return SourceCalibration(criterion, final, pooled, rows)


def sources_table(calibrations: list[SourceCalibration], target: float) -> str:
    """Per criterion and source: the tau it alone needs, agreement (95% CI) and fallbacks at the final tau, and the
    leave-one-source-out tau with what it gave on the held-out source."""
    fmt = lambda r: "-" if r is None else f"{r.agreement:.1%} ({r.agreement_ci[0]:.1%}-{r.agreement_ci[1]:.1%}) {r.fallback_rate:>5.1%}"  # noqa: E731
    tau = lambda t: "-" if t is None else f"{t:g}"  # noqa: E731
    lines = [
        f"target agreement {target:.1%}; final tau = the strictest per-source tau",
        f"{'criterion':<9} {'source':<22} {'prompts':>7} {'tau alone':>9}  {'at final tau: agreement (CI) fallback':<36} "
        f"{'LOSO tau':>8}  held out: agreement (CI) fallback",
    ]
    for cal in calibrations:
        for row in cal.rows:
            lines.append(
                f"{cal.criterion:<9} {row.source:<22} {row.prompts:>7} {tau(row.tau_alone):>9}  {fmt(row.at_final):<36} "
                f"{tau(row.tau_from_others):>8}  {fmt(row.held_out)}"
            )
        lines.append(f"{cal.criterion:<9} {'(all, final tau ' + tau(cal.final_tau) + ')':<22} {sum(r.prompts for r in cal.rows):>7} {'':>9}  {fmt(cal.pooled)}")
    return "\n".join(lines)
