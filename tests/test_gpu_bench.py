"""scripts/gpu_bench.sh, rehearsed on CPU: the plan phase, the budgets, and every run through the summary table and JSON with at
most three output files; its summary (mobile_moe/bench/gpu_summary.py) on runs that finished, timed out, failed or never ran."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from mobile_moe.bench import gpu_summary
from mobile_moe.bench.gpu_summary import ROW_FIELDS, STANDARD_SYSTEMS, run_status, summarize, table

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_bench.sh"
RUNS = ["olmoe_int4_graphs", "olmoe_8g_graphs", "olmoe_disk", "olmoe_4g", "olmoe_batch", "olmoe_int4_ref", "qwen15_6g", "accelerate"]
MAX_OUTPUT_FILES = 8  # what a GPU window brings back


def _script(*args: str, out: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the script from the repository root, with OUT (and its scratch and disk store) under `out`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if out is not None:
        env.update(OUT=str(out / "out"), STORE_DIR=str(out / "store"), TMPDIR=str(out))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_plan_only_prints_every_run_and_budgets_that_fit_the_window():
    done = _script("--plan-only")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in RUNS:
        assert re.search(rf"^{name} \(\d+ s\): \S+ on cuda: a [\d.]+ GiB budget", done.stdout, re.M), name
    budgets = [int(b) for b in re.findall(r"^\S+ \((\d+) s\): ", done.stdout, re.M)]
    total = int(re.search(r"^budgets: (\d+) s in all \(at most 360 s\)$", done.stdout, re.M)[1])
    assert len(budgets) == len(RUNS) and sum(budgets) == total <= 360
    plans = {line.split(" ", 1)[0]: line for line in done.stdout.splitlines() if "expert slots" in line}
    assert "16 rows x" in plans["olmoe_batch"]  # the sweep's largest batch: its KV is planned for every row
    assert "752 of 1024 expert slots (3.4 MiB each)" in plans["olmoe_int4_graphs"]  # the same 4 GiB holds 3.5x bf16's 216 slots
    assert "216 of 1024 expert slots" in plans["olmoe_4g"]


def test_an_unknown_run_is_refused():
    done = _script("--only", "nope", "--plan-only")
    assert done.returncode == 2 and "no run named nope" in done.stderr


def test_cpu_rehearsal_runs_every_entry_into_one_table_and_three_files(tmp_path):
    done = _script("--device", "cpu", out=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_bench.log", "runs.tar.gz", "summary.json"]
    assert len(list(out.iterdir())) <= MAX_OUTPUT_FILES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"]["device"] == "cpu" and summary["env"]["imports"]["mobile_moe.cli"] is None
    assert [r["name"] for r in summary["runs"]] == RUNS and summary["budget_s"] <= 360
    for run in summary["runs"]:
        assert run["status"] == "ok" and run["complete"] is True, run
        assert all(set(row) == set(ROW_FIELDS) for row in run["rows"])
    runs = {r["name"]: r for r in summary["runs"]}
    graphs = runs["olmoe_int4_graphs"]
    assert [row["system"] for row in graphs["rows"]] == list(STANDARD_SYSTEMS)
    assert graphs["cuda_graphs"] == {"requested": True, "on": False}  # no CUDA graphs on CPU: the row is there, every figure null
    assert all(value is None for key, value in graphs["rows"][-1].items() if key != "system")
    big = graphs["rows"][0]
    assert big["tok_s"] > 0 and big["predicted_tok_s"] > 0 and big["expert_path"] == "cpu-int4" and 0 <= big["hit_rate"] <= 1
    assert big["launches_per_token"] > 0 and big["read_mb_per_token"] > 0 and big["host_syncs_per_token"] >= 1
    assert graphs["host_syncs_in_decode_step"]["syncs"] >= 1 and graphs["h2d_probe_gb_s"] is None
    assert runs["olmoe_int4_ref"]["rows"][0]["expert_path"] == "reference"
    assert [row["system"] for row in runs["olmoe_batch"]["rows"]] == [f"{s} x{b}" for b in (1, 4, 16) for s in ("big", "mobile")]
    assert [row["system"] for row in runs["accelerate"]["rows"]] == ["accelerate"]
    log = (out / "gpu_bench.log").read_text()
    assert log == done.stdout and "graph=eager" in log and "0 of 8 runs failed" in log
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"runs/{n}.json" for n in RUNS} | {f"runs/{n}.log" for n in RUNS} | {"runs/env.json"} <= names


def _work(tmp_path: Path, runs: dict[str, tuple[dict | None, dict | None]]) -> Path:
    """A work folder as the script leaves it: runs.tsv, and per run its status file and bench report when given."""
    lines = []
    for name, (status, report) in runs.items():
        lines.append(f"{name}\t30\t--synthetic olmoe-1b-7b" + (" --batch 1,4" if name == "batch" else ""))
        if status is not None:
            (tmp_path / f"{name}.status").write_text(json.dumps(status))
            (tmp_path / f"{name}.log").write_text("line 1\nTraceback: boom\n")
        if report is not None:
            (tmp_path / f"{name}.json").write_text(json.dumps(report))
    (tmp_path / "runs.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_summary_keeps_every_run_and_the_table_shape_whatever_happened(tmp_path):
    partial = {"complete": False, "systems": [{"name": "big", "decode_tok_s": 12.5, "hit_rate": 0.5}]}
    work = _work(
        tmp_path,
        {
            "cut": ({"rc": 124, "seconds": 30, "budget_s": 30}, partial),
            "crashed": ({"rc": 1, "seconds": 3, "budget_s": 30}, None),
            "skipped": ({"skipped": "accelerate does not import"}, None),
            "batch": (None, None),
        },
    )
    summary = summarize(gpu_summary.read_runs(work), None, work)
    runs = {r["name"]: r for r in summary["runs"]}
    assert [runs[n]["status"] for n in ("cut", "crashed", "skipped", "batch")] == [
        "partial (timeout)",
        "failed (exit 1)",
        "skipped: accelerate does not import",
        "not run",
    ]
    assert [row["system"] for row in runs["cut"]["rows"]] == list(STANDARD_SYSTEMS)
    assert runs["cut"]["rows"][0]["tok_s"] == 12.5 and runs["cut"]["rows"][1]["tok_s"] is None
    assert runs["crashed"]["log_tail"] == ["line 1", "Traceback: boom"] and "log_tail" not in runs["batch"]
    assert [row["system"] for row in runs["batch"]["rows"]] == ["-"]
    lines = table(summary).splitlines()
    assert lines[0].startswith("run") and "graph=eager" in lines[0]
    assert sum(line.startswith(("cut", "crashed", "skipped", "batch")) for line in lines) == 8  # a first row and a status line each


@pytest.mark.parametrize(
    ("status", "report", "expected"),
    [
        ({"rc": 0}, {"complete": True, "systems": []}, "ok"),
        ({"rc": 0}, {"complete": False, "systems": [{"name": "big"}]}, "partial (exit 0)"),
        ({"rc": 137}, None, "timeout"),
        ({"rc": 2}, {"complete": False, "systems": []}, "failed (exit 2)"),
    ],
)
def test_run_status(status, report, expected):
    assert run_status(status, report) == expected


PROBE = """
import runpy, sys
path, work, out = sys.argv[1:]
sys.argv, sys.path[0] = [path, "summary", "--work", work, "--out", out], str(__import__("pathlib").Path(path).parent)
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
assert "torch" not in sys.modules, "the summary imported torch"
"""


def test_summary_runs_by_path_without_importing_torch(tmp_path):
    """Between runs the script runs the summary by its file path: standard library only, so it takes milliseconds."""
    work = tmp_path / "work"
    work.mkdir()
    _work(work, {"one": ({"rc": 0, "seconds": 1, "budget_s": 30}, {"complete": True, "systems": []})})
    done = subprocess.run(
        ["python3", "-c", PROBE, str(ROOT / "mobile_moe/bench/gpu_summary.py"), str(work), str(tmp_path / "out")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]] == ["ok"]
