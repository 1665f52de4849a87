"""What bench reports beside tok/s (bench/checks.py), on CPU: graphs checked against eager decoding with a capture that has CUDA
graphs' semantics (tests/graph_emulator.py) and with captures that replay stale work or fail, host syncs of a decode step, the
expert path, launches per token, and the report rewritten as each system finishes."""

from __future__ import annotations

import warnings

import pytest
import torch
from graph_emulator import emulated_capture

from mobile_moe import LLM, engine_config
from mobile_moe.bench import checks
from mobile_moe.bench.batching import run_batch_bench
from mobile_moe.bench.bench import BenchSettings, run_bench
from mobile_moe.bench.checks import (
    decode_step_syncs,
    graph_figures,
    host_reads,
    launches_per_token,
)
from mobile_moe.bench.costinputs import OpCounts
from mobile_moe.config import PolicyConfig
from mobile_moe.engine.runner import RunnerOptions
from mobile_moe.experts.executor import matmul_path
from mobile_moe.experts.formats import FloatFormat, make_format
from mobile_moe.experts.kernels import CudaInt4, FusedInt4

PROMPT = [5, 6, 7, 8]
MOBILE = PolicyConfig("mobile", tau=0.9, criterion="max_prob")


def stale_capture(fn):  # noqa: ANN001, ANN201 (a GraphCapture)
    """A capture whose replay does nothing: every replay hands back the logits of the captured step."""
    _, out = emulated_capture(fn)
    return (lambda: None), out


def failing_capture(fn):  # noqa: ANN001, ANN201 (a GraphCapture)
    """A capture that always fails (decoding stays eager)."""
    raise RuntimeError("capture refused")


def _llm(path, capture=None, grouped: bool | None = None) -> LLM:  # noqa: ANN001
    """The checkpoint in float32 with graphs made by `capture` at every cache reset (as `--cuda-graphs` does on CUDA)."""
    return LLM(path, engine_config(progress=False, dtype="float32", expert_cache=8), RunnerOptions(graph_capture=capture, grouped=grouped))


def test_replayed_logits_equal_eager_ones_with_a_faithful_capture(checkpoints):
    llm = _llm(checkpoints["olmoe"], emulated_capture)
    figures = graph_figures(llm, PROMPT)
    graphs = llm.runner.graphs
    assert figures.equals_eager is True and figures.steps == 8
    assert graphs.failed is None and graphs.replays > 0 and graphs.captures >= 1 and graphs.capture_s > 0
    assert figures.replay_ms_per_token is not None and figures.replay_ms_per_token > 0
    # every request decodes into a new KV cache, so the second of two identical requests captures all its passes again
    assert figures.captures_per_request == 0 and len(graphs.passes) > 0  # the held KV cache keeps the captures across requests


def test_a_replay_of_stale_work_is_caught(checkpoints):
    figures = graph_figures(_llm(checkpoints["olmoe"], stale_capture), PROMPT)
    assert figures.equals_eager is False


def test_no_replay_gives_no_verdict(checkpoints):
    llm = _llm(checkpoints["olmoe"], failing_capture)
    figures = graph_figures(llm, PROMPT)
    assert llm.runner.graphs.failed is not None and llm.runner.graphs.captures == 0
    assert figures.equals_eager is None and figures.replay_ms_per_token is None and figures.captures_per_request == 0


def test_replay_timing_puts_back_the_position_it_advanced(checkpoints):
    llm = _llm(checkpoints["olmoe"], emulated_capture)
    llm.reset_cache(llm.loaded.store.total_experts)
    llm.cache.load_all()
    _, kv = checks.greedy_logits(llm.runner, PROMPT, 4, room=3)
    assert checks.serving_pass(llm.runner.graphs, kv)[1] == 3  # a span of the whole KV cache: 3 positions left
    assert checks.replay_ms_per_token(llm.runner.graphs, kv, 10) > 0
    assert kv.position.tolist() == [kv.length]


def _settings(rounds: int = 1) -> BenchSettings:
    return BenchSettings([[5, 6, 7, 8], [9, 10, 11]], 6, MOBILE, None, run_accelerate=False, progress=False, rounds=rounds, run_transformers=False)


@pytest.mark.parametrize(("capture", "equal"), [(emulated_capture, True), (stale_capture, False)])
def test_bench_checks_its_graphs_row_and_reports_after_every_system(checkpoints, capture, equal):
    updates = []
    report = run_bench(_llm(checkpoints["olmoe"], capture), _settings(), on_update=lambda r: updates.append(r))
    systems = {s["name"]: s for s in report["systems"]}
    graphs = systems["resident+graphs"]
    assert graphs["graph_equals_eager"] is equal
    assert graphs["captures"] >= 1 and graphs["replays"] > 0 and graphs["capture_s"] > 0 and graphs["replay_ms_per_token"] > 0
    assert graphs["captures_per_request"] == 0  # captures outlive the request: the runner holds its KV cache
    assert graphs["launches_per_token"] < systems["resident"]["launches_per_token"]  # replayed passes are one launch each
    for name in ("big", "mobile", "little", "resident"):
        assert systems[name]["graph_equals_eager"] is None and systems[name]["captures"] is None
    for s in report["systems"]:
        assert s["expert_path"] == "in-place" and s["peak_gpu_mb"] is None  # float experts read where they are; no GPU
        assert s["predicted_tok_s"] > 0 and s["predicted_host_syncs_per_token"] >= 1 and s["launches_per_token"] > 0
    assert report["complete"] is True and report["h2d_probe_gb_s"] is None and report["prediction_profile"]["name"] == "this-device"
    assert [len(u["systems"]) for u in updates[:5]] == [1, 2, 3, 4, 5]  # one more system each time, as each finishes
    assert not any(u["complete"] for u in updates[:-1]) and updates[-1] is report


