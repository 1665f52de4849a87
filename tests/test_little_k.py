"""A little model of any size below big: `little_k` experts per token equals transformers run with that many, on every
path (single sequence, batched rows, compiled resident layers), and a calibration carries the size it was fitted with."""

from __future__ import annotations

import json
import logging
import shutil
import statistics

import pytest
import torch
from conftest import open_llm, small_cache
from test_datapath import Records
from test_parity import ATOL, reference_model

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.cli import main
from mobile_moe.cli.common import parse_variants
from mobile_moe.engine.calibration import CALIBRATION_FILE, read_calibration, resolve_policy
from mobile_moe.engine.runner import RunnerOptions
from mobile_moe.errors import InvalidParameter
from mobile_moe.eval.calibrate import Calibration
from mobile_moe.eval.quality import Run, variant_name

PROMPT = [7, 3, 44, 19, 28, 90, 11]
SAMPLING = SamplingParams(max_new_tokens=8, stop_at_eos=False)


# The top-n of a ranking is the prefix of its top-k, so little with n experts is transformers with num_experts_per_tok = n
# (see test_parity for why each architecture's weight rule agrees); n = k - 1 and n = 1 are the two ends.
@pytest.mark.parametrize("arch, n", [("olmoe", 3), ("qwen3_moe", 3), ("deepseek_v3", 1), ("gpt_oss", 3), ("mixtral", 1)])
def test_little_k_equals_transformers_with_that_many_experts(checkpoints, arch: str, n: int):
    ref = reference_model(checkpoints[arch], num_experts_per_tok=n)
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(llm.logits(PROMPT, "little", little_k=n), expected, atol=ATOL, rtol=0)
    got = llm.generate(PROMPT, SAMPLING, PolicyConfig("little", little_k=n, prefill="little"))
    assert got.token_ids == out[0, len(PROMPT) :].tolist()
    assert llm.generate(PROMPT, SAMPLING, PolicyConfig("little", prefill="little")).token_ids != got.token_ids or n == llm.runner.default_little_k


def test_a_little_k_decodes_alike_batched_compiled_and_alone(checkpoints):
    path = checkpoints["qwen3_moe"]
    alone = open_llm(path, dtype="float32")
    probe = alone.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=0.0, criterion="max_prob", little_k=3))
    tau = statistics.median(s.confidence for s in probe.steps[1:])  # about half the steps fall back
    policy = PolicyConfig("mobile", tau=tau, criterion="max_prob", little_k=3)
    want = [alone.generate(p, SAMPLING, policy) for p in (PROMPT, [5, 6, 7])]
    batched = open_llm(path, dtype="float32", max_batch=2, batch_little="always")
    assert [r.token_ids for r in batched.generate([PROMPT, [5, 6, 7]], SAMPLING, policy)] == [r.token_ids for r in want]
    compiled = LLM(path, engine_config(progress=False, dtype="float32", compile=True))
    compiled.reset_cache(compiled.loaded.store.total_experts)
    compiled.cache.load_all()
    got = compiled.generate(PROMPT, SAMPLING, policy)
    assert got.token_ids == want[0].token_ids and [s.fell_back for s in got.steps] == [s.fell_back for s in want[0].steps]
    assert 0 < got.stats.fallback_tokens < len(got.token_ids) - 1  # both passes ran


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])  # plain softmax; grouped routing, scaled, a dense first layer
def test_rows_with_different_little_models_decode_in_one_batch_as_each_alone(checkpoints, arch: str):
    """A batched step groups its little rows by little model (little_k, weight rule): every row equals its solo run."""
    passes: list[set[int | None]] = []  # the little_k of each batched pass's rows
    observe = lambda ctx: ctx.specs is not None and passes.append({s.little_k for s in ctx.specs})  # noqa: E731
    llm = open_llm(checkpoints[arch], RunnerOptions(observe=observe), dtype="float32", max_batch=5, batch_little="always")
    probe = llm.generate(PROMPT, SAMPLING, PolicyConfig("mobile", tau=0.0, criterion="max_prob", little_k=1))
    tau = statistics.median(s.confidence for s in probe.steps[1:])  # about half the steps fall back
    policies = [
        PolicyConfig("little", little_k=3),
        PolicyConfig("little"),
        PolicyConfig("little", little_k=1, little_weights="rescale"),
        PolicyConfig("big"),
        PolicyConfig("mobile", tau=tau, criterion="max_prob", little_k=1),
    ]
    prompts = [PROMPT, [5, 6], [7, 8, 9], [10, 11, 12, 13], PROMPT]  # the mobile row: the probed prompt, so about half fall back
    together = llm.generate(prompts, SAMPLING, policies)
    alone = [llm.generate(p, SAMPLING, policy) for p, policy in zip(prompts, policies)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.stats.fallback_tokens for r in together] == [r.stats.fallback_tokens for r in alone] and together[-1].stats.fallback_tokens > 0
    assert any(len(kinds) >= 3 for kinds in passes)  # rows of several little models shared passes


