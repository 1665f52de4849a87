"""Importance v2: the learned criterion and its storage, the little-pass knobs, and sampled perplexity windows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import open_llm

from mobile_moe import PolicyConfig, SamplingParams
from mobile_moe.cli import main
from mobile_moe.config import LearnedImportance
from mobile_moe.engine.calibration import CALIBRATION_FILE, read_calibration, resolve_policy
from mobile_moe.engine.passes import PassSpec
from mobile_moe.errors import InvalidParameter
from mobile_moe.eval.learned import StepData, auc, feature_report, fit
from mobile_moe.eval.quality import learned_confidence, sample_windows, variant_name
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.policy.importance import SIGNALS, differs_probability, signal_confidence, step_signals
from mobile_moe.policy.little import prefer_resident, runs_big_here

PROMPT = [7, 3, 44, 19, 28, 90, 11]
SAMPLING = SamplingParams(max_new_tokens=12, stop_at_eos=False)


def synthetic_steps(n: int = 400, seed: int = 0) -> StepData:
    """Signals where a low margin (and nothing else) makes little differ from big."""
    gen = torch.Generator().manual_seed(seed)
    signals = torch.rand(n, len(SIGNALS), generator=gen, dtype=torch.float64)
    margin = signals[:, SIGNALS.index("margin")]
    differs = torch.rand(n, generator=gen, dtype=torch.float64) > margin * 4  # margin < 0.25: likely to differ
    return StepData(signals, differs)


def test_fitted_predictor_ranks_by_the_informative_signal_and_round_trips_through_the_calibration_file(tmp_path):
    data = synthetic_steps()
    learned = fit(data)
    report = feature_report(data, learned)
    assert report["auc"] > 0.8
    weights = dict(zip(learned.features, learned.weights))
    assert weights["margin"] < 0 and abs(weights["margin"]) == max(abs(w) for w in weights.values())  # more margin, less likely to differ
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"version": 2, "criterion": "learned", "tau": 0.8, "learned": learned.to_dict()}))
    policy = resolve_policy(PolicyConfig("mobile"), read_calibration(tmp_path))
    assert policy.criterion == "learned" and policy.tau == 0.8 and policy.learned == learned
    confidence = signal_confidence(data.signals.float(), "learned", policy.learned)
    assert torch.allclose(confidence, 1 - differs_probability(data.signals.float(), learned))


def test_step_signals_read_the_logits_and_each_layers_kept_and_dropped_weights():
    logits = torch.tensor([4.0, 1.5, 0.5, -1.0])
    raw = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])  # [L, k], little keeps 2 of 4
    got = dict(zip(SIGNALS, step_signals(logits, raw, 2).tolist()))
    probs = logits.softmax(-1)
    assert got["logit_gap"] == pytest.approx(2.5, abs=1e-5) and got["log_max_prob"] == pytest.approx(float(probs[0].log()), abs=1e-6)
    assert got["margin"] == pytest.approx(float(probs[0] - probs[1]), abs=1e-6)
    assert got["dropped_max"] == pytest.approx(0.3) and got["dropped_min"] == pytest.approx(0.2) and got["dropped_last"] == pytest.approx(0.2)
    assert got["router_top1_mean"] == pytest.approx((0.4 + 0.7) / 2)
    assert got["cut_gap_min"] == pytest.approx(0.0, abs=1e-7) and got["cut_gap_mean"] == pytest.approx((0.1 + 0.0) / 2)


def test_a_calibration_fitted_on_fewer_signals_still_decides_by_its_own(tmp_path):
    """A record naming only the first eight signals (fitted before more were added) gives the same confidence."""
    data = synthetic_steps()
    old = fit(data, SIGNALS[:8])
    columns = [SIGNALS.index(f) for f in old.features]
    z = (data.signals[:, columns] - torch.tensor(old.mean, dtype=torch.float64)) / torch.tensor(old.scale, dtype=torch.float64)
    want = 1 - torch.sigmoid(z @ torch.tensor(old.weights, dtype=torch.float64) + old.bias)
    assert torch.allclose(signal_confidence(data.signals.float(), "learned", old).double(), want, atol=1e-5)


def test_a_version_one_calibration_still_loads(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"tau": 0.04, "criterion": "margin", "agreement": 0.98, "fallback_rate": 0.2}))
    policy = resolve_policy(PolicyConfig("mobile"), read_calibration(tmp_path))
    assert (policy.criterion, policy.tau, policy.learned) == ("margin", 0.04, None)
    with pytest.raises(InvalidParameter, match="needs a fitted predictor"):
        resolve_policy(PolicyConfig("mobile", criterion="learned"), read_calibration(tmp_path))


def test_a_policy_takes_the_kv_repair_its_tau_was_calibrated_with(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"tau": 0.04, "criterion": "margin", "kv_repair": 4}))
    record = read_calibration(tmp_path)
    assert resolve_policy(PolicyConfig("mobile"), record).kv_repair == 4
    assert resolve_policy(PolicyConfig("mobile", kv_repair=0), record).kv_repair == 0  # an explicit value wins
    assert resolve_policy(PolicyConfig("mobile"), {}).kv_repair == 0  # no record (or one from before): no repair
    assert resolve_policy(PolicyConfig("mobile"), record).rollback is False  # a record without it: no rollback
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"tau": 0.04, "criterion": "margin", "kv_repair": 4, "rollback": True}))
    assert resolve_policy(PolicyConfig("mobile"), read_calibration(tmp_path)).rollback is True
    assert resolve_policy(PolicyConfig("mobile", rollback=False), read_calibration(tmp_path)).rollback is False
    assert resolve_policy(PolicyConfig("mobile", kv_repair=0), read_calibration(tmp_path)).rollback is False  # repair off: nothing to check


@pytest.mark.parametrize(
    "record, message",
    [
        ({"tau": 0.5, "criterion": "telepathy"}, "unknown criterion 'telepathy'"),
        ({"tau": 0.5, "criterion": "margin", "kv_repair": -1}, "kv_repair must be an integer >= 0"),
        ({"tau": 0.5, "criterion": "margin", "kv_repair": 4, "rollback": "yes"}, "rollback must be true or false"),
        (
            {"tau": 0.5, "criterion": "learned", "learned": {"features": ["margin"], "mean": [0.1], "scale": [1.0], "weights": [1.0, 2.0], "bias": 0}},
            "one mean, scale and weight per feature",
        ),
        ({"tau": 0.5, "criterion": "learned", "learned": {"features": ["margin"], "mean": [0.1], "scale": [1.0], "weights": [1.0]}}, "malformed"),
        (
            {"tau": 0.5, "criterion": "learned", "learned": {"features": ["aura"], "mean": [0.1], "scale": [1.0], "weights": [1.0], "bias": 0}},
            "unknown signals aura",
        ),
    ],
)
def test_a_bad_calibration_file_is_a_one_line_error(checkpoints, tmp_path, capsys, record, message):
    (tmp_path / "copy").mkdir()  # the checkpoint's files, linked, plus its own calibration
    for item in checkpoints["qwen3_moe"].iterdir():
        (tmp_path / "copy" / item.name).symlink_to(item)
    (tmp_path / "copy" / CALIBRATION_FILE).write_text(json.dumps(record))
    capsys.readouterr()
    code = main(["generate", "--model", str(tmp_path / "copy"), "--prompt-ids", "1,2,3", "--policy", "mobile", "--max-new-tokens", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_learned_importance_rejects_bad_numbers():
    with pytest.raises(InvalidParameter):
        LearnedImportance(("margin",), (0.0,), (0.0,), (1.0,), 0.0)  # zero scale
    with pytest.raises(InvalidParameter, match="version"):
        LearnedImportance(("margin",), (0.0,), (1.0,), (1.0,), 0.0, version=99)


def test_auc_orders_scores():
    positive = torch.tensor([True, True, False, False])
    assert auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), positive) == 1.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), positive) == 0.5


def test_layer_adaptive_little_spans_little_to_big(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=6)
    big = llm.generate(PROMPT, SAMPLING, PolicyConfig("big")).token_ids
    little = llm.generate(PROMPT, SAMPLING, PolicyConfig("little", prefill="big")).token_ids
    assert big != little  # the tiny model's halves disagree, so the limits below are informative
    always = llm.generate(PROMPT, SAMPLING, PolicyConfig("little", prefill="big", layer_adaptive=0.0)).token_ids  # any dropped weight: big
    never = llm.generate(PROMPT, SAMPLING, PolicyConfig("little", prefill="big", layer_adaptive=1.0)).token_ids
    assert always == big and never == little


def test_runs_big_here_and_prefer_resident_decide_per_layer():
    assert runs_big_here([0.4, 0.3, 0.2, 0.1], 2, 0.25) and not runs_big_here([0.4, 0.3, 0.2, 0.1], 2, 0.35)
    experts, scores = [10, 11, 12, 13], [0.4, 0.3, 0.2, 0.1]
    cached = {12, 13}
    assert prefer_resident(experts, scores, 2, cached.__contains__, 1.0) == [0, 1]  # nothing within a factor of 1
    assert prefer_resident(experts, scores, 2, cached.__contains__, 1.6) == [0, 2]  # 0.2 * 1.6 >= 0.3: rank 1 swapped
    assert prefer_resident(experts, scores, 2, cached.__contains__, 4.0) == [2, 3]  # both swapped, weakest kept first
    assert prefer_resident(experts, scores, 2, {10, 11}.__contains__, 4.0) == [0, 1]  # kept ones are resident already


def test_cache_aware_little_loads_fewer_experts(checkpoints):
    llm = open_llm(checkpoints["qwen3_moe"], expert_cache=6)
    plain = llm.generate(PROMPT, SAMPLING, PolicyConfig("little"))
    llm.reset_cache(6)
    aware = llm.generate(PROMPT, SAMPLING, PolicyConfig("little", cache_prior=8.0))
    assert aware.stats.decode_expert_misses < plain.stats.decode_expert_misses


def test_perplexity_windows_are_seeded_and_spread_over_files():
    files = [list(range(i * 1000, i * 1000 + 300)) for i in range(10)]  # 10 files of 300 tokens
    windows = sample_windows(files, 64, 500, seed=3)
    assert windows == sample_windows(files, 64, 500, seed=3)
    assert sum(len(ids) - 1 for _, ids in windows) == 500
    assert len({f for f, _ in windows}) >= 4  # not just the first files
    assert all(ids[0] // 1000 == f and len(ids) <= 65 for f, ids in windows)


def test_eval_variants_parse_and_reject_unknown_knobs(capsys):
    from mobile_moe.cli.common import parse_variants

    plain = {"layer_adaptive": None, "cache_prior": None, "kv_repair": 0, "rollback": False, "partial_fallback": None}
    assert parse_variants("plain,layer-adaptive=0.3,cache-prior=2+kv-repair=1,kv-repair=8+rollback,partial-fallback=0.3+kv-repair=2") == (
        plain,
        {**plain, "layer_adaptive": 0.3},
        {**plain, "cache_prior": 2.0, "kv_repair": 1},
        {**plain, "kv_repair": 8, "rollback": True},
        {**plain, "partial_fallback": 0.3, "kv_repair": 2},
    )
    labelled = PolicyConfig("mobile", kv_repair=4, rollback=True, partial_fallback=0.3)
    assert variant_name(labelled) == "kv-repair=4+partial-fallback=0.3+rollback"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--variants", "plain,turbo=3"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "variants are plain or knobs" in err and len(err.splitlines()) == 1


def test_teacher_forced_learned_confidence_equals_each_decode_steps_own(checkpoints):
    """The perplexity estimate's learned confidence at position t (one little pass over the window, every position's gate
    values logged) is what a little decode step from the prefix up to t computes from its recorded routing."""
    llm = open_llm(checkpoints["deepseek_v2"], expert_cache=16)  # a dense first layer: only MoE layers are logged
    learned = LearnedImportance(
        SIGNALS, tuple(0.1 * i for i in range(len(SIGNALS))), (1.0,) * len(SIGNALS), tuple((-1) ** i * 0.3 for i in range(len(SIGNALS))), 0.2
    )
    logits, gates = llm.routed_logits(PROMPT, "little")  # [T, V], [T, L, k]
    assert gates.shape == (len(PROMPT), len(llm.info.moe_layers), llm.info.top_k)
    got = learned_confidence(logits, gates, llm.runner.default_little_k, learned)
    for t in (0, 3, len(PROMPT) - 1):
        kv = llm.runner.new_kv(t + 1)
        step = llm.runner.forward(torch.tensor(PROMPT[: t + 1]), kv, PassSpec(ExpertMode.LITTLE, record=True))  # [V]
        want = signal_confidence(step_signals(step, llm.runner.weight_buf, llm.runner.default_little_k), "learned", learned)
        torch.testing.assert_close(got[t], want, rtol=1e-4, atol=1e-5)
