"""Partial fallbacks: a fallback's big pass resumes at the first MoE layer little dropped much in, the layers before
keeping little's output. Checked against a pass that runs little's experts below that layer and big's from it."""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import open_llm

from mobile_moe import PolicyConfig, SamplingParams
from mobile_moe.engine.passes import PassSpec
from mobile_moe.engine.runner import PassContext
from mobile_moe.errors import InvalidParameter
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.little import first_dropping_layer

PROMPT = [7, 3, 44, 19, 28, 90, 11]
SAMPLING = SamplingParams(max_new_tokens=16, stop_at_eos=False)
ARCHS = ["qwen3_moe", "deepseek_v3", "olmoe"]  # a dense middle layer, a dense first layer, all MoE


class LayerModes:
    """The engine side of the oracle pass: little's experts below decoder layer `first_big`, big's from it."""

    def __init__(self, runner, first_big: int) -> None:
        self.little, self.big = PassContext(runner, runner.resolved(PassSpec(ExpertMode.LITTLE))), PassContext(runner, PassSpec(ExpertMode.BIG))
        self.first_big = first_big

    def at(self, index: int):
        return (self.little if index < self.first_big else self.big).at(index)


def oracle_pass(llm, ids: list[int], kv, first_big: int) -> torch.Tensor:
    """ids [T] through every layer from the embeddings, little below `first_big` and big from it -> last logits [V]."""
    with torch.inference_mode():
        return llm.runner.model(torch.tensor(ids), kv, LayerModes(llm.runner, first_big))


def test_first_dropping_layer_takes_the_first_above_the_share_else_the_most_dropping():
    weights = torch.tensor([[0.5, 0.4, 0.05, 0.05], [0.4, 0.2, 0.3, 0.1], [0.3, 0.2, 0.3, 0.2]])  # dropped 10%, 40%, 50%
    assert int(first_dropping_layer(weights, 2, 0.3)) == 1
    assert int(first_dropping_layer(weights, 2, 0.45)) == 2
    assert int(first_dropping_layer(weights, 2, 0.0)) == 0
    assert int(first_dropping_layer(weights, 2, 0.9)) == 2  # none above: where little dropped most


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positions", [1, 3])
def test_resumed_big_pass_equals_little_below_and_big_from_the_layer(checkpoints, arch: str, positions: int):
    """Little decode passes keep every layer's input; a big pass resumed at layer L over the last positions gives the
    logits of a pass running little below L and big from L at those positions (the earlier layers' KV stays little's)."""
    llm = open_llm(checkpoints[arch], expert_cache=6)
    runner, layers = llm.runner, len(llm.runner.model.model.layers)
    tokens = [5, 9, 14]
    for first in range(1, layers):
        kv = runner.new_kv(32)
        runner.forward(torch.tensor(PROMPT), kv, PassSpec(ExpertMode.BIG))
        kept = torch.zeros(len(tokens), layers, llm.runner.model.info.hidden)
        for i, token in enumerate(tokens):
            runner.forward(torch.tensor([token]), kv, PassSpec(ExpertMode.LITTLE), keep=kept[i])
        kv.rewind(positions)
        resume = (first, kept[len(tokens) - positions :, first])
        got = runner.forward(torch.tensor(tokens[len(tokens) - positions :]), kv, PassSpec(ExpertMode.BIG), resume=resume)
        oracle = runner.new_kv(32)
        runner.forward(torch.tensor(PROMPT), oracle, PassSpec(ExpertMode.BIG))
        for token in tokens[: len(tokens) - positions]:
            runner.forward(torch.tensor([token]), oracle, PassSpec(ExpertMode.LITTLE))
        want = oracle_pass(llm, tokens[len(tokens) - positions :], oracle, first)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert kv.length == oracle.length == len(PROMPT) + len(tokens)


def _median_tau(llm) -> float:
    probe = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=0.0, criterion="max_prob"))
    return statistics.median(s.confidence for s in probe.steps[1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_partial_fallback_replays_by_hand(checkpoints, arch: str):
    """Each fallback's token is that of the oracle pass from the first MoE layer little dropped more than the share in;
    share 0 (every layer drops something) is a full fallback, and a high share computes fewer experts."""
    llm = open_llm(checkpoints[arch], expert_cache=6)
    tau = _median_tau(llm)
    full = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob"))
    assert 0 < full.stats.fallback_tokens < SAMPLING.max_new_tokens - 1
    same = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob", partial_fallback=0.0))
    assert same.token_ids == full.token_ids and same.stats.expert_hits + same.stats.expert_misses == full.stats.expert_hits + full.stats.expert_misses
    share = 0.99
    result = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob", partial_fallback=share))
    assert result.stats.fallback_tokens > 0
    if result.stats.fallback_tokens == full.stats.fallback_tokens and result.token_ids == full.token_ids:
        assert result.stats.expert_hits + result.stats.expert_misses < full.stats.expert_hits + full.stats.expert_misses
    runner, tokens, little_k = llm.runner, result.token_ids, llm.runner.default_little_k
    kv = runner.new_kv(len(PROMPT) + len(tokens))
    assert int(runner.forward(torch.tensor(PROMPT), kv, PassSpec(ExpertMode.BIG)).argmax()) == tokens[0]
    for i, step in enumerate(result.steps[1:], start=1):
        before = kv.snapshot()
        little = runner.forward(torch.tensor([tokens[i - 1]]), kv, PassSpec(ExpertMode.LITTLE, record=True))
        expected = int(little.argmax())
        if step.fell_back:
            first = runner.model.info.moe_layers[int(first_dropping_layer(runner.weight_buf, little_k, share))]
            kv.restore(before)
            expected = int(oracle_pass(llm, [tokens[i - 1]], kv, first).argmax())
        assert tokens[i] == expected


def test_partial_fallback_with_repair_and_rollback_stays_consistent(checkpoints):
    """With repair and rollback, a partial fallback resumes every repaired position; the record stays whole."""
    llm = open_llm(checkpoints["olmoe"], expert_cache=6)
    tau = _median_tau(llm)
    policy = PolicyConfig("mobile", tau=tau, criterion="max_prob", kv_repair=4, rollback=True, partial_fallback=0.0)
    exact = llm.generate(PROMPT, SAMPLING, policy)
    assert exact.token_ids == llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob", kv_repair=4, rollback=True)).token_ids
    result = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob", kv_repair=4, rollback=True, partial_fallback=0.5))
    assert len(result.token_ids) == len(result.steps) == SAMPLING.max_new_tokens
    assert result.stats.fallback_tokens == sum(s.fell_back for s in result.steps) > 0


def test_partial_fallback_is_a_full_one_with_recurrent_layers(checkpoints):
    """Recurrent states go back only to before the step: the fallback then runs every layer."""
    llm = open_llm(checkpoints["qwen3_5_moe"], expert_cache=6)
    tau = _median_tau(llm)
    full = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob"))
    assert full.stats.fallback_tokens > 0
    assert llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob", partial_fallback=0.99)).token_ids == full.token_ids


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_partial_fallback_share_outside_zero_one_is_refused(share: float):
    with pytest.raises(InvalidParameter, match="partial-fallback share"):
        PolicyConfig("mobile", partial_fallback=share)