def test_bench_without_graphs_reports_the_graph_fields_as_null(checkpoints):
    report = run_bench(_llm(checkpoints["olmoe"]), _settings())
    assert [s["name"] for s in report["systems"]] == ["big", "mobile", "little", "resident"]
    assert all(s["graph_equals_eager"] is None and s["replays"] is None for s in report["systems"])
    assert report["cuda_graphs"] == {"requested": False, "on": False}


def test_a_decode_step_lists_its_host_reads_and_which_the_engine_counts(checkpoints):
    llm = _llm(checkpoints["olmoe"])
    syncs = decode_step_syncs(llm, PROMPT)
    moe = len(llm.info.moe_layers)
    assert "torch function mode" in syncs["method"] and syncs["found_by"] == "host reads via a torch function mode"
    assert _by_file(syncs["sites"]) == {"experts/transfer.py tolist": moe + 1}  # each MoE layer's choice and the token, via to_host
    assert syncs["syncs"] == syncs["counted_by_engine"] == moe + 1 and syncs["hidden"] == 0
    llm.reset_cache(llm.loaded.store.total_experts)
    llm.cache.load_all()  # resident on CPU: slots read on the host, outside the engine's count
    resident = decode_step_syncs(llm, PROMPT)
    assert resident["counted_by_engine"] == 1 and resident["hidden"] == moe
    assert _by_file(resident["sites"]) == {"experts/executor.py tolist": moe, "experts/transfer.py tolist": 1}


def _by_file(sites: dict[str, int]) -> dict[str, int]:
    """'experts/transfer.py:150 tolist' -> 'experts/transfer.py tolist' (line numbers move with edits), counts summed."""
    out: dict[str, int] = {}
    for site, n in sites.items():
        where, method = site.split(" ")
        key = f"{where.split(':')[0]} {method}"
        out[key] = out.get(key, 0) + n
    return out


def test_host_reads_are_counted_by_method_and_site():
    x = torch.arange(3.0)
    with host_reads() as sites:
        x.sum().item()
        x.tolist()
        bool(x[0])
        x + 1  # no read
    assert sites == {"outside mobile_moe item": 1, "outside mobile_moe tolist": 1, "outside mobile_moe __bool__": 1}


def test_cuda_sync_warnings_are_counted_and_others_still_shown(monkeypatch):
    """The sync debug mode's warnings become counted sites; any other warning goes on as before (CUDA itself stood in)."""
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with checks.cuda_syncs() as sites:
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
            warnings.warn("something else", UserWarning)
    assert sites == {"outside mobile_moe sync": 2}
    assert [str(w.message) for w in shown] == ["something else"] and modes == ["warn", 0]


def test_a_failing_check_gives_its_error_instead_of_ending_the_run():
    assert checks.guarded(lambda: 3) == (3, None)
    assert checks.guarded(lambda: 1 / 0) == (None, "ZeroDivisionError: division by zero")


def test_expert_paths_name_the_matmul_each_format_runs(checkpoints):
    f32 = torch.float32
    int4 = make_format("int4", f32, 32)
    assert matmul_path(FloatFormat(f32), f32) == "in-place" and matmul_path(int4, f32) == "reference"
    assert matmul_path(make_format("mxfp4", torch.bfloat16), torch.bfloat16) == "mxfp4"
    assert matmul_path(CudaInt4(int4, torch.device("cpu"), 8), torch.bfloat16) == "tinygemm"
    assert matmul_path(FusedInt4(int4, torch.bfloat16), torch.bfloat16) == "cpu-int4"
    assert _llm(checkpoints["olmoe"]).runner.executor.path(resident=False) == "in-place"
    executor = _llm(checkpoints["olmoe"], grouped=True).runner.executor
    assert executor.path(resident=False) == "grouped" and executor.path(resident=True) == "in-place"  # resident on CPU: host-planned


def test_launches_per_token_add_fallback_passes_and_count_a_replay_as_one():
    ops = OpCounts(per_layer=10.0, per_moe_layer=2.0, per_expert=4.0, per_pass=5.0)
    assert launches_per_token(ops, 3, 2, 8.0) == 5 + 30 + 4 + 32
    assert launches_per_token(ops, 3, 2, 8.0, passes_per_token=1.5) == 1.5 * 39 + 32
    assert launches_per_token(ops, 3, 2, 8.0, replayed_share=1.0) == 1.0
    assert launches_per_token(ops, 3, 2, 8.0, replayed_share=0.5) == 0.5 + 0.5 * 71


def test_batch_sweep_reports_each_row_as_it_finishes(checkpoints):
    llm = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", expert_cache=16, max_batch=2))
    updates = []
    report = run_batch_bench(llm, [[5, 6, 7], [8, 9, 10]], [1, 2], 4, MOBILE, 16, 0.0, 1, on_update=updates.append)
    assert [len(u["rows"]) for u in updates] == [1, 2, 3, 4, 4] and [u["complete"] for u in updates] == [False] * 4 + [True]
    assert updates[0]["rows"][0]["ratio_to_big"] == 1.0 and updates[-1] is report
