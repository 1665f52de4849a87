"""Sampling without host reads: the exponential race draws the token torch.multinomial draws, from the same generator."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mobile_moe.layers.sampler import exponential_race, sample

HOST_READING = {torch.ops.aten.multinomial.default, torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class AtenOps(TorchDispatchMode):
    """Records the aten overloads that run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _distributions(count: int) -> list[torch.Tensor]:
    """Peaked, flat and sparse distributions over a few vocabulary sizes."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        vocab = (7, 50, 1000)[i % 3]
        logits = torch.randn(vocab, generator=gen) * (0.5, 3.0, 8.0)[i % 3]
        probs = logits.softmax(-1)
        if i % 4 == 0:  # a nucleus-style cut: zeros the draw must never pick
            probs = probs.masked_fill(probs < probs.median(), 0.0)
            probs = probs / probs.sum()
        out.append(probs)
    return out


def test_the_exponential_race_draws_multinomials_token_for_the_same_generator_state():
    for seed, probs in enumerate(_distributions(300)):
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[0]
        got = exponential_race(probs, torch.Generator().manual_seed(seed))
        assert got.item() == want.item(), seed
        assert probs[got] > 0


def test_a_seeded_sampled_sequence_is_the_one_multinomial_gave():
    """Generation reuses one generator across tokens: the race consumes it exactly as multinomial did."""
    race, multi = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for probs in _distributions(60):
        assert exponential_race(probs, race).item() == torch.multinomial(probs, 1, generator=multi)[0].item()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_runs_no_op_that_reads_the_device_on_the_host(top_p: float):
    """torch.multinomial checks its input with two host reads inside; sampling must not call it (or any host read)."""
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    with AtenOps() as seen:
        token = sample(logits, 0.7, top_p, torch.Generator().manual_seed(2))
    assert token.dim() == 0 and token.dtype == torch.int64
    assert not HOST_READING & set(seen.ops), sorted(map(str, HOST_READING & set(seen.ops)))
