"""CUDA graphs of decode passes with every expert resident: one capture per (mode, recording, little model, key span), replayed per token.

A resident decode pass reads nothing on the host (the position lives on the device, the slots come from the device-side
expert-to-slot table, a fixed key span keeps the shapes): its ~500-3,000 kernel launches can be recorded once and
replayed as one launch. What a capture records is the pass's kernels on fixed tensors, so the host-side effects of the
pass (the KV length, cache hit counts) are undone after the capture and redone after each replay here. Each key's first
pass runs eagerly (lazy library set-up stays out of the capture), its second is captured. Captures belong to one KV
cache (the tensors they read): a pass on another drops them. A capture that fails turns graphs off with a warning;
decoding goes on eagerly.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from mobile_moe.experts.cache import CacheStats
from mobile_moe.layers.kv_cache import KVCache

log = logging.getLogger("mobile_moe")

GRAPH_SPAN_BUCKET = 128  # decode passes read a multiple of this many keys: one capture serves 128 positions (<= 127 masked keys)


class GraphCapture(Protocol):
    """Records `fn`'s kernels without leaving its effects; returns (replay, fn's outputs as the replays refresh them)."""

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]: ...


def cuda_capture(pool: tuple[int, int] | None = None) -> GraphCapture:
    """Capture into `torch.cuda.CUDAGraph`s sharing one memory pool (their intermediates never live at once)."""
    pool = torch.cuda.graph_pool_handle() if pool is None else pool

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):  # records kernels; none runs, so no state changes on the device
            out = fn()
        return graph.replay, out

    return capture


@dataclass
class CapturedPass:
    """One key's graph: its input buffer, replay, output and the host-side counts one pass adds."""

    ids: torch.Tensor  # [1] int64: the token the replay reads
    replay: Callable[[], None]
    logits: torch.Tensor  # [V] refreshed by each replay
    hits: int  # cache hits the pass counts


class DecodeGraphs:
    """The captured decode passes of the KV cache being decoded."""

    def __init__(self, capture: GraphCapture) -> None:
        self.capture = capture
        self.passes: dict[tuple, CapturedPass] = {}
        self.warmed: set[tuple] = set()
        self.kv: weakref.ref[KVCache] | None = None
        self.failed: str | None = None  # why capturing was turned off
        self.replays = 0
        self.captures = 0  # passes captured successfully
        self.capture_s = 0.0  # seconds spent capturing (failed attempts included)

    def run(self, key: tuple, ids: torch.Tensor, kv: KVCache, stats: CacheStats, eager: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """ids [1] -> logits [V] of one decode pass `eager(ids)` on kv: replayed when `key` (the pass's mode, recording, little model and
        span) has a capture on this kv, captured on its second pass, eager before and when capturing failed."""
        if self.failed is not None:
            return eager(ids)
        if self.kv is None or self.kv() is not kv:
            self.passes, self.warmed, self.kv = {}, set(), weakref.ref(kv)  # frees the old captures' tensors
        captured = self.passes.get(key)
        if captured is None:
            if key not in self.warmed:
                self.warmed.add(key)
                return eager(ids)
            captured = self._capture(ids, kv, stats, eager)
            if captured is None:
                return eager(ids)
            self.passes[key] = captured
        captured.ids.copy_(ids)
        captured.replay()
        self.replays += 1
        kv.length += 1  # the device-held position moved inside the graph
        stats.hits += captured.hits
        return captured.logits.clone()  # the next replay overwrites the graph's own output

    def _capture(self, ids: torch.Tensor, kv: KVCache, stats: CacheStats, eager: Callable[[torch.Tensor], torch.Tensor]) -> CapturedPass | None:
        """Record one pass; undo its host-side effects (length, hits), which each replay redoes."""
        static = ids.clone()
        length, hits = kv.length, stats.hits
        start = time.perf_counter()
        try:
            replay, logits = self.capture(lambda: eager(static))
        except Exception as exc:  # noqa: BLE001 - any capture failure leaves eager decoding, which is always correct
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("CUDA graph capture failed (%s); decoding runs eagerly", self.failed)
            return None
        finally:
            self.capture_s += time.perf_counter() - start
            added = stats.hits - hits
            kv.length, stats.hits = length, hits
        self.captures += 1
        return CapturedPass(static, replay, logits, added)
