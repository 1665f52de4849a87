"""Prefix reuse: a request sharing a held sequence's prefix prefills only the rest, and its greedy tokens equal a cold
run's (float32) for every policy on GQA, MLA, DeltaNet and sliding-window models; what a little pass wrote never serves
a request whose cold run would write something else."""

from __future__ import annotations

import httpx
import pytest
from conftest import open_llm
from test_serve import serving

from mobile_moe import LLM, PolicyConfig, SamplingParams
from mobile_moe.engine.runner import RunnerOptions
from mobile_moe.errors import InvalidParameter
from mobile_moe.loading.budget import snapshot_bytes

PROMPT = [5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49]
SAMPLING = SamplingParams(max_new_tokens=8, stop_at_eos=False)
BIG, LITTLE = PolicyConfig("big"), PolicyConfig("little")
ALWAYS_BIG = PolicyConfig("mobile", tau=1.0, criterion="max_prob")  # every decode step falls back: big writes every reply position
NEVER_BIG = PolicyConfig("mobile", tau=0.0, criterion="max_prob")  # no step falls back: little writes every reply position
POLICIES = [BIG, LITTLE, PolicyConfig("mobile", forced_fallback_rate=0.5)]  # mobile: every other step falls back


def pair(path, **kw) -> tuple[LLM, LLM]:
    """(an engine reusing prefixes, one that never does), float32."""
    return open_llm(path, dtype="float32", **kw), open_llm(path, dtype="float32", prefix_cache=0, **kw)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "qwen3_5_moe"])  # GQA, MLA, Gated DeltaNet hybrid
def test_reuse_gives_a_cold_runs_tokens_for_every_policy(checkpoints, arch):
    warm, cold = pair(checkpoints[arch])
    recurrent = arch == "qwen3_5_moe"
    for policy in POLICIES:
        first = warm.generate(PROMPT, SAMPLING, policy)
        turn = PROMPT + first.token_ids + [7, 8, 9]  # a chat turn: the history, the reply, a new message
        part = PROMPT[:6] + [60, 61, 62]  # sharing only part of it
        for prompt in (turn, part, PROMPT, PROMPT):
            reused, fresh = warm.generate(prompt, SAMPLING, policy), cold.generate(prompt, SAMPLING, policy)
            assert reused.token_ids == fresh.token_ids, (policy, prompt)
            assert fresh.stats.reused_tokens == 0
        again = warm.generate(turn, SAMPLING, policy)  # after PROMPT itself: the turn extends it
        assert again.token_ids == cold.generate(turn, SAMPLING, policy).token_ids
        assert again.stats.prefix_hits == 1 and again.stats.reused_tokens >= len(PROMPT), policy  # and the reply, where big wrote it
        assert again.stats.reused_tokens == len(PROMPT) or not recurrent
    warm.generate(PROMPT, SAMPLING, BIG)
    same = warm.generate(PROMPT, SAMPLING, BIG)  # the very same prompt: all but its last token (whose logits are needed)
    assert same.stats.reused_tokens == (0 if recurrent else len(PROMPT) - 1)  # a recurrent model resumes only where a state was kept


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_big_written_replies_are_reused_and_little_written_ones_are_not(checkpoints, arch):
    warm, _ = pair(checkpoints[arch])
    recurrent = arch == "qwen3_5_moe"
    for policy, big_reply in ((BIG, True), (ALWAYS_BIG, True), (NEVER_BIG, False), (LITTLE, False)):
        reply = warm.generate(PROMPT, SAMPLING, policy).token_ids
        turn = warm.generate(PROMPT + reply + [7], SAMPLING, policy)
        written = len(PROMPT) + len(reply) - 1  # the last token of a reply is never fed back: no KV position holds it
        assert turn.stats.reused_tokens == (written if big_reply and not recurrent else len(PROMPT)), policy


def test_a_little_written_prefix_is_never_served_to_a_big_prefill(checkpoints):
    warm, _ = pair(checkpoints["qwen3_moe"])
    longer = PROMPT + [3, 4]
    warm.generate(PROMPT, SAMPLING, LITTLE)  # policy little prefills with little
    for policy in (BIG, ALWAYS_BIG):  # big and mobile prefill with big
        assert warm.generate(longer, SAMPLING, policy).stats.reused_tokens == 0
        warm.generate(PROMPT, SAMPLING, LITTLE)
    assert warm.generate(longer, SAMPLING, LITTLE).stats.reused_tokens == len(PROMPT)  # the same little model: reused
    assert warm.generate(PROMPT + [3], SAMPLING, PolicyConfig("little", little_k=1)).stats.reused_tokens == 0  # another little model
    warm.generate(PROMPT, SAMPLING, BIG)
    assert warm.generate(longer, SAMPLING, LITTLE).stats.reused_tokens == 0  # nor big-written entries to a little prefill
    layer_adaptive = PolicyConfig("little", layer_adaptive=0.5)  # a one-token chunk's experts chosen on the host: never shared
    warm.generate(PROMPT, SAMPLING, layer_adaptive)
    assert warm.generate(longer, SAMPLING, layer_adaptive).stats.reused_tokens == 0


