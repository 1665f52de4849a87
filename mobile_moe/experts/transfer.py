"""Host<->device traffic: the only module that owns CUDA streams and events (copies, and the side stream CUDA graphs are
captured on). On CPU the same calls run synchronously.

Two copy streams: demand loads (a layer is waiting for them) on a high-priority stream, prefetches on their own,
so a demand miss never queues behind prefetches. A copy into a slot waits only for the fences of that slot
(its last reader, its previous copy), never for all queued compute. Every device->host read the engine needs
goes through `to_host`, which counts it: host syncs stall the launch queue, so they are kept few and visible.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from typing import Any

import torch

DEMAND_PRIORITY = -1  # CUDA: lower is more urgent
PREFETCH_PRIORITY = 0
INDEX_RING_VALUES = 1 << 16  # int64 values staged for small index copies: hundreds of decode steps before a chunk is reused


@dataclass
class Ticket:
    """A copy in flight; `event` is None when the copy already finished (CPU). A read from the disk tier has a `future`."""

    event: torch.cuda.Event | None
    nbytes: int
    future: Future | None = None


Fence = torch.cuda.Event  # marks a point on a stream; a copy may be ordered after it


class IndexRing:
    """One preallocated (page-locked on CUDA) int64 buffer staging small host-built index tensors for their copy to the
    device: consecutive chunks, each rewritten only after the copy that read it has passed its fence."""

    def __init__(self, values: int = INDEX_RING_VALUES, pin: bool = True) -> None:
        self.buffer = torch.empty(values, dtype=torch.int64, pin_memory=pin)
        self._array = self.buffer.numpy()
        self.head, self.lap, self._start = 0, 0, 0  # next free value, wraps so far, start of the chunk last staged
        self._fences: deque[tuple[int, int, object]] = deque()  # (lap, chunk start, fence with .synchronize()), oldest first
        self.waits = 0  # fences that had to be waited for (a ring too small for the copies in flight)

    def stage(self, values: list[int]) -> torch.Tensor | None:
        """values -> int64 [n], a view of the next chunk (None when they do not fit the ring: stage them elsewhere)."""
        n = len(values)
        if not 0 < n <= len(self._array):
            return None
        if self.head + n > len(self._array):  # wrap: what is left of the lap before last is rewritten next
            self.head, self.lap = 0, self.lap + 1
            while self._fences and self._fences[0][0] < self.lap - 1:
                self._pass(self._fences.popleft()[2])
        while self._fences and self._fences[0][0] == self.lap - 1 and self._fences[0][1] < self.head + n:  # last lap's chunks here
            self._pass(self._fences.popleft()[2])
        chunk = self.buffer[self.head : self.head + n]
        self._array[self.head : self.head + n] = values
        self._start, self.head = self.head, self.head + n
        return chunk

    def fenced(self, fence: object) -> None:
        """The copy reading the chunk last staged is queued; `fence` passes once it has finished."""
        self._fences.append((self.lap, self._start, fence))

    def _pass(self, fence) -> None:
        """Wait for a fence (already passed in practice: the ring is far larger than the copies in flight)."""
        if not fence.query():
            self.waits += 1
            fence.synchronize()


class TransferEngine:
    """Copies expert buffers on dedicated streams and makes compute wait only for what it uses."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.demand_stream = torch.cuda.Stream(device, priority=DEMAND_PRIORITY) if self.is_cuda else None
        self.prefetch_stream = torch.cuda.Stream(device, priority=PREFETCH_PRIORITY) if self.is_cuda else None
        self.bytes_copied = 0
        self.copies = 0
        self.host_syncs = 0
        self.stalls = 0  # waits on copies that had not finished when compute needed them
        self.resolved_wait_s = 0.0  # CPU: synchronous copy time; CUDA: stalls already measured
        self.read_wait_s = 0.0  # time compute waited for disk reads
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.index_ring = IndexRing() if self.is_cuda else None

    def load(self, dst: torch.Tensor, src: torch.Tensor, prefetch: bool, after: Sequence[Fence | Ticket | None] = ()) -> Ticket:
        """Start copying host `src` into device `dst` once every fence in `after` has passed; returns a ticket to wait on."""
        nbytes = src.numel() * src.element_size()
        self.bytes_copied += nbytes
        self.copies += 1
        if not self.is_cuda:
            start = time.perf_counter()
            dst.copy_(src)
            self.resolved_wait_s += time.perf_counter() - start  # compute waits for a synchronous copy
            return Ticket(event=None, nbytes=nbytes)
        stream = self.prefetch_stream if prefetch else self.demand_stream
        assert stream is not None
        for dep in after:
            event = dep.event if isinstance(dep, Ticket) else dep
            if event is not None:
                stream.wait_event(event)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return Ticket(event=event, nbytes=nbytes)

    def wait(self, ticket: Ticket) -> None:
        """Order compute after the ticket's copy, on the device (no host sync); stalls are timed with event pairs.
        A disk read is waited for on the host (its error, e.g. a failed checksum, is raised here)."""
        if ticket.future is not None:
            future, ticket.future = ticket.future, None
            if not future.done():
                self.stalls += 1
                start = time.perf_counter()
                wait_for([future])
                self.read_wait_s += time.perf_counter() - start
            future.result()  # raises the read's error
        if ticket.event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        if ticket.event.query():
            compute.wait_event(ticket.event)
        else:
            self.stalls += 1
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(compute)
            compute.wait_event(ticket.event)
            end.record(compute)
            self._stall_events.append((begin, end))
        ticket.event = None

    def reader_fence(self) -> Fence | None:
        """A fence after everything compute has queued so far (the last read of slots released now)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def to_host(self, tensor: torch.Tensor) -> list:
        """`tensor.tolist()`, counted as one host sync (the launch queue drains before the host can read)."""
        self.host_syncs += 1
        return tensor.tolist()

    def to_device(self, values: list[int]) -> torch.Tensor:
        """A small int64 tensor of host values on the device, copied without a host sync (CUDA: staged in the pinned index ring)."""
        if self.index_ring is None:
            return torch.tensor(values, dtype=torch.int64)
        staged = self.index_ring.stage(values)
        if staged is None:  # larger than the ring: the caching host allocator keeps this one until its copy ends
            return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(self.device, non_blocking=True)
        out = staged.to(self.device, non_blocking=True)
        fence = torch.cuda.Event()
        fence.record(torch.cuda.current_stream(self.device))
        self.index_ring.fenced(fence)
        return out

    def wait_s(self) -> float:
        """Seconds compute has waited for copies so far (CPU: synchronous copy time; CUDA: device-side stalls), disk reads included."""
        if self._stall_events:
            self._stall_events[-1][1].synchronize()
            self.resolved_wait_s += sum(b.elapsed_time(e) for b, e in self._stall_events) / 1e3
            self._stall_events.clear()
        return self.resolved_wait_s + self.read_wait_s

    def synchronize(self) -> None:
        """Wait for every copy issued so far."""
        for stream in (self.demand_stream, self.prefetch_stream):
            if stream is not None:
                stream.synchronize()


class CaptureFailed(RuntimeError):
    """A CUDA graph capture failed; the message names the first error (the operation that broke the capture)."""


def cuda_capture(
    device: torch.device,
    cuda: Any = torch.cuda,
    end_allocate: Callable[[int, Any], None] | None = None,
) -> Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]:
    """A graph capture on `device` (not whichever device is current): each call records `fn`'s kernels into a new
    `CUDAGraph` on a side stream, all sharing one memory pool (their intermediates never live at once), and returns
    (replay, fn's outputs as the replays refresh them). Begun and ended by hand: whatever fails, the stream is restored and
    the allocator is told the capture ended, and the error raised is the first one (torch's `graph` context raises the
    end-of-capture error instead, from a process left on the capture stream). `cuda` and `end_allocate` stand in for
    torch.cuda and the allocator's end-of-capture call in tests."""
    index = device.index if device.index is not None else cuda.current_device()
    end_allocate = end_allocate if end_allocate is not None else getattr(torch._C, "_cuda_endAllocateToPool", None)
    with cuda.device(index):
        pool, stream = cuda.graph_pool_handle(), cuda.Stream(index)

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        graph, errors = cuda.CUDAGraph(), []
        with cuda.device(index):
            cuda.synchronize(index)
            with cuda.stream(stream):  # restored however the capture ends
                graph.capture_begin(pool, capture_error_mode="thread_local")
                try:
                    out = fn()
                except Exception as exc:  # noqa: BLE001 - kept, the capture is ended first
                    errors.append(exc)
                try:
                    graph.capture_end()
                except Exception as exc:  # noqa: BLE001 - it raises before telling the allocator; tell it here
                    errors.append(exc)
                    _end_allocation(end_allocate, index, pool)
        if errors:
            raise CaptureFailed(f"{type(errors[0]).__name__}: {errors[0]}".splitlines()[0]) from errors[0]
        return graph.replay, out

    return capture


def _end_allocation(end_allocate: Callable[[int, Any], None] | None, index: int, pool: Any) -> None:
    """Tell the caching allocator a failed capture's pool is no longer captured into (a no-op when it already knows)."""
    if end_allocate is None:
        return
    try:
        end_allocate(index, pool)
    except RuntimeError:  # capture_end got as far as telling it
        pass
