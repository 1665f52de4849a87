"""scripts/gpu_bench.sh's Python side: the environment check before any run, and after each run the summary (one JSON, one
table) and the bundle of everything else, so that a window cut short still leaves three files with what was measured.

`env` imports what the runs need (nothing can be installed where they run). `summary` needs only the standard library,
so the script runs this file by its path between runs (no torch import: milliseconds, not seconds).
Usage: python -m mobile_moe.bench.gpu_summary env --device cuda --json FILE
       python mobile_moe/bench/gpu_summary.py summary --work DIR --out DIR [--print]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

REQUIRED_MODULES = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "numpy",
    "xxhash",
    "mobile_moe.cli",
    "mobile_moe.bench.bench",
    "mobile_moe.bench.batching",
    "mobile_moe.bench.checks",
    "mobile_moe.bench.hf_baseline",
    "mobile_moe.bench.synthetic",
    "mobile_moe.engine.graphs",
    "mobile_moe.experts.kernels",
)
OPTIONAL_MODULES = ("accelerate",)  # the transformers + accelerate baseline runs only where it imports
STANDARD_SYSTEMS = ("big", "mobile", "little", "resident", "resident+graphs")  # every engine run's rows, measured or not
ROW_FIELDS = (
    "system",
    "tok_s",
    "predicted_tok_s",
    "hit_rate",
    "h2d_mb_per_token",
    "predicted_h2d_mb_per_token",
    "host_syncs_per_token",
    "predicted_host_syncs_per_token",
    "launches_per_token",
    "read_mb_per_token",
    "expert_path",
    "peak_gpu_mb",
    "graph_equals_eager",
    "captures",
    "replays",
    "replay_ms_per_token",
    "capture_s",
    "captures_per_request",
    "note",
)
RENAMED_FIELDS = ("system", "tok_s", "hit_rate", "h2d_mb_per_token", "read_mb_per_token", "note")  # from other report keys
COPIED_FIELDS = tuple(f for f in ROW_FIELDS if f not in RENAMED_FIELDS)  # the report's own keys, as they are
RUN_FIELDS = (
    "device",
    "model",
    "expert_dtype",
    "cache_slots",
    "total_experts",
    "memory_probe_gb_s",
    "h2d_probe_gb_s",
    "host_syncs_in_decode_step",
    "kernel_launches",
    "peak_rss_mb",
    "cuda_graphs",
    "prediction_profile",
)
TIMEOUT_EXITS = (124, 137)  # timeout(1): over the run's budget (137: killed after the grace period)
LOG_TAIL_LINES = 15


def environment(device: str) -> dict:
    """Python, torch, CUDA and the device, other versions, and each module the runs import (ok or the error)."""
    imports = {name: _import_error(name) for name in REQUIRED_MODULES + OPTIONAL_MODULES}
    env: dict = {"python": platform.python_version(), "platform": platform.platform(), "device": device, "imports": imports}
    if imports["torch"] is None:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            index = torch.device(device).index if device.startswith("cuda") else None
            index = torch.cuda.current_device() if index is None else index
            env.update(
                gpu=torch.cuda.get_device_name(index),
                capability=".".join(map(str, torch.cuda.get_device_capability(index))),
                gpu_memory_gb=torch.cuda.get_device_properties(index).total_memory / 2**30,
                gpus=torch.cuda.device_count(),
            )
    for name in ("transformers", "accelerate"):
        if imports[name] is None:
            env[name] = getattr(sys.modules[name], "__version__", "?")
    return env


def _import_error(name: str) -> str | None:
    """None when `name` imports, else its error in one line."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import is what the check reports
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def environment_problems(env: dict) -> list[str]:
    """Why no run can work here: a required module that does not import, or CUDA asked for and absent."""
    problems = [f"{name} does not import ({error})" for name, error in env["imports"].items() if error and name not in OPTIONAL_MODULES]
    if env["device"].startswith("cuda") and not env.get("cuda_available"):
        problems.append("CUDA is not available to torch")
    return problems


def environment_lines(env: dict) -> list[str]:
    """The environment in a few lines."""
    gpu = f"{env['gpu']} (sm {env['capability']}, {env['gpu_memory_gb']:.0f} GiB, {env['gpus']} visible)" if "gpu" in env else "no GPU"
    optional = ", ".join(f"{name} {'ok' if env['imports'][name] is None else 'missing'}" for name in OPTIONAL_MODULES)
    ok = sum(error is None for name, error in env["imports"].items() if name not in OPTIONAL_MODULES)
    return [
        f"python {env['python']}, torch {env.get('torch', '-')}, CUDA {env.get('cuda') or '-'}, transformers {env.get('transformers', '-')}; {gpu}",
        f"imports: {ok} of {len(env['imports']) - len(OPTIONAL_MODULES)} required ok; {optional}",
    ]


