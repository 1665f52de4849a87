"""MoBiLE decoding: its two limits (tau = 0, tau > 1) and, in between, every token from the right pass."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import open_llm

from mobile_moe import PolicyConfig, SamplingParams
from mobile_moe.engine.passes import PassSpec
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.importance import confidence

PROMPT = [7, 3, 44, 19, 28, 90, 11]
SAMPLING = SamplingParams(max_new_tokens=16, stop_at_eos=False)
ARCHS = ["qwen3_moe", "deepseek_v3", "olmoe"]
HYBRIDS = ["qwen3_5_moe", "qwen3_5_moe_text"]  # Gated DeltaNet (recurrent) + full-attention layers


@pytest.mark.parametrize("arch", ARCHS + HYBRIDS)  # hybrids: never falls back, so no snapshot is restored
def test_tau_zero_with_little_prefill_is_little(checkpoints, arch):
    llm = open_llm(checkpoints[arch], expert_cache=6)
    little = llm.generate(PROMPT, SAMPLING, PolicyConfig("little"))
    mobile = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=0.0, prefill="little"))
    assert mobile.token_ids == little.token_ids
    assert mobile.stats.fallback_tokens == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_tau_above_one_is_big(checkpoints, arch):
    llm = open_llm(checkpoints[arch], expert_cache=6)
    big = llm.generate(PROMPT, SAMPLING, PolicyConfig("big"))
    mobile = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=1.5))
    assert mobile.token_ids == big.token_ids
    assert mobile.stats.fallback_tokens == SAMPLING.max_new_tokens - 1  # every decode step; the first token is prefill's


@pytest.mark.parametrize("arch", ARCHS)
def test_middle_tau_emits_little_or_big_token_and_counts_fallbacks(checkpoints, arch):
    llm = open_llm(checkpoints[arch], expert_cache=6)
    probe = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=0.0))
    tau = statistics.median(s.confidence for s in probe.steps[1:])
    result = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau))
    fell_back = [s.fell_back for s in result.steps]
    assert 0 < sum(fell_back) < len(fell_back) - 1
    assert result.stats.fallback_tokens == sum(fell_back)

    # Replay the decode loop by hand: little pass, accept if confident, else rewind and take the big token.
    runner, tokens = llm.runner, result.token_ids
    kv = runner.new_kv(len(PROMPT) + len(tokens))
    assert int(runner.forward(torch.tensor(PROMPT), kv, PassSpec(ExpertMode.BIG)).argmax()) == tokens[0]
    for i, step in enumerate(result.steps[1:], start=1):
        ids = torch.tensor([tokens[i - 1]])
        little = runner.forward(ids, kv, PassSpec(ExpertMode.LITTLE))
        conf = confidence(little, "max_prob")
        assert step.confidence == pytest.approx(conf, abs=1e-6)
        assert step.fell_back == (conf < tau)
        if step.fell_back:
            kv.rewind(1)
            expected = int(runner.forward(ids, kv, PassSpec(ExpertMode.BIG)).argmax())
        else:
            expected = int(little.argmax())
        assert tokens[i] == expected


def test_fallback_prefetches_the_other_half(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=12)
    result = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=1.5))
    assert result.stats.prefetched > 0
    no_prefetch = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=1.5, prefetch_on_fallback=False))
    assert no_prefetch.stats.prefetched == 0
    assert no_prefetch.token_ids == result.token_ids


def test_little_loads_fewer_experts_than_big(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=4)
    big = llm.generate(PROMPT, SAMPLING, PolicyConfig("big"))
    little = llm.generate(PROMPT, SAMPLING, PolicyConfig("little"))
    assert little.stats.expert_hits + little.stats.expert_misses < big.stats.expert_hits + big.stats.expert_misses
    assert little.stats.h2d_bytes < big.stats.h2d_bytes


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(checkpoints):
    llm = open_llm(checkpoints["mixtral"], expert_cache=3)
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=123, stop_at_eos=False)
    a = llm.generate(PROMPT, params, PolicyConfig("mobile", tau=0.5)).token_ids
    b = llm.generate(PROMPT, params, PolicyConfig("mobile", tau=0.5)).token_ids
    greedy = llm.generate(PROMPT, SamplingParams(max_new_tokens=12, stop_at_eos=False)).token_ids
    assert a == b
    assert a != greedy


def test_agreement_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    from mobile_moe.eval.agreement import bootstrap_ci, compare

    reference = [[1, 2, 3, 4, 5, 6]] * 30
    candidate = [[1, 2, 3, 4, 5, 6]] * 24 + [[1, 2, 9, 4, 5, 6]] * 6  # 6 prompts diverge at their third token
    a = compare(reference, candidate)
    lo, hi = a.agreement_ci
    assert lo < a.agreement < hi <= 1.0
    assert a.agreement_ci == compare(reference, candidate).agreement_ci  # same seed, same interval
    assert bootstrap_ci([5, 5], [0, 0]) == (1.0, 1.0)  # nothing diverged in any resample


def test_agreement_starts_at_the_first_decode_step():
    from mobile_moe.eval.agreement import compare

    only_prefill_differs = compare([[7, 1, 2, 3]] * 4, [[8, 1, 2, 3]] * 4)
    assert only_prefill_differs.prefill_agreement == 0.0
    assert only_prefill_differs.judged_tokens == 0 and only_prefill_differs.agreement_overall == 1.0  # decode positions all match
    first_decode_differs = compare([[7, 1, 2, 3]] * 4, [[7, 9, 2, 3]] * 4)
    assert first_decode_differs.agreement == 0.0  # the free prefill token earns no credit
    assert first_decode_differs.prefill_agreement == 1.0 and first_decode_differs.divergences == 4
    mixed = compare([[7, 1, 2, 3], [7, 1, 2, 3]], [[8, 9, 9, 9], [7, 1, 2, 3]])
    assert mixed.agreement == 1.0 and mixed.judged_tokens == 3  # the prompt that diverged at prefill is not scored


def test_kv_repair_gives_big_its_own_kv_at_every_fallback(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=6)
    probe = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=0.0, criterion="max_prob"))
    tau = statistics.median(s.confidence for s in probe.steps[1:])
    repaired = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob", kv_repair=64))
    assert 0 < repaired.stats.fallback_tokens < SAMPLING.max_new_tokens - 1
    # Replay: at a fallback, big recomputes every position little wrote since the last big pass, so its logits are
    # those of a big forward over the whole sequence so far.
    tokens = repaired.token_ids
    for i, step in enumerate(repaired.steps[1:], start=1):
        if step.fell_back:
            whole = llm.logits(PROMPT + tokens[:i], "big")[-1]  # [V]
            assert tokens[i] == int(whole.argmax())


@pytest.mark.parametrize("arch", HYBRIDS)
def test_hybrid_tau_above_one_is_big_for_32_steps(checkpoints, arch):
    """Every step falls back: the recurrent states are restored from the snapshot taken before each little pass."""
    llm = open_llm(checkpoints[arch], expert_cache=6)
    sampling = SamplingParams(max_new_tokens=33, stop_at_eos=False)
    big = llm.generate(PROMPT, sampling, PolicyConfig("big"))
    mobile = llm.generate(PROMPT, sampling, PolicyConfig("mobile", tau=1.5))
    assert mobile.token_ids == big.token_ids
    assert mobile.stats.fallback_tokens == 32
    repaired = llm.generate(PROMPT, sampling, PolicyConfig("mobile", tau=1.5, kv_repair=8))  # repair is 0 with recurrent layers
    assert repaired.token_ids == big.token_ids


def test_hybrid_middle_tau_replays_with_snapshots(checkpoints):
    """Mixed little and big steps: replay by hand, restoring a snapshot (KV length + recurrent states) at each fallback."""
    llm = open_llm(checkpoints["qwen3_5_moe"], expert_cache=6)
    probe = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=0.0))
    tau = statistics.median(s.confidence for s in probe.steps[1:])
    result = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob"))
    assert 0 < result.stats.fallback_tokens < SAMPLING.max_new_tokens - 1
    runner, tokens = llm.runner, result.token_ids
    kv = runner.new_kv(len(PROMPT) + len(tokens))
    assert kv.recurrent and int(runner.forward(torch.tensor(PROMPT), kv, PassSpec(ExpertMode.BIG)).argmax()) == tokens[0]
    for i, step in enumerate(result.steps[1:], start=1):
        ids, before = torch.tensor([tokens[i - 1]]), kv.snapshot()
        little = runner.forward(ids, kv, PassSpec(ExpertMode.LITTLE))
        assert step.fell_back == (confidence(little, "max_prob") < tau)
        if step.fell_back:
            kv.restore(before)
            expected = int(runner.forward(ids, kv, PassSpec(ExpertMode.BIG)).argmax())
        else:
            expected = int(little.argmax())
        assert tokens[i] == expected
    with pytest.raises(ValueError, match="restore a snapshot"):
        kv.rewind(1)


def _quantile_tau(llm, prompt: list[int], q: float) -> float:
    """The q-quantile of little's max-prob confidence over a decode of `prompt`: a tau falling back on about q of the steps."""
    probe = llm.generate(prompt, SAMPLING, PolicyConfig("mobile", tau=0.0, criterion="max_prob"))
    confs = sorted(s.confidence for s in probe.steps[1:])
    return confs[int(q * len(confs))]


