"""Capturing a CUDA graph by hand (experts/transfer.py `cuda_capture`), against a stand-in of torch.cuda's graph API: the
capture runs on the engine's device, a failure restores the stream and ends the allocator's capture, and the error kept
is the first one (the operation that broke the capture), not the end-of-capture error it causes."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch

from mobile_moe.engine.graphs import DecodeGraphs
from mobile_moe.experts.cache import CacheStats
from mobile_moe.experts.transfer import CaptureFailed, cuda_capture

BROKEN = "operation not permitted when stream is capturing"


class FakeGraph:
    """A CUDAGraph whose capture_end fails as CUDA's does after an illegal operation (a raise before the allocator hears)."""

    def __init__(self, api: FakeCuda) -> None:
        self.api = api

    def capture_begin(self, pool: object, capture_error_mode: str = "global") -> None:
        self.api.events.append(("begin", self.api.device_now, self.api.stream_now, pool))

    def capture_end(self) -> None:
        self.api.events.append(("end", self.api.device_now, self.api.stream_now))
        if self.api.broken:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def replay(self) -> None:
        self.api.events.append(("replay",))


class FakeCuda:
    """The parts of torch.cuda a capture uses, recording which device and stream each call ran under."""

    def __init__(self, current: int = 0) -> None:
        self.device_now, self.stream_now, self.current = current, "default", current
        self.events: list[tuple] = []
        self.broken = False

    def current_device(self) -> int:
        return self.current

    @contextmanager
    def device(self, index: int):
        before, self.device_now = self.device_now, index
        try:
            yield
        finally:
            self.device_now = before

    @contextmanager
    def stream(self, stream: str):
        before, self.stream_now = self.stream_now, stream
        try:
            yield
        finally:
            self.stream_now = before

    def graph_pool_handle(self) -> tuple[int, int]:
        return (self.device_now, 7)

    def Stream(self, index: int) -> str:  # noqa: N802 - torch.cuda's name
        return f"side-{index}"

    def synchronize(self, index: int) -> None:
        self.events.append(("sync", index))

    def CUDAGraph(self) -> FakeGraph:  # noqa: N802 - torch.cuda's name
        return FakeGraph(self)


def test_a_capture_records_on_the_engines_device_not_the_current_one():
    """--device cuda:1 with device 0 current: the capture (and its pool and stream) belong to device 1."""
    api, ran_on = FakeCuda(current=0), []
    capture = cuda_capture(torch.device("cuda", 1), cuda=api, end_allocate=lambda *a: None)
    replay, out = capture(lambda: ran_on.append((api.device_now, api.stream_now)) or torch.ones(1))
    assert ran_on == [(1, "side-1")]
    assert ("begin", 1, "side-1", (1, 7)) in api.events and ("end", 1, "side-1") in api.events
    assert (api.device_now, api.stream_now) == (0, "default")
    replay()
    assert api.events[-1] == ("replay",)


def test_a_failed_capture_restores_the_stream_ends_the_allocators_capture_and_names_the_first_error():
    api, ended = FakeCuda(), []
    api.broken = True
    capture = cuda_capture(torch.device("cuda"), cuda=api, end_allocate=lambda index, pool: ended.append((index, pool)))

    def illegal() -> torch.Tensor:
        raise RuntimeError(f"CUDA error: {BROKEN}\nCUDA kernel errors might be asynchronously reported")

    with pytest.raises(CaptureFailed, match=BROKEN) as failure:
        capture(illegal)
    assert "previous error" not in str(failure.value)
    assert (api.device_now, api.stream_now) == (0, "default")  # torch.cuda.graph's __exit__ leaves the capture stream current
    assert ended == [(0, (0, 7))]
    api.broken = False
    assert capture(lambda: torch.zeros(2))[1].tolist() == [0.0, 0.0]  # the next capture starts clean


class OneKV:
    """What DecodeGraphs needs of a KV cache: a length and an identity."""

    length = 3


def test_decoding_goes_on_eagerly_after_a_failed_capture_with_the_first_error_in_the_warning(caplog):
    api = FakeCuda()
    api.broken = True
    graphs, kv, stats = DecodeGraphs(cuda_capture(torch.device("cuda"), cuda=api, end_allocate=lambda *a: None)), OneKV(), CacheStats()

    def eager(ids: torch.Tensor) -> torch.Tensor:
        if api.stream_now != "default":
            raise RuntimeError(f"CUDA error: {BROKEN}")
        return ids.float() + 1

    project_log = logging.getLogger("mobile_moe")
    project_log.addHandler(caplog.handler)
    try:
        outs = [graphs.run(("big",), torch.tensor([i]), kv, stats, eager).item() for i in range(3)]
    finally:
        project_log.removeHandler(caplog.handler)
    assert outs == [1.0, 2.0, 3.0] and graphs.captures == 0 and graphs.replays == 0
    assert graphs.failed is not None and BROKEN in graphs.failed and BROKEN in caplog.text and kv.length == 3
