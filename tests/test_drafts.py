"""`bench --drafts`: the cycle model's arithmetic, the union of routed experts, and a run on a tiny model."""

from __future__ import annotations

import math

import pytest
from conftest import open_llm

from mobile_moe.bench.costinputs import model_cost
from mobile_moe.bench.drafts import drafts_table, expected_union, modelled_speedup, routed_sets, run_drafts
from mobile_moe.bench.profiles import PROFILES
from mobile_moe.experts.trace import Access


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
