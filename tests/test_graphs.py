"""Decode passes replayed from captured graphs (`--cuda-graphs`), checked on CPU with a capture that has CUDA graphs'
semantics (tests/graph_emulator.py): what a capture freezes is what a replay computes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from graph_emulator import HostReadInCapture, emulated_capture
from torch.utils._python_dispatch import TorchDispatchMode

from mobile_moe import LLM, engine_config
from mobile_moe.bench.bench import BenchSettings, run_bench
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.graphs import DecodeGraphs

SAMPLING = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
MOBILE = PolicyConfig("mobile", tau=0.9, criterion="max_prob")


def _resident(path: Path, graphs: DecodeGraphs | None) -> LLM:
    """The checkpoint in float32, every expert in the cache, decoding as on CUDA (experts gathered on the device)."""
    llm = LLM(path, engine_config(progress=False, dtype="float32"))
    llm.reset_cache(llm.loaded.store.total_experts)
    llm.cache.load_all()
    llm.runner.executor.device_indexed = True
    if graphs is not None:
        llm.runner.graphs, llm.runner.span_bucket = graphs, 8  # small buckets: a short generation crosses two
    return llm


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v2", "qwen3_5_moe"])  # GQA; sinks + ring; MLA + dense; DeltaNet
def test_replayed_decode_passes_give_eager_tokens_fallbacks_and_hits(checkpoints, arch: str):
    graphs = DecodeGraphs(emulated_capture)
    eager, replayed = _resident(checkpoints[arch], None), _resident(checkpoints[arch], graphs)
    for policy in (PolicyConfig("big"), MOBILE, PolicyConfig("mobile", tau=0.9, criterion="max_prob", kv_repair=2)):
        hits = [llm.cache.stats.hits for llm in (eager, replayed)]
        want, got = eager.generate([5, 6, 7, 8], SAMPLING, policy), replayed.generate([5, 6, 7, 8], SAMPLING, policy)
        assert got.token_ids == want.token_ids, policy
        assert [s.fell_back for s in got.steps] == [s.fell_back for s in want.steps]
        assert replayed.cache.stats.hits - hits[1] == eager.cache.stats.hits - hits[0]
    assert graphs.failed is None and graphs.replays >= 10
    assert {key[0].value for key in graphs.passes} == {"big", "little"} and {key[-1] for key in graphs.passes} >= {8, 16}


def test_a_captured_pass_with_a_host_read_inside_falls_back_to_eager_with_a_warning(checkpoints, caplog):
    """On CPU the resident path reads its slots on the host: the capture refuses it, decoding stays right."""
    graphs = DecodeGraphs(emulated_capture)
    eager, replayed = _resident(checkpoints["olmoe"], None), _resident(checkpoints["olmoe"], graphs)
    replayed.runner.executor.device_indexed = False
    project_log = logging.getLogger("mobile_moe")  # the CLI may have stopped it propagating to root
    project_log.addHandler(caplog.handler)
    try:
        got = replayed.generate([5, 6, 7, 8], SAMPLING)
    finally:
        project_log.removeHandler(caplog.handler)
    assert got.token_ids == eager.generate([5, 6, 7, 8], SAMPLING).token_ids
    assert graphs.failed is not None and graphs.replays == 0
    assert "CUDA graph capture failed" in caplog.text


def test_the_emulated_capture_freezes_host_values_as_a_cuda_graph_does():
    """The test double itself: a replay recomputes tensors, never Python; a host read inside a capture raises."""
    x, scale = torch.ones(3), [2.0]
    replay, out = emulated_capture(lambda: (x * scale[0]).add_(1))
    replay()
    assert out.tolist() == [3.0, 3.0, 3.0]
    x.fill_(5.0)
    scale[0] = 100.0  # a host value: the replay keeps the captured 2.0
    replay()
    assert out.tolist() == [11.0, 11.0, 11.0]
    state = torch.zeros(2)
    replay, _ = emulated_capture(lambda: state.add_(1))
    assert state.tolist() == [0.0, 0.0]  # a capture leaves no effect
    replay()
    assert state.tolist() == [1.0, 1.0]
    for read in (lambda: x * float(x.sum()), lambda: x[x.argmax().tolist()], lambda: x * x.sum().item()):
        with pytest.raises(HostReadInCapture):
            emulated_capture(read)


def test_a_second_identical_request_replays_the_first_ones_captures(checkpoints):
    """The runner holds one KV cache across requests, reset in place: the captures (which read its tensors) survive, so a
    repeated request captures nothing new and gives the same tokens; a longer request than the cache holds starts over."""
    graphs = DecodeGraphs(emulated_capture)
    llm = _resident(checkpoints["olmoe"], graphs)
    first, second = llm.generate([5, 6, 7, 8], SAMPLING), llm.generate([5, 6, 7, 8], SAMPLING)
    assert first.stats.graph_captures >= 2 and first.stats.graph_replays > 0
    assert second.token_ids == first.token_ids
    assert second.stats.graph_captures == 0 and second.stats.graph_replays == first.stats.graph_replays + first.stats.graph_captures
    old = dict(graphs.passes)
    longer = llm.generate([5, 6, 7, 8], SamplingParams(max_new_tokens=200, temperature=0.0, stop_at_eos=False))
    assert longer.token_ids[:12] == first.token_ids and longer.stats.graph_captures > 0
    assert all(graphs.passes[k] is not old[k] for k in graphs.passes.keys() & old.keys())


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])  # plain experts; experts with biases
def test_experts_gathered_on_the_device_give_the_host_planned_tokens(checkpoints, arch: str):
    """The resident path off the CPU (slots gathered by index, no host read) decodes as the host-planned one."""
    gathered = _resident(checkpoints[arch], None)
    planned = _resident(checkpoints[arch], None)
    planned.runner.executor.device_indexed = False
    calls, gather = [], gathered.runner.executor._gathered
    gathered.runner.executor._gathered = lambda *a: calls.append(1) or gather(*a)
    assert gathered.generate([5, 6, 7, 8], SAMPLING).token_ids == planned.generate([5, 6, 7, 8], SAMPLING).token_ids
    assert len(calls) >= (SAMPLING.max_new_tokens - 1) * len(gathered.info.moe_layers)


def test_bench_compares_resident_decoding_with_and_without_graphs(checkpoints):
    """With a capture (`--cuda-graphs` on CUDA) bench adds a `resident+graphs` row, interleaved with eager `resident`."""
    llm = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", expert_cache=8))
    llm.graph_capture = lambda: emulated_capture
    settings = BenchSettings([[5, 6, 7, 8], [9, 10, 11]], 8, MOBILE, None, run_accelerate=False, progress=False, rounds=1,
                             run_transformers=False)
    systems = {s["name"]: s for s in run_bench(llm, settings)["systems"]}
    assert list(systems) == ["big", "mobile", "little", "resident", "resident+graphs"]
    assert systems["resident+graphs"]["same_tokens_as_big"] == systems["resident"]["same_tokens_as_big"] == 1.0
    replayed = re.search(r"(\d+) of (\d+) decode passes replayed from CUDA graphs", systems["resident+graphs"]["note"])
    assert replayed and 0 < int(replayed[1]) < int(replayed[2]) and "capture failed" not in systems["resident+graphs"]["note"]
    assert "replayed" not in systems["resident"]["note"]


class PoolReads(TorchDispatchMode):
    """Records the indexing ops that copy expert weight matrices [S, out, in] out of the slot pool (biases [S, out] are
    small and gathered per row)."""

    def __init__(self, pool: torch.Tensor) -> None:
        super().__init__()
        self.pool = pool.untyped_storage().data_ptr()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in (torch.ops.aten.index_select.default, torch.ops.aten.index.Tensor) and args[0].dim() == 3 \
                and args[0].untyped_storage().data_ptr() == self.pool:
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])  # plain experts; experts with biases
def test_resident_float_experts_are_read_in_place_by_grouped_matmuls(checkpoints, arch: str):
    """Where grouped matmuls run (CUDA, after the probe; forced here), a resident decode pass reads its experts where they
    lie: offsets built on the device, no weight gathered, and it replays from a capture with the host-planned tokens."""
    planned, graphs = _resident(checkpoints[arch], None), DecodeGraphs(emulated_capture)
    planned.runner.executor.device_indexed, planned.runner.executor.grouped = False, True
    grouped = _resident(checkpoints[arch], graphs)
    grouped.runner.executor.grouped = True
    with PoolReads(grouped.cache.pool) as reads:
        got = grouped.generate([5, 6, 7, 8], SAMPLING)
    assert got.token_ids == planned.generate([5, 6, 7, 8], SAMPLING).token_ids
    assert reads.copies == [] and graphs.failed is None and got.stats.graph_replays > 0
