"""Which drafted tokens big keeps (exact mode, docs/design.md#exact-mode): greedy, a drafted token is kept when it is big's
own; sampling, speculative sampling keeps drafted token x with probability min(1, p_big(x) / p_little(x)) and draws the
token after a rejection from normalize(max(0, p_big - p_little)), so every emitted token follows big's distribution.

Benchmarks on random weights (where little's agreement with big says nothing of a trained model's) force the rate
instead (`forced`, bench only): each drafted token is kept with exactly that probability, whatever big says of it.
"""

from __future__ import annotations

import torch

from mobile_moe.layers.sampler import exponential_race, probabilities


def verdict_parts(
    logits: torch.Tensor,
    drafted: torch.Tensor,
    little_probs: torch.Tensor | None,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    forced: float | None = None,
) -> torch.Tensor:
    """Big's logits [R, V] over n = len(drafted) drafted positions (R = n, or n + 1 with the position after them), the
    drafted tokens [n] and little's distributions they were drawn from [n, V] (sampling) -> float64 [n + R] on the
    device: 1.0 where big keeps each drafted token if all before it were kept [n], then the token big emits after a
    first rejection at each drafted position and, with R = n + 1, after a full accept [R].

    forced (benchmarks on random weights only): a drafted token is kept with exactly this probability, drawn from
    `generator`, agreeing with big or not; a rejected one is replaced as usual."""
    n = drafted.shape[0]
    draws = torch.rand(n, generator=generator, device=logits.device) if forced is not None or temperature > 0 else None  # [n]
    if temperature == 0.0:
        tokens = logits.argmax(-1)  # [R]
        keep = tokens[:n] == drafted if forced is None or draws is None else draws < forced
        return torch.cat([keep.double(), tokens.double()])
    assert little_probs is not None and draws is not None, "sampled drafts keep little's distributions"
    big = probabilities(logits, temperature, top_p)  # [R, V]
    little = little_probs[:n]  # [n, V]
    if forced is not None:
        keep = draws < forced
    else:
        at = drafted[:, None]
        keep = draws < big[:n].gather(1, at)[:, 0] / little.gather(1, at)[:, 0].clamp_min(1e-30)  # P(keep) = min(1, p/q)
    residual = (big[:n] - little).clamp_min(0.0)  # [n, V]
    mass = residual.sum(-1, keepdim=True)  # [n, 1]
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), big[:n])  # p == q rejects only when forced: draw from p
    tokens = exponential_race(torch.cat([residual, big[n:]]), generator)  # [R]
    return torch.cat([keep.double(), tokens.double()])


def first_rejected(values: list[float], n: int) -> tuple[int | None, int]:
    """`verdict_parts`' host values for n drafted tokens -> (the first drafted position big rejects, None when it keeps
    all; the token it emits there, or after them: -1 when there is no position after them)."""
    wrong = next((i for i in range(n) if values[i] == 0.0), None)
    at = n if wrong is None else wrong
    return wrong, int(values[n + at]) if n + at < len(values) else -1
