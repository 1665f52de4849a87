"""A small pool of reader threads for the disk tier, with priorities: demand > fallback prefetch > lookahead.

Reads are queued by (priority, arrival); a demand for a record already queued as a prefetch promotes it, so a
demand read never waits behind prefetches. Threads run the store's `read` (a preadv plus an xxh3 hash, both outside
the GIL), several in flight so the disk's queue stays full.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future
from enum import IntEnum
from typing import Protocol

import torch

DEFAULT_READERS = 4


class Priority(IntEnum):
    """Lower is served first."""

    DEMAND = 0  # a layer is waiting for it
    FALLBACK = 1  # MoBiLE's other half, before a big pass
    LOOKAHEAD = 2  # a guess from the next layer's router


class RecordSource(Protocol):
    """What the pool reads from (a `DiskStore`)."""

    def read(self, layer: int, expert: int, dst: torch.Tensor) -> int:
        """Fill dst with one expert's record; returns the bytes read."""
        ...


def _job_key(key: tuple[int, int], dst: torch.Tensor) -> tuple[int, int, int]:
    """What makes two reads the same read: the expert and where it goes."""
    return (*key, dst.data_ptr())


class _Job:
    def __init__(self, key: tuple[int, int], dst: torch.Tensor, priority: Priority) -> None:
        self.key, self.dst, self.priority = key, dst, priority
        self.future: Future[int] = Future()
        self.started = False


class ReadPool:
    """Reader threads over one record source; `submit` returns a future of the bytes read."""

    def __init__(self, source: RecordSource, readers: int = DEFAULT_READERS) -> None:
        self.source = source
        self._heap: list[tuple[int, int, _Job]] = []
        self._queued: dict[tuple[int, int, int], _Job] = {}  # (layer, expert, destination address) -> its job
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.busy_wall_s = 0.0  # wall time with at least one read in flight
        self._active, self._busy_since = 0, 0.0
        self.bytes_read = 0
        self._threads = [threading.Thread(target=self._work, name=f"expert-reader-{i}", daemon=True) for i in range(readers)]
        for t in self._threads:
            t.start()

    def submit(self, key: tuple[int, int], dst: torch.Tensor, priority: Priority) -> Future[int]:
        """Queue a read of expert `key` = (layer, expert) into dst; a queued read of the same expert into the same buffer
        is promoted instead (a read into another buffer, e.g. an older cache's slot, is never shared)."""
        with self._cv:
            job = self._queued.get(_job_key(key, dst))
            if job is not None:
                if priority < job.priority and not job.started:
                    job.priority = priority
                    heapq.heappush(self._heap, (int(priority), next(self._seq), job))  # the old entry is skipped when popped
                return job.future
            job = _Job(key, dst, priority)
            self._queued[_job_key(key, dst)] = job
            heapq.heappush(self._heap, (int(priority), next(self._seq), job))
            self._cv.notify()
            return job.future

    def _next(self) -> _Job | None:
        """The most urgent queued job (None once closed)."""
        with self._cv:
            while True:
                while self._heap:
                    priority, _, job = heapq.heappop(self._heap)
                    if job.started or priority != job.priority:  # served already, or superseded by a promotion
                        continue
                    job.started = True
                    return job
                if self._closed:
                    return None
                self._cv.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            start = time.perf_counter()
            with self._cv:
                if self._active == 0:
                    self._busy_since = start
                self._active += 1
            try:
                got = self.source.read(*job.key, job.dst)
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits for this read)
                self._done(job, 0)
                job.future.set_exception(e)
                continue
            self._done(job, got)
            job.future.set_result(got)

    def _done(self, job: _Job, got: int) -> None:
        """Bookkeeping after a read (failed ones count no bytes)."""
        now = time.perf_counter()
        with self._cv:
            self._queued.pop(_job_key(job.key, job.dst), None)
            self._active -= 1
            if self._active == 0:
                self.busy_wall_s += now - self._busy_since
            self.bytes_read += got

    def close(self) -> None:
        """Stop the readers once the queue is empty."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()
