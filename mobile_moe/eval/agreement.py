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
    """Decode-step agreement with big, from the first decode step on (the prefill token is scored apart).

    agreement: P(token equals big's | same prefix); overall: position-wise match share of decode positions;
    exact_match: whole continuations; prefill_agreement: share of prompts whose prefill token is big's.
    """

    agreement: float
    agreement_overall: float
    exact_match: float
    agreement_ci: tuple[float, float] = (1.0, 1.0)  # 95% bootstrap interval of `agreement`, resampling prompts
    prefill_agreement: float = 1.0
    judged_tokens: int = 0  # decode tokens scored by `agreement` (matches + divergences)
    divergences: int = 0
    per_prompt: tuple[tuple[int, int], ...] = ()  # (matches, divergences) of each judged prompt: pooling runs keeps the bootstrap exact


def pooled_agreement(per_prompt: list[tuple[int, int]]) -> tuple[float, tuple[float, float]]:
    """(agreement, 95% bootstrap CI) of prompts pooled from several runs."""
    matches, divergences = [m for m, _ in per_prompt], [d for _, d in per_prompt]
    judged = sum(matches) + sum(divergences)
    return (sum(matches) / judged if judged else 1.0), bootstrap_ci(matches, divergences)


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
    """Compare continuations prompt by prompt, from the first decode step on.

    The first token of each continuation comes from the prefill, which mobile runs with big: it would
    always match and flatter mobile over little, so it is only reported as `prefill_agreement`. For a
    prompt whose prefill tokens match, `agreement` counts the decode tokens that match before the first
    divergence and one mismatch if it diverged: matches / (matches + divergences), the per-token chance of
    emitting big's token while the prefixes are still identical. A prompt whose prefill tokens differ
    never shares big's prefix during decode, so it adds nothing to `agreement`.
    """
    same_positions = positions = exact = prefill_same = 0
    per_matches, per_divergences = [], []
    for ref, cand in zip(reference, candidate):
        exact += ref == cand
        prefill_same += ref[:1] == cand[:1]
        ref_decode, cand_decode = ref[1:], cand[1:]
        same_positions += sum(x == y for x, y in zip(ref_decode, cand_decode))
        positions += max(len(ref_decode), len(cand_decode))
        if ref[:1] != cand[:1]:
            continue
        n = min(len(ref_decode), len(cand_decode))
        prefix = matching_prefix(ref_decode[:n], cand_decode[:n])
        per_matches.append(prefix)
        per_divergences.append(int(prefix < n))
    matches, divergences = sum(per_matches), sum(per_divergences)
    judged = matches + divergences
    return Agreement(
        agreement=matches / judged if judged else 1.0,
        agreement_overall=same_positions / positions if positions else 1.0,
        exact_match=exact / len(reference) if reference else 1.0,
        agreement_ci=bootstrap_ci(per_matches, per_divergences),
        prefill_agreement=prefill_same / len(reference) if reference else 1.0,
        judged_tokens=judged,
        divergences=divergences,
        per_prompt=tuple(zip(per_matches, per_divergences)),
    )