def read_runs(work: Path) -> list[dict]:
    """The planned runs (runs.tsv: name, budget seconds, bench flags), each with its status file and bench report when there."""
    runs = []
    for line in (work / "runs.tsv").read_text().splitlines():
        name, budget, flags = line.split("\t")
        runs.append(
            {
                "name": name,
                "budget_s": int(budget),
                "flags": flags,
                "status_file": _read_json(work / f"{name}.status"),
                "report": _read_json(work / f"{name}.json"),
            }
        )
    return runs


def _read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is missing or unreadable (a run killed while writing leaves the last whole one)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_status(status: dict | None, report: dict | None) -> str:
    """ok (exit 0, report complete), partial (a report, not complete), timeout, failed, skipped (with why) or not run."""
    if status is None:
        return "not run"
    if "skipped" in status:
        return f"skipped: {status['skipped']}"
    complete = report is not None and report.get("complete", False)
    if status["rc"] == 0 and complete:
        return "ok"
    if report is not None and report.get("systems" if "systems" in report else "rows"):
        return "partial" + (" (timeout)" if status["rc"] in TIMEOUT_EXITS else f" (exit {status['rc']})")
    return "timeout" if status["rc"] in TIMEOUT_EXITS else f"failed (exit {status['rc']})"


def expected_systems(flags: str) -> tuple[str, ...]:
    """The rows a run's table shape has before it reports: the engine systems, the baseline, or none for a batch sweep."""
    if "--accelerate-only" in flags:
        return ("accelerate",)
    return () if "--batch" in flags else STANDARD_SYSTEMS


def system_row(s: dict | None, name: str) -> dict:
    """One row of the summary from a bench report's system (None: not measured, every figure null)."""
    s = s or {}

    def scaled(key: str, factor: float) -> float | None:
        return None if s.get(key) is None else s[key] * factor

    row = {field: None for field in ROW_FIELDS}
    row.update(
        system=name,
        tok_s=s.get("decode_tok_s"),
        hit_rate=s.get("hit_rate"),
        h2d_mb_per_token=scaled("h2d_gb_per_token", 1e3),
        read_mb_per_token=scaled("bytes_per_token", 1e-6),
        note=s.get("note"),
    )
    for key in COPIED_FIELDS:
        row[key] = s.get(key)
    if row["expert_path"] == "":
        row["expert_path"] = None
    return row


def batch_row(r: dict) -> dict:
    """One row of the summary from a batch sweep's (size, system) row: aggregate tok/s and expert MB per generated token."""
    row = {field: None for field in ROW_FIELDS}
    row.update(
        system=f"{r['system']} x{r['batch']}",
        tok_s=r.get("aggregate_tok_s"),
        h2d_mb_per_token=r["expert_bytes_per_token"] / 1e6,
        note=f"{r['steps']} steps with every row decoding; fallback {r['fallback_rate']:.0%}",
    )
    return row


def run_rows(flags: str, report: dict | None) -> list[dict]:
    """A run's rows: its expected systems (measured or null) then any other it reported; a batch sweep's (size, system) rows."""
    if report is not None and "rows" in report:
        return [batch_row(r) for r in report["rows"]]
    systems = {s["name"]: s for s in (report or {}).get("systems", [])}
    names = list(expected_systems(flags)) + [n for n in systems if n not in expected_systems(flags)]
    return [system_row(systems.get(n), n) for n in names] or [system_row(None, "-")]


def summarize(runs: list[dict], env: dict | None, work: Path) -> dict:
    """The summary JSON: the environment, then every planned run with its status, run-level figures and rows."""
    out = []
    for run in runs:
        status, report = run["status_file"], run["report"]
        entry = {
            "name": run["name"],
            "budget_s": run["budget_s"],
            "flags": run["flags"],
            "status": run_status(status, report),
            "exit": None if status is None else status.get("rc"),
            "seconds": None if status is None else status.get("seconds"),
            "complete": None if report is None else report.get("complete", False),
        }
        entry.update({field: (report or {}).get(field) for field in RUN_FIELDS})
        entry["rows"] = run_rows(run["flags"], report)
        if entry["status"] != "ok" and status is not None and "rc" in status:
            entry["log_tail"] = _tail(work / f"{run['name']}.log", LOG_TAIL_LINES)
        out.append(entry)
    return {"env": env, "budget_s": sum(r["budget_s"] for r in runs), "runs": out}


def _tail(path: Path, lines: int) -> list[str]:
    """The last lines of a file (none when it is missing)."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _fmt(value: object, spec: str = "") -> str:
    """A figure for the table: '-' when null, yes/no for a check."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def _with_prediction(measured: object, predicted: object, spec: str) -> str:
    """'measured (predicted)', or just the one there is."""
    if predicted is None:
        return _fmt(measured, spec)
    return f"{_fmt(measured, spec)} ({_fmt(predicted, spec)})"