def test_prefix_cache_zero_reuses_nothing(checkpoints):
    _, cold = pair(checkpoints["qwen3_moe"], max_batch=2)
    for _ in range(2):
        assert cold.generate(PROMPT, SAMPLING, BIG).stats.reused_tokens == 0
        assert [r.stats.reused_tokens for r in cold.generate([PROMPT, PROMPT + [1]], SAMPLING, BIG)] == [0, 0]
    assert cold.runner.prefix_bytes == 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_a_freed_batch_row_serves_the_next_request_with_its_prefix(checkpoints, arch):
    warm, cold = pair(checkpoints[arch], max_batch=2)
    other = [70, 71, 72, 73, 74]
    first = warm.generate([other, PROMPT], SAMPLING, BIG)  # PROMPT lands in row 1
    prompts = [PROMPT + first[1].token_ids + [7], other[:3] + [9]]  # PROMPT's turn asks first: it must find row 1, not the first free row
    reused = warm.generate(prompts, SAMPLING, BIG)
    assert [r.token_ids for r in reused] == [r.token_ids for r in cold.generate(prompts, SAMPLING, BIG)]
    recurrent = arch == "qwen3_5_moe"
    assert reused[0].stats.reused_tokens == len(PROMPT) + (0 if recurrent else len(first[1].token_ids) - 1)
    assert reused[1].stats.reused_tokens == (0 if recurrent else 3)
    assert warm.runner.prefix_bytes > 0


def test_few_recurrent_snapshots_drop_the_oldest_and_outputs_stay_equal(checkpoints):
    path = checkpoints["qwen3_5_moe"]
    one = open_llm(path, dtype="float32").runner.model
    gb = 1.5 * snapshot_bytes(one, one.lm_head.weight.dtype) / 2**30  # room for one snapshot
    warm, cold = (open_llm(path, dtype="float32", max_batch=2, prefix_cache=budget) for budget in (gb, 0))
    other = [70, 71, 72, 73, 74]
    warm.generate([PROMPT, other], SAMPLING, BIG)  # two rows finish: only the later one keeps its states
    prompts = [PROMPT + [7], other + [7]]
    reused = warm.generate(prompts, SAMPLING, BIG)
    assert [r.token_ids for r in reused] == [r.token_ids for r in cold.generate(prompts, SAMPLING, BIG)]
    assert sorted(r.stats.reused_tokens for r in reused) == [0, 5]


def test_the_plan_refuses_a_prefix_budget_under_one_sequences_states(checkpoints):
    with pytest.raises(InvalidParameter, match=r"--prefix-cache 1e-09 GB cannot hold one sequence's recurrent states") as err:
        open_llm(checkpoints["qwen3_5_moe"], prefix_cache=1e-9)
    assert "\n" not in str(err.value)
    assert open_llm(checkpoints["qwen3_moe"], prefix_cache=1e-9).runner.prefixes.enabled  # no recurrent states: any budget holds it


def test_ring_layers_reuse_only_what_the_ring_still_holds(checkpoints):
    options = RunnerOptions(kv_slack=8)  # sliding-window layers (window 4) keep rings of 12 slots
    warm, cold = (open_llm(checkpoints["gpt_oss"], options, dtype="float32", prefix_cache=gb) for gb in (1.0, 0))
    assert any(r is not None for r in warm.runner.new_kv(64).rings)
    long = list(range(3, 40))
    for prompt, kept in ((long, None), (long[:-1] + [90], len(long) - 1), (long[:20] + [91], 0)):  # 20: the ring no longer holds it
        reused, fresh = warm.generate(prompt, SAMPLING, BIG), cold.generate(prompt, SAMPLING, BIG)
        assert reused.token_ids == fresh.token_ids
        if kept is not None:
            assert reused.stats.reused_tokens == kept


def test_the_server_counts_prefix_hits_reused_tokens_and_bytes_held(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], dtype="float32", max_batch=2)
    with serving(llm, max_batch=2) as (url, _):
        for prompt in (PROMPT, PROMPT + [7, 8]):
            r = httpx.post(f"{url}/v1/completions", json={"model": "demo", "prompt": prompt, "max_tokens": 4}, timeout=60)
            assert r.status_code == 200, r.text
        metrics = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("mobile_moe_")}
    assert values["mobile_moe_prefix_hits_total"] == 1
    assert values["mobile_moe_reused_tokens_total"] >= len(PROMPT)
    assert values["mobile_moe_prefix_cache_bytes"] > 0
