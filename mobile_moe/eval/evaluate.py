"""The `eval` and `calibrate` jobs: data -> prompts -> runs -> report dict."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

from mobile_moe.config import LearnedImportance, PolicyConfig
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import InvalidParameter
from mobile_moe.eval.calibrate import LEARNED_FALLBACK_RATES, TAU_GRIDS, Calibration, choose
from mobile_moe.eval.learned import collect, feature_report, fit, merge, taus_for_rates
from mobile_moe.eval.prompts import cut_prompts
from mobile_moe.eval.quality import (
    mobile_perplexity,
    mobile_sweep,
    perplexity,
    policy_runs,
    token_scores,
)
from mobile_moe.eval.sources import SourceCalibration, calibrate_across
from mobile_moe.policy.importance import LOGIT_CRITERIA


@dataclass(frozen=True)
class EvalSettings:
    """How much of the data to use and which taus to try."""

    taus: tuple[float, ...]
    max_prompts: int = 48
    new_tokens: int = 32
    ppl_tokens: int = 8192
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.new_tokens < 1 or self.ppl_tokens < 1:
            raise InvalidParameter("--max-prompts, --new-tokens and --ppl-tokens must be >= 1")
        if not self.taus or any(t < 0 for t in self.taus):
            raise InvalidParameter("--taus must be a non-empty list of numbers >= 0")


def _prompts(llm: LLM, texts: list[str], settings: EvalSettings) -> tuple[list, int]:
    """Prompts cut from the texts, minus those too long for the context with room for the new tokens; (prompts, skipped)."""
    room = llm.max_context - settings.new_tokens
    cut = cut_prompts(texts, settings.max_prompts)
    prompts = [p for p in cut if len(llm.encode(p.text)) < room]
    skipped = len(cut) - len(prompts)
    if skipped:
        logging.getLogger("mobile_moe").warning(f"skipped {skipped} of {len(cut)} prompts longer than the context allows ({room} tokens)")
    if not prompts:
        raise InvalidParameter("no prompts could be cut from the data (it needs Python functions with a body that fit the context)")
    return prompts, skipped


def evaluate(
    llm: LLM,
    texts: list[str],
    data: str,
    settings: EvalSettings,
    sweeps: list[tuple[PolicyConfig, tuple[float, ...]]],
    calibrated: float | None,
    reference: LLM | None = None,
) -> dict:
    """Perplexity of big/little (and a teacher-forced mobile estimate per tau), then greedy runs per policy.

    `sweeps`: per mobile configuration (criterion, knobs), the taus to run; the first one's criterion is the report's.
    `reference`: the same model with float experts; big's greedy agreement with it measures what quantization costs.
    """
    prompts, skipped = _prompts(llm, texts, settings)
    base, taus = sweeps[0]
    scored = base.criterion in LOGIT_CRITERIA or (base.criterion == "learned" and base.learned is not None)  # teacher-forced mobile
    scores = token_scores(llm, texts, settings.ppl_tokens, base.criterion if scored else None, settings.progress, learned=base.learned, little_k=base.little_k)
    mobiles = [policy for sweep_base, sweep_taus in sweeps for policy in mobile_sweep(sweep_base, sweep_taus)]
    runs, versus = policy_runs(llm, prompts, mobiles, settings.new_tokens, settings.progress, reference)
    return {
        "model": str(llm.path),
        "data": data,
        "prompts": len(prompts),
        "prompts_skipped_too_long": skipped,
        "new_tokens": settings.new_tokens,
        "criterion": base.criterion,
        "little_weights": base.little_weights,
        "little_k": llm.little_k(base),
        "expert_format": str(llm.loaded.store.format),
        "expert_bytes": llm.loaded.store.expert_bytes,
        "cache_slots": llm.runner.cache.num_slots,
        "total_experts": llm.loaded.store.total_experts,
        "big_vs_float_big": None
        if versus is None
        else {"expert_format": str(reference.loaded.store.format), "dtype": str(reference.loaded.dtype).removeprefix("torch."), **asdict(versus)},
        "perplexity": {
            "big": perplexity(scores.big),
            "little": perplexity(scores.little),
            "tokens": int(scores.big.numel()),
            "files": scores.files,
            "files_total": scores.files_total,
            "mobile": {f"{t:g}": mobile_perplexity(scores, t, base.rollback_window) for t in taus} if scored else {},
        },
        "calibrated_tau": calibrated,
        "runs": [r.to_dict() for r in runs],
    }


def calibrate(
    llm: LLM,
    texts: list[str],
    settings: EvalSettings,
    bases: list[PolicyConfig],
    target: float,
    grid: bool,
    rule: str = "lower-bound",
) -> tuple[Calibration, int]:
    """Sweep (criterion, tau) on the texts and choose the pair meeting the target agreement at the lowest fallback rate.

    Criterion `learned` is first fitted on the same prompts (every step decoded by little then big). With `grid`, each
    criterion uses its own default taus (TAU_GRIDS; for learned, thresholds at LEARNED_FALLBACK_RATES); otherwise settings.taus.
    """
    if not 0 < target <= 1:
        raise InvalidParameter(f"--target-agreement must be in (0, 1], got {target}")
    prompts, _ = _prompts(llm, texts, settings)
    mobiles, learned, report = [], None, None
    for base in bases:
        taus = settings.taus
        if base.criterion == "learned":
            data = collect(llm, [llm.encode(p.text) for p in prompts], settings.new_tokens, base, settings.progress)
            learned = fit(data)
            report = feature_report(data, learned)
            base = replace(base, learned=learned)
            taus = taus_for_rates(data, learned, LEARNED_FALLBACK_RATES) if grid else taus
        elif grid:
            taus = TAU_GRIDS[base.criterion]
        mobiles += mobile_sweep(base, taus)
    runs, _ = policy_runs(llm, prompts, mobiles, settings.new_tokens, settings.progress)
    return replace(choose(runs, target, rule), learned=learned, learned_report=report), len(prompts)


def calibrate_sources(
    llm: LLM,
    sources: dict[str, list[str]],
    settings: EvalSettings,
    bases: list[PolicyConfig],
    target: float,
    grid: bool,
    rule: str = "lower-bound",
) -> tuple[list[SourceCalibration], SourceCalibration | None, LearnedImportance | None]:
    """Every criterion's taus on each source apart, then `calibrate_across` (eval/sources.py); the chosen criterion is the
    one whose final tau gives the lowest fallback rate over all sources. A `learned` criterion is fitted on every
    source's steps (the one deployed) and, for each fold, on the other sources' steps alone."""
    if not 0 < target <= 1:
        raise InvalidParameter(f"--target-agreement must be in (0, 1], got {target}")
    if len(sources) < 2:
        raise InvalidParameter("calibrating across sources needs at least two --source (three or more recommended)")
    prompts = {name: _prompts(llm, texts, settings)[0] for name, texts in sources.items()}
    mobiles: list[tuple[str, str | None, PolicyConfig]] = []  # (criterion, fold or None for the deployed one, policy)
    learned = None
    for base in bases:
        if base.criterion != "learned":
            taus = TAU_GRIDS[base.criterion] if grid else settings.taus
            mobiles += [(base.criterion, None, p) for p in mobile_sweep(base, taus)]
            continue
        steps = {name: collect(llm, [llm.encode(p.text) for p in ps], settings.new_tokens, base, settings.progress) for name, ps in prompts.items()}
        for fold in (None, *sources):
            data = merge([d for name, d in steps.items() if name != fold])
            model = fit(data)
            learned = model if fold is None else learned
            taus = taus_for_rates(data, model, LEARNED_FALLBACK_RATES) if grid else settings.taus
            mobiles += [("learned", fold, p) for p in mobile_sweep(replace(base, learned=model), taus)]
    runs = {name: policy_runs(llm, ps, [m for _, _, m in mobiles], settings.new_tokens, settings.progress)[0][-len(mobiles) :] for name, ps in prompts.items()}
    counts = {name: len(ps) for name, ps in prompts.items()}
    calibrations = []
    for base in bases:
        pick_runs = lambda fold, base=base: {name: [r for (c, f, _), r in zip(mobiles, runs[name]) if c == base.criterion and f == fold] for name in sources}
        folds = {name: pick_runs(name) for name in sources} if base.criterion == "learned" else None
        calibrations.append(calibrate_across(pick_runs(None), folds, counts, target, rule))
    ready = [c for c in calibrations if c.pooled is not None]
    chosen = min(ready, key=lambda c: c.pooled.fallback_rate) if ready else None  # type: ignore[union-attr]
    return calibrations, chosen, learned if chosen is not None and chosen.criterion == "learned" else None
