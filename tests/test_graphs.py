"""Decode passes replayed from captured graphs (`--cuda-graphs`), checked on CPU with a capture that has CUDA graphs'
semantics (tests/graph_emulator.py): what a capture freezes is what a replay computes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from graph_emulator import CaptureRefused, HostDataInCapture, HostReadInCapture, SyncInCapture, emulated_capture
from test_formats import mxfp4_checkpoints
from torch.utils._python_dispatch import TorchDispatchMode

from mobile_moe import LLM, engine_config
from mobile_moe.bench.bench import BenchSettings, run_bench
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.runner import RunnerOptions

SAMPLING = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
MOBILE = PolicyConfig("mobile", tau=0.9, criterion="max_prob")


def _resident(path: Path, graphs: bool = False, device_indexed: bool = True, grouped: bool | None = None) -> LLM:
    """The checkpoint in float32, every expert in the cache, decoding as on CUDA (slots indexed on the device) unless told
    otherwise; with graphs, passes captured by the emulator in small key-span buckets (a short generation crosses two)."""
    capture = emulated_capture if graphs else None
    options = RunnerOptions(graph_capture=capture, span_bucket=8 if graphs else None, device_indexed=device_indexed, grouped=grouped)
    llm = LLM(path, engine_config(progress=False, dtype="float32"), options)
    llm.reset_cache(llm.loaded.store.total_experts)
    llm.cache.load_all()
    return llm


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v2", "qwen3_5_moe"])  # GQA; sinks + ring; MLA + dense; DeltaNet
def test_replayed_decode_passes_give_eager_tokens_fallbacks_and_hits(checkpoints, arch: str):
    eager, replayed = _resident(checkpoints[arch]), _resident(checkpoints[arch], graphs=True)
    graphs = replayed.runner.graphs
    for policy in (PolicyConfig("big"), MOBILE, PolicyConfig("mobile", tau=0.9, criterion="max_prob", kv_repair=2)):
        hits = [llm.cache.stats.hits for llm in (eager, replayed)]
        want, got = eager.generate([5, 6, 7, 8], SAMPLING, policy), replayed.generate([5, 6, 7, 8], SAMPLING, policy)
        assert got.token_ids == want.token_ids, policy
        assert [s.fell_back for s in got.steps] == [s.fell_back for s in want.steps]
        assert replayed.cache.stats.hits - hits[1] == eager.cache.stats.hits - hits[0]
    assert graphs.failed is None and graphs.replays >= 10
    assert {key[0].mode.value for key in graphs.passes} == {"big", "little"} and {key[-1] for key in graphs.passes} >= {8, 16}


def test_mxfp4_experts_decode_from_captured_graphs_as_eagerly(checkpoints, tmp_path):
    """MXFP4 experts dequantize through a lookup table made once per device, not from host data in every pass (a pageable
    copy a capture refuses, which turned `--cuda-graphs` off for every gpt-oss checkpoint)."""
    mx, _ = mxfp4_checkpoints(checkpoints["gpt_oss"], tmp_path)
    eager, replayed = _resident(mx), _resident(mx, graphs=True)
    graphs = replayed.runner.graphs
    assert str(replayed.loaded.store.format) == "mxfp4"
    for policy in (PolicyConfig("big"), MOBILE):
        assert replayed.generate([5, 6, 7, 8], SAMPLING, policy).token_ids == eager.generate([5, 6, 7, 8], SAMPLING, policy).token_ids
    assert graphs.failed is None and graphs.replays >= 10


def test_a_captured_pass_with_a_host_read_inside_falls_back_to_eager_with_a_warning(checkpoints, caplog):
    """On CPU the resident path reads its slots on the host: the capture refuses it, decoding stays right."""
    eager, replayed = _resident(checkpoints["olmoe"]), _resident(checkpoints["olmoe"], graphs=True, device_indexed=False)
    graphs = replayed.runner.graphs
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


def test_the_emulated_capture_leaves_garbage_until_the_first_replay_which_writes_into_the_captured_tensors():
    """CUDA records without running: what the capture made holds garbage until a replay writes it, in place."""
    x = torch.arange(4.0)
    replay, out = emulated_capture(lambda: (x * 2, (x * 3).long()))
    doubled, tripled = out
    assert doubled.isnan().all() and (tripled == torch.iinfo(torch.int64).max).all()
    where, view = (doubled.data_ptr(), tripled.data_ptr()), doubled[1:]  # a view taken before the replay sees its results
    replay()
    assert doubled.tolist() == [0.0, 2.0, 4.0, 6.0] and tripled.tolist() == [0, 3, 6, 9] and view.tolist() == [2.0, 4.0, 6.0]
    assert (doubled.data_ptr(), tripled.data_ptr()) == where


X = torch.arange(6.0)
REFUSED = {  # what a CUDA stream being captured refuses (or syncs on), and the error naming it
    "nonzero": (lambda: X.nonzero(), SyncInCapture, "nonzero"),
    "nonzero as a tuple": (lambda: X.nonzero(as_tuple=True), SyncInCapture, "nonzero"),
    "where(condition)": (lambda: torch.where(X > 2), SyncInCapture, "where|nonzero"),  # whole under inference mode, else nonzero
    "argwhere": (lambda: torch.argwhere(X), SyncInCapture, "argwhere|nonzero"),
    "masked_select": (lambda: X.masked_select(X > 2), SyncInCapture, "masked_select"),
    "a boolean mask index": (lambda: X[X > 2], SyncInCapture, r"index\.Tensor with a boolean mask"),
    "a write through a boolean mask": (lambda: X.clone().__setitem__(X > 2, 0.0), SyncInCapture, r"index_put_\.default with a boolean mask"),
    "repeat_interleave(tensor repeats)": (lambda: X.repeat_interleave(torch.ones(6, dtype=torch.long)), SyncInCapture, "repeat_interleave"),
    "repeat_interleave(repeats)": (lambda: torch.repeat_interleave(torch.ones(6, dtype=torch.long)), SyncInCapture, "repeat_interleave"),
    "unique": (lambda: torch.unique(X), SyncInCapture, "unique"),
    "unique along a dim": (lambda: torch.unique(X.view(2, 3), dim=0), SyncInCapture, "unique_dim"),
    "unique_consecutive": (lambda: torch.unique_consecutive(X), SyncInCapture, "unique_consecutive"),
    "bincount, even with a minlength": (lambda: torch.bincount(X.long(), minlength=8), SyncInCapture, "bincount"),
    "multinomial": (lambda: torch.multinomial(X + 1, 1), SyncInCapture, "multinomial"),
    "equal": (lambda: torch.equal(X, X + 1), SyncInCapture, "equal"),
    "cpu()": (lambda: X.cpu(), HostReadInCapture, r"Tensor\.cpu"),
    "to('cpu')": (lambda: X.to("cpu"), HostReadInCapture, r"Tensor\.to "),
    "to(device=cpu)": (lambda: X.to(device=torch.device("cpu"), dtype=torch.float64), HostReadInCapture, r"Tensor\.to "),
    "numpy()": (lambda: X.numpy(), HostReadInCapture, r"Tensor\.numpy"),
    "tolist()": (lambda: X.tolist(), HostReadInCapture, r"Tensor\.tolist"),
    "item()": (lambda: X.sum().item(), HostReadInCapture, r"Tensor\.item|aten\.item"),
    "torch.tensor(list)": (lambda: torch.tensor([1.0, 2.0]), HostDataInCapture, "tensor"),
    "torch.tensor(scalar, like a device)": (lambda: X * torch.tensor(2.0, device=X.device), HostDataInCapture, "tensor"),
    "torch.as_tensor(list)": (lambda: torch.as_tensor([1, 2]), HostDataInCapture, "as_tensor"),
    "torch.from_numpy": (lambda: torch.from_numpy(np.ones(2)), HostDataInCapture, "lift_fresh"),  # bypasses torch function modes
    "new_tensor": (lambda: X.new_tensor([1.0]), HostDataInCapture, "new_tensor"),
    "a list index": (lambda: X[[0, 2]], HostDataInCapture, "__getitem__ with a list"),
}


@pytest.mark.parametrize("inference", [False, True], ids=["grad", "inference"])  # inference mode hands composite ops over whole
@pytest.mark.parametrize("case", list(REFUSED))
def test_the_emulated_capture_refuses_what_cuda_capture_refuses_naming_the_op(case: str, inference: bool):
    fn, error, name = REFUSED[case]
    state = torch.zeros(2)
    with torch.inference_mode(inference), pytest.raises(error, match=name):
        emulated_capture(lambda: (state.add_(1), fn()))
    assert issubclass(error, CaptureRefused) and state.tolist() == [0.0, 0.0]  # the refused capture left no effect


@pytest.mark.parametrize("inference", [False, True], ids=["grad", "inference"])
def test_the_emulated_capture_allows_what_cuda_capture_allows(inference: bool):
    """Fixed-shape ops on device values: int repeats, tensor repeats with their output size, a long index, a scalar write."""
    x, index = torch.arange(6.0), torch.tensor([4, 0])

    def fn() -> torch.Tensor:
        y = x.repeat_interleave(2) + x.repeat_interleave(torch.full((6,), 2), output_size=12)  # [12]
        y[0] = -1.0
        return torch.cat((y, x[index], torch.as_tensor(x).to(torch.float64).float()))  # [20]

    with torch.inference_mode(inference):
        want = fn()
        replay, got = emulated_capture(fn)
        replay()
    assert torch.equal(got, want)


def test_a_second_identical_request_replays_the_first_ones_captures(checkpoints):
    """The runner holds one KV cache across requests, reset in place: the captures (which read its tensors) survive, so a
    repeated request captures nothing new and gives the same tokens; a longer request than the cache holds starts over."""
    llm = _resident(checkpoints["olmoe"], graphs=True)
    graphs = llm.runner.graphs
    first, second = llm.generate([5, 6, 7, 8], SAMPLING), llm.generate([5, 6, 7, 8], SAMPLING)
    assert first.stats.graph_captures >= 2 and first.stats.graph_replays > 0
    assert second.token_ids == first.token_ids
    prefill_replays = int(second.stats.prompt_tokens - second.stats.reused_tokens == 1)  # a reused prompt's last token: a decode-shaped pass
    assert second.stats.graph_captures == 0
    assert second.stats.graph_replays == first.stats.graph_replays + first.stats.graph_captures + prefill_replays
    old = dict(graphs.passes)
    longer = llm.generate([5, 6, 7, 8], SamplingParams(max_new_tokens=200, temperature=0.0, stop_at_eos=False))
    assert longer.token_ids[:12] == first.token_ids and longer.stats.graph_captures > 0
    assert all(graphs.passes[k] is not old[k] for k in graphs.passes.keys() & old.keys())


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])  # plain experts; experts with biases
def test_experts_gathered_on_the_device_give_the_host_planned_tokens(checkpoints, arch: str):
    """The resident path off the CPU (slots gathered by index, no host read) decodes as the host-planned one."""
    gathered, planned = _resident(checkpoints[arch]), _resident(checkpoints[arch], device_indexed=False)
    with PoolReads(gathered.cache.pool) as reads:
        got = gathered.generate([5, 6, 7, 8], SAMPLING)
    assert got.token_ids == planned.generate([5, 6, 7, 8], SAMPLING).token_ids
    assert len(reads.copies) >= 2 * (SAMPLING.max_new_tokens - 1) * len(gathered.info.moe_layers)  # both matrices, every layer and step


def test_bench_compares_resident_decoding_with_and_without_graphs(checkpoints):
    """With a capture (`--cuda-graphs` on CUDA) bench adds a `resident+graphs` row, interleaved with eager `resident`."""
    llm = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", expert_cache=8), RunnerOptions(graph_capture=emulated_capture))
    settings = BenchSettings([[5, 6, 7, 8], [9, 10, 11]], 8, MOBILE, None, run_accelerate=False, progress=False, rounds=1, run_transformers=False)
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
        if (
            func in (torch.ops.aten.index_select.default, torch.ops.aten.index.Tensor)
            and args[0].dim() == 3
            and args[0].untyped_storage().data_ptr() == self.pool
        ):
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])  # plain experts; experts with biases
def test_resident_float_experts_are_read_in_place_by_grouped_matmuls(checkpoints, arch: str):
    """Where grouped matmuls run (CUDA, after the probe; forced here), a resident decode pass reads its experts where they
    lie: offsets built on the device, no weight gathered, and it replays from a capture with the host-planned tokens."""
    planned = _resident(checkpoints[arch], device_indexed=False, grouped=True)
    grouped = _resident(checkpoints[arch], graphs=True, grouped=True)
    graphs = grouped.runner.graphs
    with PoolReads(grouped.cache.pool) as reads:
        got = grouped.generate([5, 6, 7, 8], SAMPLING)
    assert got.token_ids == planned.generate([5, 6, 7, 8], SAMPLING).token_ids
    assert reads.copies == [] and graphs.failed is None and got.stats.graph_replays > 0
