"""What a bench run brings back beside tok/s: whether passes replayed from graphs compute what eager passes do, the host
syncs one decode step makes (and which of them the engine does not count), the expert path each system ran, kernel
launches per token, peak device memory and the pinned host->device link's rate."""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import torch
from torch.overrides import TorchFunctionMode

from mobile_moe.bench.costinputs import OpCounts
from mobile_moe.config import SamplingParams
from mobile_moe.engine.graphs import CapturedPass, DecodeGraphs
from mobile_moe.engine.llm import LLM
from mobile_moe.engine.passes import BIG
from mobile_moe.engine.runner import Runner
from mobile_moe.layers.kv_cache import KVCache
from mobile_moe.layers.moe import ExpertMode

T = TypeVar("T")
log = logging.getLogger("mobile_moe")
PACKAGE = Path(__file__).resolve().parents[1]  # mobile_moe/: host syncs are reported at the package's own call sites
H2D_PROBE_BYTES = 256 << 20
CHECK_STEPS = 8  # greedy decode steps compared eager against replayed
TIMED_REPLAYS = 20
CUDA_SYNC_WARNING = "synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") says
HOST_READS = frozenset(
    {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
    }
)  # what waits for the device on CUDA
FOUND_BY = MappingProxyType({"cuda": "CUDA sync debug mode", "cpu": "host reads via a torch function mode"})
SYNC_METHODS = MappingProxyType(
    {
        "cuda": "torch.cuda.set_sync_debug_mode('warn'): every synchronizing CUDA operation",
        "cpu": "a torch function mode listing host reads of tensors (item, tolist, cpu, numpy, bool/int/float/index): each would wait for the device on CUDA",
    }
)


