"""The shipped demo model: offline generation with no --model, eval metrics, calibration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mobile_moe.cli import main
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.eval import corpus

RUN_FIELDS = ("policy", "tau", "agreement", "agreement_overall", "exact_match", "next_line_exact", "fallback_rate")


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory) -> Path:
    """A small slice of the held-out test split: its first three files."""
    root = tmp_path_factory.mktemp("slice")
    for i, text in enumerate(corpus.load_split("test")[:3]):
        (root / f"part{i}.py").write_text(text)
    return root


@pytest.fixture()
def demo_copy(tmp_path) -> Path:
    """The demo model copied, so calibration does not write into the package."""
    dst = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL, dst)
    (dst / "mobile_moe.json").unlink(missing_ok=True)
    return dst


def test_demo_model_is_small_and_records_its_recipe():
    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir())
    assert size <= 40 * 2**20
    recipe = json.loads((DEMO_MODEL / "training.json").read_text())
    assert recipe["corpus"]["hash"] and recipe["recipe"]["seed"] is not None and recipe["final_validation_loss"] > 0


def test_generate_without_model_runs_offline_and_writes_python():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mobile_moe.cli", "generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "40", "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    text = out["text"]
    assert len(out["token_ids"]) > 5
    assert "\n" in text and any(word in text for word in ("return", "if ", " = ", "(")), text


def test_eval_reports_every_metric_for_every_policy(slice_dir, tmp_path, capsys):
    plot = tmp_path / "taus.png"
    capsys.readouterr()
    code = main(
        [
            "eval",
            "--data",
            str(slice_dir),
            "--max-prompts",
            "3",
            "--new-tokens",
            "8",
            "--ppl-tokens",
            "200",
            "--expert-cache",
            "64",
            "--taus",
            "0.5,0.9",
            "--variants",
            "plain,layer-adaptive=0.3,kv-repair=4+rollback",
            "--json",
            "--quiet",
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"]["big"] > 1 and report["perplexity"]["little"] > 1
    assert "calibrated_tau" in report
    policies = [(r["policy"], r["tau"]) for r in report["runs"]]
    assert ("big", None) in policies and ("little", None) in policies
    assert {t for p, t in policies if p == "mobile"} >= {0.5, 0.9}
    for run in report["runs"]:
        assert set(RUN_FIELDS) <= set(run)
        assert 0.0 <= run["agreement"] <= 1.0 and 0.0 <= run["fallback_rate"] <= 1.0
    big = next(r for r in report["runs"] if r["policy"] == "big")
    assert big["agreement"] == 1.0 and big["fallback_rate"] == 0.0
    assert 1 <= report["perplexity"]["files"] <= report["perplexity"]["files_total"] == 3  # how many files the windows came from
    assert {(r["policy"], r["variant"]) for r in report["runs"]} >= {
        ("little", ""),
        ("little", "layer-adaptive=0.3"),
        ("mobile", "layer-adaptive=0.3"),
        ("mobile", "kv-repair=4+rollback"),
    }
    assert all(r["rolled_back_rate"] == 0.0 for r in report["runs"] if "rollback" not in r["variant"])  # only rollback takes tokens back
    plain_little = next(r for r in report["runs"] if (r["policy"], r["variant"]) == ("little", ""))
    assert report["cache_slots"] == 64 and big["loads_per_token"] > plain_little["loads_per_token"] > 0  # the frontier's x axis
    assert plot.stat().st_size > 1000


def test_eval_per_source_reports_and_plots_each_source_apart(slice_dir, tmp_path, capsys):
    """`eval --source A --source B`: one report per source (its own prompts), one frontier panel each."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "mod.py").write_text(corpus.load_split("test")[5])
    plot = tmp_path / "sources.png"
    capsys.readouterr()
    code = main(
        [
            "eval",
            "--source",
            str(slice_dir),
            "--source",
            str(other),
            "--max-prompts",
            "2",
            "--new-tokens",
            "4",
            "--ppl-tokens",
            "64",
            "--expert-cache",
            "64",
            "--taus",
            "0.5,0.9",
            "--json",
            "--quiet",
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    reports = json.loads(capsys.readouterr().out)["sources"]
    assert [r["data"] for r in reports] == [slice_dir.name, "other"]
    assert reports[0]["perplexity"]["files_total"] == 3 and reports[1]["perplexity"]["files_total"] == 1
    for report in reports:
        mobile = [r for r in report["runs"] if r["policy"] == "mobile"]
        assert {r["tau"] for r in mobile} >= {0.5, 0.9} and all(r["agreement_ci"][0] <= r["agreement"] <= r["agreement_ci"][1] for r in mobile)
    assert plot.stat().st_size > 1000
    assert main(["eval", "--source", str(other), "--data", str(other)]) == 2


def test_calibrate_meets_the_target_and_generate_uses_it(demo_copy, slice_dir, capsys):
    capsys.readouterr()
    code = main(
        [
            "calibrate",
            "--model",
            str(demo_copy),
            "--data",
            str(slice_dir),
            "--max-prompts",
            "12",
            "--new-tokens",
            "12",
            "--taus",
            "0.3,0.6,0.9,0.99",
            "--target-agreement",
            "0.9",
            "--rule",
            "point",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "learned criterion fitted on" in out and "AUC alone" in out  # which signals matter
    record = json.loads((demo_copy / "mobile_moe.json").read_text())
    assert record["version"] == 2 and record["rule"] == "point" and record["criterion"] in ("margin", "learned")
    assert record["kv_repair"] == 0  # calibrated without repair: a policy resolved from it repairs nothing
    assert record["agreement"] >= 0.9 and record["tau"] in (0.3, 0.6, 0.9, 0.99)
    lo, hi = record["agreement_ci"]
    assert lo <= record["agreement"] <= hi
    chosen = [r for r in record["runs"] if (r["criterion"], r["tau"]) == (record["criterion"], record["tau"])][0]
    cheaper = [r for r in record["runs"] if r["fallback_rate"] < chosen["fallback_rate"]]
    assert all(r["agreement"] < 0.9 for r in cheaper)  # nothing cheaper met the target
    assert set(record["learned"]["features"]) and record["learned_report"]["steps"] > 0
    capsys.readouterr()
    main(["generate", "--model", str(demo_copy), "--prompt", "x = 1", "--policy", "mobile", "--max-new-tokens", "4", "--json", "--quiet"])
    assert json.loads(capsys.readouterr().out)["policy"]["tau"] == record["tau"]
    main(
        [
            "generate",
            "--model",
            str(demo_copy),
            "--prompt",
            "x = 1",
            "--policy",
            "mobile",
            "--criterion",
            "learned",
            "--max-new-tokens",
            "4",
            "--json",
            "--quiet",
        ]
    )
    policy = json.loads(capsys.readouterr().out)["policy"]
    assert policy["criterion"] == "learned" and policy["tau"] == record["taus"].get("learned", 0.9)


def test_calibrate_says_plainly_when_no_tau_meets_the_target(demo_copy, slice_dir, capsys):
    capsys.readouterr()
    code = main(
        [
            "calibrate",
            "--model",
            str(demo_copy),
            "--data",
            str(slice_dir),
            "--max-prompts",
            "6",
            "--new-tokens",
            "16",
            "--taus",
            "0",
            "--target-agreement",
            "1.0",
            "--quiet",
        ]
    )
    assert code == 1
    assert "no tau meets the target" in capsys.readouterr().out
    assert not (demo_copy / "mobile_moe.json").exists()


def test_bench_on_the_demo_model_reports_every_system(tmp_path, capsys):
    out = tmp_path / "bench.json"
    capsys.readouterr()
    assert main(["bench", "--prompts", "2", "--new-tokens", "6", "--rounds", "2", "--threads", "1", "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["systems"]] == ["big", "mobile", "little", "resident", "transformers"]
    assert report["threads"] == 1 and report["rounds"] == 2 and report["expert_dtype"] == "fp32"
    by_name = {s["name"]: s for s in report["systems"]}
    assert by_name["transformers"]["same_tokens_as_big"] == 1.0 and by_name["resident"]["same_tokens_as_big"] == 1.0
    fields = ("decode_tok_s", "ttft_s", "h2d_gb_per_token", "hit_rate", "fallback_rate", "transfer_wait_share", "ratio_to_big")
    for system in report["systems"]:
        assert all(key in system for key in fields)
        assert system["decode_tok_s"] > 0
    assert report["mobile"]["forced_fallback_rate"] is None  # a trained model: real confidences decide
    assert report["cache_slots"] * 4 <= report["total_experts"]
    assert all(p["big"] > 0 for p in report["predicted"].values())


def test_recalibrating_the_bundled_model_never_writes_the_package(slice_dir, tmp_path, monkeypatch, capsys):
    shipped = (DEMO_MODEL / "mobile_moe.json").read_bytes()
    monkeypatch.setenv("MOBILE_MOE_CONFIG_DIR", str(tmp_path / "config"))
    assert (
        main(
            [
                "calibrate",
                "--data",
                str(slice_dir),
                "--max-prompts",
                "4",
                "--new-tokens",
                "8",
                "--criteria",
                "max_prob",
                "--taus",
                "0.3,0.6,0.9,0.99",
                "--target-agreement",
                "0.9",
                "--quiet",
            ]
        )
        == 0
    )
    assert (DEMO_MODEL / "mobile_moe.json").read_bytes() == shipped
    record = json.loads((tmp_path / "config" / "demo_model" / "mobile_moe.json").read_text())
    assert record["criterion"] == "max_prob"
    capsys.readouterr()
    main(["generate", "--prompt", "x = 1", "--policy", "mobile", "--max-new-tokens", "2", "--json", "--quiet"])
    assert json.loads(capsys.readouterr().out)["policy"]["tau"] == record["tau"]  # the user's calibration is read first
    from mobile_moe import LLM, PolicyConfig, engine_config

    api = LLM(DEMO_MODEL, engine_config(progress=False)).resolve_policy(PolicyConfig("mobile"))
    assert (api.criterion, api.tau) == ("max_prob", record["tau"])  # the Python API applies the same default


def test_the_python_api_uses_the_shipped_calibration(tmp_path, monkeypatch):
    from mobile_moe import LLM, PolicyConfig, engine_config

    monkeypatch.setenv("MOBILE_MOE_CONFIG_DIR", str(tmp_path))  # no user calibration

    shipped = json.loads((DEMO_MODEL / "mobile_moe.json").read_text())
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    policy = llm.resolve_policy(PolicyConfig("mobile"))
    assert (policy.criterion, policy.tau) == (shipped["criterion"], shipped["tau"])
    assert llm.resolve_policy(PolicyConfig("mobile", tau=0.5, criterion="max_prob")).tau == 0.5  # explicit values win


def test_eval_data_reads_python_files_only_and_skips_what_does_not_fit(tmp_path, capsys):
    data = tmp_path / "pkg"
    data.mkdir()
    body = "\n".join(f"def f{i}(a, b):\n    c = a + b\n    return c * {i}\n" for i in range(4))
    (data / "good.py").write_text(body)
    (data / "long.py").write_text("x = " + "1 + " * 3000 + "1\n" + "def g(a):\n    b = a\n    return b\n")  # one prompt over the context
    (data / "blob.py").write_bytes(b"\xff\xfe\x00binary")
    (data / "METADATA").write_text("Name: not-python\n" * 50)
    capsys.readouterr()
    code = main(["eval", "--data", str(data), "--max-prompts", "8", "--new-tokens", "4", "--ppl-tokens", "64", "--taus", "0.04", "--json", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["prompts"] == 4 and report["prompts_skipped_too_long"] == 1
    assert "(2 *.py files read, 1 unreadable skipped)" in report["data"]  # METADATA is not a *.py file
