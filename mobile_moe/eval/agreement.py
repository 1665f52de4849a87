"""Greedy-token agreement between a policy's continuations and big's."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def matching_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Agreement:
    """agreement: P(token equals big's | same prefix); overall: position-wise match share; exact_match: whole continuations."""

    agreement: float
    agreement_overall: float
    exact_match: float
    agreement_ci: tuple[float, float] = (1.0, 1.0)  # 95% bootstrap interval of `agreement`, resampling prompts


BOOTSTRAP_ROUNDS = 2000


def bootstrap_ci(matches: list[int], divergences: list[int], seed: int = 0, rounds: int = BOOTSTRAP_ROUNDS) -> tuple[float, float]:
    """95% interval of sum(matches) / sum(matches + divergences) over prompts resampled with replacement (seeded)."""
    if not matches:
        return (1.0, 1.0)
    gen = torch.Generator().manual_seed(seed)
    m, d = torch.tensor(matches, dtype=torch.float64), torch.tensor(divergences, dtype=torch.float64)
    picks = torch.randint(0, len(matches), (rounds, len(matches)), generator=gen)  # [rounds, prompts]
    judged = (m[picks] + d[picks]).sum(1)
    ratios = torch.where(judged > 0, m[picks].sum(1) / judged.clamp_min(1), torch.ones_like(judged))
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (lo, hi)


def compare(reference: list[list[int]], candidate: list[list[int]]) -> Agreement:
    """Compare continuations prompt by prompt.

    `agreement` counts, for each prompt, the tokens that match before the first divergence and one
    mismatch if it diverged: matches / (matches + divergences), the per-token chance of emitting big's
    token while the prefixes are still identical. `agreement_overall` compares every position.
    """
    matches = divergences = same_positions = positions = exact = 0
    per_matches, per_divergences = [], []
    for ref, cand in zip(reference, candidate):
        n = min(len(ref), len(cand))
        prefix = matching_prefix(ref[:n], cand[:n])
        per_matches.append(prefix)
        per_divergences.append(int(prefix < n))
        matches += prefix
        divergences += prefix < n
        same_positions += sum(x == y for x, y in zip(ref, cand))
        positions += max(len(ref), len(cand))
        exact += ref == cand
    judged = matches + divergences
    return Agreement(
        agreement=matches / judged if judged else 1.0,
        agreement_overall=same_positions / positions if positions else 1.0,
        exact_match=exact / len(reference) if reference else 1.0,
        agreement_ci=bootstrap_ci(per_matches, per_divergences),
    )