def guarded(fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """(fn's result, None), or (None, its error in one line) when it raises: a check that fails must not cost a run the figures
    it has measured (the error goes into the report instead)."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - whatever failed is reported, the run goes on
        log.warning("bench check failed: %s: %s", type(exc).__name__, exc)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def launches_per_token(
    ops: OpCounts, layers: int, moe_layers: int, experts_per_token: float, passes_per_token: float = 1.0, replayed_share: float = 0.0
) -> float:
    """Kernel launches per decode token from one eager pass's counts: the fixed part per pass (a fallback runs a second pass), a
    part per expert computed; a pass replayed from a graph is one launch."""
    fixed = ops.per_pass + layers * ops.per_layer + moe_layers * ops.per_moe_layer
    eager = passes_per_token * fixed + experts_per_token * ops.per_expert
    return replayed_share + (1.0 - replayed_share) * eager


def h2d_probe_gb_s(device: torch.device, nbytes: int = H2D_PROBE_BYTES, rounds: int = 3) -> float | None:
    """Best rate (GB/s) of `rounds` pinned host->device copies of `nbytes` after a warm-up; None off CUDA (no link)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def reset_peak(device: torch.device) -> None:
    """Start a new peak of allocated device memory (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak allocated device memory (MiB) since `reset_peak`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def call_site() -> str:
    """The innermost frame of the package on the stack, as path:line under mobile_moe/ (this module's own frames skipped)."""
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != here and PACKAGE in path.parents:
            return f"{path.relative_to(PACKAGE)}:{frame.lineno}"
    return "outside mobile_moe"


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors by call site and method (the CPU stand-in for CUDA's sync debug mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if func in HOST_READS:
            self.sites[f"{call_site()} {func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def cuda_syncs() -> Iterator[Counter[str]]:
    """Counts synchronizing CUDA operations by call site while the block runs (sync debug mode `warn`, its warnings caught)."""
    sites: Counter[str] = Counter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def note(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 (warnings' signature)
            if CUDA_SYNC_WARNING in str(message):
                sites[f"{call_site()} sync"] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@contextmanager
def host_reads() -> Iterator[Counter[str]]:
    """Counts host reads of tensors by call site while the block runs (`HostReads`)."""
    with HostReads() as mode:
        yield mode.sites


def decode_step_syncs(llm: LLM, prompt: list[int]) -> dict:
    """The host syncs of one big decode step after `prompt` (its pass, then the read of its token, as generate reads it): by call
    site, how many the engine counts (`TransferEngine.to_host`), the rest hidden; and how they were found (`SYNC_METHODS`)."""
    runner, transfer = llm.runner, llm.cache.transfer
    kv = runner.new_kv(len(prompt) + 1)
    token = transfer.to_host(runner.forward(runner.ids(prompt), kv, BIG).argmax().view(1))
    counted = transfer.host_syncs
    kind = "cuda" if llm.device.type == "cuda" else "cpu"
    with cuda_syncs() if kind == "cuda" else host_reads() as sites:
        transfer.to_host(runner.forward(runner.ids(token), kv, BIG).argmax().view(1))
    counted = transfer.host_syncs - counted
    seen = sum(sites.values())
    return {
        "method": SYNC_METHODS[kind],
        "found_by": FOUND_BY[kind],
        "syncs": seen,
        "counted_by_engine": counted,
        "hidden": max(seen - counted, 0),
        "sites": dict(sites.most_common()),
    }


@dataclass(frozen=True)
class GraphFigures:
    """Replayed graphs against eager decoding, with every expert resident."""

    equals_eager: bool | None  # every compared step's logits bit for bit; None when no pass was replayed (capture failed)
    replay_ms_per_token: float | None  # one captured pass replayed alone, device-synced; None without a capture
    captures_per_request: int  # captures the second of two identical requests made (0 once captures outlive a request)
    steps: int  # decode steps compared


def graph_figures(llm: LLM, prompt: list[int], steps: int = CHECK_STEPS, replays: int = TIMED_REPLAYS) -> GraphFigures:
    """A fresh all-resident cache and graphs: `steps` greedy decode passes eager, then the same through the graphs (logits compared
    with torch.equal), a captured pass timed alone, and two identical requests (the captures the second makes)."""
    llm.reset_cache(llm.loaded.store.total_experts, graphs=False)
    llm.cache.load_all()
    eager, _ = greedy_logits(llm.runner, prompt, steps, replays)
    llm.reset_cache(llm.loaded.store.total_experts)
    llm.cache.load_all()
    graphs = llm.runner.graphs
    assert graphs is not None, "graph_figures needs the runner's graphs (--cuda-graphs)"
    replayed0 = graphs.replays
    replayed, kv = greedy_logits(llm.runner, prompt, steps, replays)
    equal = None if graphs.replays == replayed0 else all(torch.equal(a, b) for a, b in zip(eager, replayed, strict=True))
    ms = replay_ms_per_token(graphs, kv, replays)
    del kv
    sampling = SamplingParams(max_new_tokens=steps, temperature=0.0, stop_at_eos=False)
    llm.generate(prompt, sampling)
    first = graphs.captures
    llm.generate(prompt, sampling)
    return GraphFigures(equal, ms, graphs.captures - first, steps)


def greedy_logits(runner: Runner, prompt: list[int], steps: int, room: int = 0) -> tuple[list[torch.Tensor], KVCache]:
    """Logits [V] of `steps` greedy big decode passes after `prompt` (each token taken on the device: no host read), and the KV
    cache, with `room` positions left over."""
    kv = runner.new_kv(len(prompt) + steps + room)
    logits = runner.forward(runner.ids(prompt), kv, BIG)
    out = []
    for _ in range(steps):
        logits = runner.forward(logits.argmax().view(1), kv, BIG)  # [V]
        out.append(logits)
    return out, kv


def replay_ms_per_token(graphs: DecodeGraphs, kv: KVCache, count: int) -> float | None:
    """Milliseconds per replay of the captured big pass serving kv's next position, alone: up to `count` replays (as many positions as
    its key span still holds) between device syncs; the device-held position they advanced is put back. None without one."""
    found = serving_pass(graphs, kv)
    if found is None:
        return None
    captured, n = found[0], min(count, found[1])
    sync = _synchronizer(kv.position.device)
    with torch.inference_mode():  # as decoding replays (the pass's tensors are inference tensors)
        sync()
        start = time.perf_counter()
        for _ in range(n):
            captured.replay()
        sync()
        elapsed = time.perf_counter() - start
        kv.position.sub_(n)
    return elapsed * 1e3 / n


def serving_pass(graphs: DecodeGraphs, kv: KVCache) -> tuple[CapturedPass, int] | None:
    """The captured big, unrecorded pass whose key span holds kv's next position (the narrowest), and how many positions it has left."""
    if graphs.kv is None or graphs.kv() is not kv:
        return None
    spans = [(key[-1], captured) for key, captured in graphs.passes.items() if key[0].mode is ExpertMode.BIG and not key[0].record and key[-1] > kv.length]
    if not spans:
        return None
    span, captured = min(spans, key=lambda s: s[0])
    return captured, span - kv.length


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for `device`'s queued work (nothing to wait for off CUDA)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