@pytest.mark.parametrize(
    "flag, message", [("0", "little_k must be an integer >= 1, got 0"), ("4", "little_k must be in [1, 3] (below this model's top-k 4), got 4")]
)
def test_a_little_k_the_model_cannot_take_is_a_one_line_error(checkpoints, capsys, flag: str, message: str):
    capsys.readouterr()
    code = main(
        [
            "generate",
            "--model",
            str(checkpoints["olmoe"]),
            "--prompt-ids",
            "1,2,3",
            "--policy",
            "little",
            "--little-k",
            flag,
            "--max-new-tokens",
            "2",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_calibration_carries_its_little_k_and_says_when_run_with_another(checkpoints, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(checkpoints["olmoe"], model)
    run = Run("mobile", 0.9, "max_prob", 0.99, 0.99, 0.9, 0.8, 0.2, 40, agreement_ci=(0.98, 1.0))
    record = Calibration(0.98, run, [run], "point").record(4, "data", "float32", little_k=3)
    (model / CALIBRATION_FILE).write_text(json.dumps(record))
    assert resolve_policy(PolicyConfig("mobile"), read_calibration(model)).little_k == 3
    assert resolve_policy(PolicyConfig("mobile", little_k=1), read_calibration(model)).little_k == 1  # an explicit value wins
    assert "little_k" not in Calibration(0.98, run, [run], "point").record(4, "data", "float32")  # the default: not written
    llm = open_llm(model, dtype="float32")
    plain = open_llm(checkpoints["olmoe"], dtype="float32")
    little = PolicyConfig("little", prefill="little")
    assert llm.generate(PROMPT, SAMPLING, little).token_ids == plain.generate(PROMPT, SAMPLING, PolicyConfig("little", little_k=3, prefill="little")).token_ids
    log, seen = logging.getLogger("mobile_moe"), Records()
    log.addHandler(seen)
    try:
        llm.resolve_policy(PolicyConfig("mobile", little_k=2))
    finally:
        log.removeHandler(seen)
    assert [r for r in seen.records if "fitted with little_k 3; running with 2" in r.getMessage()]


def test_generate_json_names_the_little_model_it_ran(checkpoints, capsys):
    capsys.readouterr()
    main(
        [
            "generate",
            "--model",
            str(checkpoints["olmoe"]),
            "--prompt-ids",
            "1,2,3",
            "--policy",
            "little",
            "--little-k",
            "1",
            "--max-new-tokens",
            "2",
            "--json",
            "--quiet",
        ]
    )
    assert json.loads(capsys.readouterr().out)["policy"]["little_k"] == 1


def test_a_bad_little_k_in_a_calibration_is_named(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"tau": 0.5, "criterion": "margin", "little_k": "half"}))
    with pytest.raises(InvalidParameter, match="little_k must be an integer >= 1, got 'half'"):
        read_calibration(tmp_path)


def test_eval_variants_sweep_little_k_and_label_it():
    plain, sized = parse_variants("plain,little-k=6+kv-repair=2")
    assert "little_k" not in plain  # a variant without it keeps the run's little_k
    assert sized["little_k"] == 6 and sized["kv_repair"] == 2
    assert variant_name(PolicyConfig("mobile", little_k=6, kv_repair=2)) == "little-k=6+kv-repair=2"