TABLE_COLUMNS = (  # header, width, the cell of a row
    ("run", 20, None),
    ("system", 15, lambda r: r["system"]),
    ("tok/s (pred)", 17, lambda r: _with_prediction(r["tok_s"], r["predicted_tok_s"], ".1f")),
    ("hit", 5, lambda r: _fmt(r["hit_rate"], ".0%")),
    ("H2D MB/t (pred)", 17, lambda r: _with_prediction(r["h2d_mb_per_token"], r["predicted_h2d_mb_per_token"], ".2f")),
    ("sync/t (pred)", 13, lambda r: _with_prediction(r["host_syncs_per_token"], r["predicted_host_syncs_per_token"], ".0f")),
    ("launch/t", 8, lambda r: _fmt(r["launches_per_token"], ".0f")),
    ("read MB/t", 9, lambda r: _fmt(r["read_mb_per_token"], ".1f")),
    ("path", 10, lambda r: _fmt(r["expert_path"])),
    ("peak MiB", 8, lambda r: _fmt(r["peak_gpu_mb"], ".0f")),
    ("graph=eager", 11, lambda r: _fmt(r["graph_equals_eager"])),
    ("capt/repl", 9, lambda r: "-" if r["captures"] is None else f"{r['captures']}/{r['replays']}"),
    ("replay ms", 9, lambda r: _fmt(r["replay_ms_per_token"], ".3f")),
    ("capture s", 9, lambda r: _fmt(r["capture_s"], ".2f")),
    ("capt/req", 8, lambda r: _fmt(r["captures_per_request"])),
)


def table(summary: dict) -> str:
    """Every run's rows in one table (predictions in brackets), then a line per run: status, probes and the decode step's host syncs."""
    head = " ".join(f"{title:<{width}}" for title, width, _ in TABLE_COLUMNS)
    lines = [head, "-" * len(head)]
    for run in summary["runs"]:
        for i, row in enumerate(run["rows"]):
            label = run["name"] if i == 0 else ""
            cells = [f"{label:<{TABLE_COLUMNS[0][1]}}"] + [f"{cell(row):<{width}}" for _, width, cell in TABLE_COLUMNS[1:]]
            lines.append(" ".join(cells).rstrip())
    lines.append("")
    lines += [run_line(run) for run in summary["runs"]]
    return "\n".join(lines)


def run_line(run: dict) -> str:
    """A run's status, time, probes and the host syncs of one decode step (hidden: not counted by the engine)."""
    parts = [f"{run['name']}: {run['status']}" + ("" if run["seconds"] is None else f" in {run['seconds']} of {run['budget_s']} s")]
    if run.get("h2d_probe_gb_s") is not None:
        parts.append(f"pinned H2D probe {run['h2d_probe_gb_s']:.1f} GB/s")
    if run.get("memory_probe_gb_s") is not None:
        parts.append(f"memory probe {run['memory_probe_gb_s']:.0f} GB/s")
    syncs = run.get("host_syncs_in_decode_step")
    if syncs and "error" in syncs:
        parts.append(f"listing one decode step's host syncs failed: {syncs['error']}")
    elif syncs:
        sites = ", ".join(f"{site} x{n}" for site, n in syncs["sites"].items()) or "none"
        parts.append(
            f"one decode step: {syncs['syncs']} host syncs ({syncs.get('found_by', syncs['method'])}), {syncs['hidden']} not counted by the engine: {sites}"
        )
    return "; ".join(parts)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (a window cut mid-write keeps the last one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bundle(work: Path) -> bytes:
    """Every file of the work folder (run reports, logs, status, environment), as one gzipped tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(p for p in work.iterdir() if p.is_file() and not p.name.startswith(".")):
            tar.add(path, arcname=f"runs/{path.name}")
    return buffer.getvalue()


def cmd_env(args: argparse.Namespace) -> int:
    """Print the environment, write it as JSON; exit 1 when no run can work here."""
    env = environment(args.device)
    print("\n".join(environment_lines(env)), flush=True)
    args.json.write_text(json.dumps(env, indent=2) + "\n")
    problems = environment_problems(env)
    for problem in problems:
        print(f"environment: {problem}")
    return 1 if problems else 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Write summary.json and runs.tar.gz into --out (and print the table)."""
    summary = summarize(read_runs(args.work), _read_json(args.work / "env.json"), args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    write_atomic(args.out / "runs.tar.gz", bundle(args.work))
    if args.print:
        print(table(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`env` or `summary`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, device and an import check of every module the runs need")
    env.add_argument("--device", default="cuda")
    env.add_argument("--json", type=Path, required=True)
    env.set_defaults(handler=cmd_env)
    summary = sub.add_parser("summary", help="summary.json, the table and runs.tar.gz from the work folder")
    summary.add_argument("--work", type=Path, required=True)
    summary.add_argument("--out", type=Path, required=True)
    summary.add_argument("--print", action="store_true", help="print the table")
    summary.set_defaults(handler=cmd_summary)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
