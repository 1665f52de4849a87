"""Fit the `learned` importance criterion: a logistic model of "little's token differs from big's" from step signals."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mobile_moe.config import LearnedImportance, PolicyConfig, SamplingParams
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import InvalidParameter
from mobile_moe.policy.importance import SIGNALS, differs_probability

ALWAYS_FALL_BACK = 2.0  # a margin tau above any margin: every step runs little, then big
L2 = 1e-3  # ridge penalty on the standardised weights


@dataclass(frozen=True)
class StepData:
    """Little-pass signals of every decode step on big's path, and whether little's greedy token differed from big's."""

    signals: torch.Tensor  # [N, len(SIGNALS)] float64
    differs: torch.Tensor  # [N] bool


def collect(llm: LLM, prompts: list[list[int]], new_tokens: int, base: PolicyConfig, progress: bool = True) -> StepData:
    """Decode every prompt with a fallback at every step: the little pass gives the signals, the big pass the label."""
    policy = dataclasses.replace(base, name="mobile", criterion="margin", tau=ALWAYS_FALL_BACK, learned=None, forced_fallback_rate=None, record_signals=True)
    sampling = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=True)
    rows, labels = [], []
    for ids in tqdm(prompts, desc="collecting signals", unit="prompt", disable=(not progress) or None, leave=False):
        for step in llm.generate(ids, sampling, policy).steps[1:]:  # steps[0] is the prefill token
            rows.append(step.signals)
            labels.append(step.first_token != step.token)
    return StepData(torch.tensor(rows, dtype=torch.float64).view(len(rows), len(SIGNALS)), torch.tensor(labels, dtype=torch.bool))


def merge(parts: list[StepData]) -> StepData:
    """The steps of several collections as one."""
    return StepData(torch.cat([p.signals for p in parts]), torch.cat([p.differs for p in parts]))


def fit(data: StepData, features: tuple[str, ...] = SIGNALS, steps: int = 200) -> LearnedImportance:
    """Ridge-penalised logistic regression on standardised signals (L-BFGS, deterministic)."""
    if not len(data.differs) or not bool(data.differs.any()) or bool(data.differs.all()):
        raise InvalidParameter("too little data to fit the learned criterion: little must both agree and differ with big (use more prompts)")
    x = data.signals[:, [SIGNALS.index(f) for f in features]]  # [N, F]
    y = data.differs.double()  # [N]
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    w = torch.zeros(len(features), dtype=torch.float64, requires_grad=True)
    prior = float(y.mean())
    b = torch.tensor(torch.logit(torch.tensor(prior)).item(), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + L2 * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)
    return LearnedImportance(
        features=features, mean=tuple(mean.tolist()), scale=tuple(scale.tolist()), weights=tuple(w.detach().tolist()), bias=float(b.detach())
    )


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties half."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return 0.5
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def feature_report(data: StepData, learned: LearnedImportance) -> dict:
    """Which signals matter: each one's standardised weight and its own AUC at flagging a differing token, and the model's AUC."""
    probability = differs_probability(data.signals.float(), learned)
    per_feature = {}
    for name, weight in zip(learned.features, learned.weights):
        column = data.signals[:, SIGNALS.index(name)]
        alone = auc(column, data.differs)
        per_feature[name] = {"weight": weight, "auc_alone": max(alone, 1.0 - alone)}  # direction-free
    return {"steps": int(data.differs.numel()), "differs": int(data.differs.sum()), "auc": auc(probability, data.differs), "features": per_feature}


def taus_for_rates(data: StepData, learned: LearnedImportance, rates: tuple[float, ...]) -> tuple[float, ...]:
    """Learned-confidence thresholds that would send each given share of the collected steps to big."""
    confidence = 1.0 - differs_probability(data.signals.float(), learned).double()
    return tuple(sorted({round(float(torch.quantile(confidence, rate)), 6) for rate in rates}))