# (arch, prompt, fallback share) where, on these fixtures, repair alone leaves one of little's slips in place
SLIPS = [("qwen3_moe", [40, 41, 12, 60, 3], 0.5), ("olmoe", [5, 6, 7, 8], 0.25), ("deepseek_v3", [5, 6, 7, 8], 0.25)]


@pytest.mark.parametrize("arch, prompt, share", SLIPS)
def test_rollback_makes_every_token_up_to_the_last_fallback_bigs(checkpoints, arch: str, prompt: list[int], share: float):
    """With repair over every little position, a fallback checks each little token since the last big pass against big;
    from the first it disagrees with, little's tokens are taken back: everything up to the last fallback is big's."""
    llm = open_llm(checkpoints[arch], expert_cache=6)
    tau = _quantile_tau(llm, prompt, share)
    big = llm.generate(prompt, SAMPLING, PolicyConfig("big")).token_ids
    for rollback in (False, True):
        result = llm.generate(prompt, SAMPLING, PolicyConfig("mobile", tau=tau, criterion="max_prob", kv_repair=64, rollback=rollback))
        last = max(i for i, s in enumerate(result.steps) if s.fell_back)
        assert len(result.token_ids) == len(result.steps) == SAMPLING.max_new_tokens
        assert (result.token_ids[: last + 1] == big[: last + 1]) == rollback  # without rollback little's slip stays
        assert (result.stats.rolled_back_tokens > 0) == rollback
        assert result.stats.fallback_tokens == sum(s.fell_back for s in result.steps)


