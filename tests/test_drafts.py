"""`bench --drafts`: the cycle model's arithmetic, the union of routed experts, and a run on a tiny model."""

from __future__ import annotations

import math

import pytest
from conftest import open_llm
from test_cli import assert_one_line_error, run

from mobile_moe import SamplingParams
from mobile_moe.bench.accept_rate import accept_rates_table, run_accept_rates
from mobile_moe.bench.bench import BenchSettings
from mobile_moe.bench.costinputs import model_cost
from mobile_moe.bench.costmodel import predict
from mobile_moe.bench.drafts import drafts_table, expected_union, forced_exact, modelled_speedup, replayed_tok_s, routed_sets, run_drafts
from mobile_moe.bench.profiles import PROFILES
from mobile_moe.config import PolicyConfig
from mobile_moe.experts.trace import Access, Trace


def test_modelled_speedup_counts_the_tokens_a_cycle_emits_against_its_passes():
    # p = 0.5, n = 2: 1 + 0.5 + 0.25 tokens per cycle of 2 little passes (1 each) and a 3-position big pass (4)
    assert modelled_speedup(0.5, 2, 1.0, [2.0, 3.0, 4.0]) == pytest.approx(1.75 * 2.0 / 6.0)
    assert modelled_speedup(1.0, 3, 0.5, [1.0, 1.0, 1.0, 1.0]) == pytest.approx(4 * 1.0 / 2.5)  # every draft accepted
    assert modelled_speedup(0.0, 1, 1.0, [1.0, 1.0]) == pytest.approx(0.5)  # nothing accepted: a little pass wasted per token


def test_the_union_of_routed_experts_is_taken_per_request_and_layer():
    raw = [
        (0, 1, 0, 5),
        (1, 2, 0, 1),
        (1, 2, 0, 2),
        (1, 2, 1, 9),
        (2, 3, 0, 2),
        (2, 3, 0, 3),
        (2, 3, 1, 9),
        (1, 5, 0, 7),
        (1, 5, 1, 4),
        (2, 6, 0, 7),
        (2, 6, 1, 8),
    ]
    runs = routed_sets([Access(s, p, "big", layer, e, True, "demand") for s, p, layer, e in raw])  # a second request starts at pass 5
    assert runs == [[[{1, 2}, {9}], [{2, 3}, {9}]], [[{7}, {4}], [{7}, {8}]]]
    assert expected_union(runs, 1) == pytest.approx((2 + 1 + 2 + 1 + 1 + 1 + 1 + 1) / 8)
    assert expected_union(runs, 2) == pytest.approx((3 + 1 + 1 + 2) / 4)


def test_a_drafts_run_measures_the_cycle_and_runs_exact_mode_beside_big(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=12, dtype="float32")
    cost = model_cost(llm.loaded.model, llm.loaded.store.expert_bytes)
    costs = run_drafts(llm, [[7, 3, 44, 19, 28]], 12, 12, cost, {"rtx4090": PROFILES["rtx4090"]}, drafts=(1, 3))
    assert 0.0 <= costs.acceptance <= 1.0 and costs.little_s > 0 and len(costs.big_s) == len(costs.union) == 9
    top_k = llm.info.top_k
    assert costs.union[0] == pytest.approx(top_k) and all(a <= b for a, b in zip(costs.union, costs.union[1:]))
    assert [row["draft"] for row in costs.rows] == [1, 3]
    for row in costs.rows:
        assert row["measured_speedup"] > 0 and math.isfinite(row["predicted_speedup"]["rtx4090"])
    assert "draft  modelled  measured  rtx4090" in drafts_table(costs)


def test_a_replay_counts_emitted_tokens_not_steps(checkpoints, one_thread):
    """Exact mode's steps whose tokens big takes back cost passes and emit nothing: a replayed speed is tokens over the
    replayed seconds (counting steps, every rejecting draft would look like free tokens)."""
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=12, dtype="float32")
    cost, hw = model_cost(llm.loaded.model, llm.loaded.store.expert_bytes), PROFILES["rtx4090"]
    trace = Trace()
    llm.reset_cache(12, trace)
    result = forced_exact(llm, 3, 0.0)([7, 3, 44, 19, 28], SamplingParams(max_new_tokens=12, stop_at_eos=False))  # every draft rejected
    replay = predict(trace.accesses, cost, hw, 12)
    tokens = len(result.token_ids) - 1
    assert replay.steps > tokens and result.stats.rolled_back_tokens > 0
    assert replayed_tok_s(trace.accesses, cost, hw, 12, tokens) == pytest.approx(tokens / replay.decode_s)


def test_forced_acceptance_rates_run_beside_big(checkpoints, one_thread):
    """Rate 0: each big pass emits one token, big's own; rate 1: every drafted token kept, a big pass per full draft."""
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=12, dtype="float32")
    cost = model_cost(llm.loaded.model, llm.loaded.store.expert_bytes)
    settings = BenchSettings([[7, 3, 44, 19, 28]], 9, PolicyConfig("big"), None, rounds=1)
    report = run_accept_rates(llm, settings, [0.0, 1.0], 3, cost, {"rtx4090": PROFILES["rtx4090"]}, probe=False)
    big, never, always, unfetched = report["systems"]
    assert [big["name"], never["name"], always["name"], unfetched["name"]] == ["big", "exact@0", "exact@1", "exact@0 no-prefetch"]
    assert unfetched["same_tokens_as_big"] == 1.0
    assert never["same_tokens_as_big"] == 1.0 and never["tokens_per_big_pass"] == pytest.approx(1.0)
    assert always["tokens_per_big_pass"] == pytest.approx(4.0)  # 8 decode tokens: 2 cycles of 3 drafts and big's token
    assert never["modelled_x_big"] < always["modelled_x_big"] and never["x_big"] > 0
    assert "exact@1" in accept_rates_table(report)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--accept-rate", "0.9"], "--accept-rate forces exact mode's acceptance in bench --drafts"),
        (["--drafts", "--synthetic", "olmoe-1b-7b"], "give the rates to force with --accept-rate"),
        (["--drafts", "--accept-rate", "0.9"], "give the rates to force with --accept-rate"),
        (["--drafts", "--synthetic", "olmoe-1b-7b", "--accept-rate", "0.9", "--kv-repair", "2"], "--kv-repair applies to --policy mobile only"),
    ],
)
def test_bench_accept_rate_flags_are_checked_before_loading(capsys, argv: list[str], message: str):
    code, _, err = run(capsys, "bench", *argv)
    assert_one_line_error(code, err, message)
