"""Greedy-token agreement between a policy's continuations and big's."""

from __future__ import annotations

from dataclasses import dataclass


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


def compare(reference: list[list[int]], candidate: list[list[int]]) -> Agreement:
    """Compare continuations prompt by prompt.

    `agreement` counts, for each prompt, the tokens that match before the first divergence and one
    mismatch if it diverged: matches / (matches + divergences), the per-token chance of emitting big's
    token while the prefixes are still identical. `agreement_overall` compares every position.
    """
    matches = divergences = same_positions = positions = exact = 0
    for ref, cand in zip(reference, candidate):
        n = min(len(ref), len(cand))
        prefix = matching_prefix(ref[:n], cand[:n])
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
    )