def test_rollback_streams_only_tokens_no_rollback_can_take_back(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=6)
    prompt = [40, 41, 12, 60, 3]
    policy = PolicyConfig("mobile", tau=_quantile_tau(llm, prompt, 0.5), criterion="max_prob", kv_repair=4, rollback=True)
    streamed: list[int] = []
    result = llm.generate(prompt, SAMPLING, policy, on_token=lambda t: streamed.append(t) or True)
    assert result.stats.rolled_back_tokens > 0 and streamed == result.token_ids
    cut: list[int] = []
    stopped = llm.generate(prompt, SAMPLING, policy, on_token=lambda t: cut.append(t) or len(cut) < 5)
    assert stopped.finish_reason == "cancelled" and cut == stopped.token_ids == result.token_ids[:5] and len(stopped.steps) == 5
    sampled = llm.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0.8, seed=1, stop_at_eos=False), policy)
    assert sampled.stats.rolled_back_tokens == 0  # a sampled token has no one right answer to check: repair only


def test_teacher_forced_perplexity_counts_what_a_rollback_takes_back():
    """A little position is scored by big when it falls back, or, with rollback N, when its greedy token is not big's and
    a fallback follows within N positions of the same window."""
    from mobile_moe.eval.quality import TokenScores, big_positions, mobile_perplexity

    scores = TokenScores(
        big=torch.full((6,), -1.0),
        little=torch.full((6,), -2.0),
        little_conf=torch.tensor([0.9, 0.9, 0.1, 0.9, 0.9, 0.1]),
        differs=torch.tensor([True, True, False, True, True, False]),
        window=torch.tensor([0, 0, 0, 0, 1, 1]),
    )
    assert big_positions(scores, 0.5).tolist() == [False, False, True, False, False, True]
    assert big_positions(scores, 0.5, rollback=1).tolist() == [False, True, True, False, True, True]
    assert big_positions(scores, 0.5, rollback=2).tolist() == [True, True, True, False, True, True]  # 3: the fallback is in the next window
    assert mobile_perplexity(scores, 0.5, rollback=2) == pytest.approx(math.exp((5 * 1.0 + 2.0) / 6))
