"""The one engine worker: owns the LLM's batch, admits queued jobs between steps (continuous batching), streams each
row's tokens back to the asking thread or loop, and drops rows whose clients went away."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.policy.policies import Policy


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


@dataclass
class Job:
    """One generation request; `on_token` returns False to stop (the client went away)."""

    prompt: list[int]
    sampling: SamplingParams
    policy: PolicyConfig
    on_token: Callable[[int], bool]
    on_done: Callable[[GenerationResult | None, BaseException | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    result: GenerationResult | None = None  # the row's result as it grows, once admitted


class EngineWorker:
    """A daemon thread decoding up to `max_batch` jobs together on one LLM; at most `max_queue` jobs wait or run.

    Between steps it admits waiting jobs into free rows, so a new request starts at the next step (its prompt
    prefilled a chunk per step while the other rows go on decoding) rather than after the running ones.
    """

    def __init__(self, llm: LLM, max_queue: int, max_batch: int = 1, on_admit: Callable[[float], None] | None = None) -> None:
        self.llm, self.max_queue, self.max_batch = llm, max_queue, max_batch
        self.on_admit = on_admit  # called with each job's seconds in the queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batch = llm.batch_decoder(max_batch)
        self._held = 0  # jobs waiting or running
        self._count_lock = threading.Lock()
        self._closing = False
        self.thread = threading.Thread(target=self._loop, name="mobile-moe-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull at once."""
        with self._count_lock:
            if self._held >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} requests); retry later")
            self._held += 1
        self.jobs.put(job)

    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._held

    def occupancy(self) -> int:
        """Rows of the batch in use (prefilling or decoding)."""
        return len(self.batch.rows)

    def close(self) -> None:
        """Stop after the jobs already queued."""
        self.jobs.put(None)

    def _loop(self) -> None:
        while not (self._closing and not self.batch.rows):
            self._admit(block=not self.batch.rows)
            for row in [r for r in self.batch.rows if r.tag.cancelled.is_set()]:
                self.batch.cancel(row)
                self._done(row.tag, row.result, None)
            if not self.batch.rows:
                continue
            try:
                with self.llm.lock:
                    finished = self.batch.step()
            except BaseException as e:  # the step's requests fail; the worker and the engine go on with a fresh batch
                for row in self.batch.rows:
                    self._done(row.tag, None, e)
                self.batch = self.llm.batch_decoder(self.max_batch)
                continue
            for row in finished:
                row.result.text = self.llm.decode(row.result.token_ids)
                self._done(row.tag, row.result, None)

    def _admit(self, block: bool) -> None:
        """Move waiting jobs into free rows (waiting for one when the batch is idle)."""
        while self.batch.room and not self._closing:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None:
                self._closing = True
                return
            if self.on_admit is not None:
                self.on_admit(time.perf_counter() - job.submitted)
            if job.cancelled.is_set():
                self._done(job, None, None)
                continue
            try:
                ids, sampling, policy = self.llm.prepare(job.prompt, job.sampling, job.policy)
                job.result = self.batch.add(ids, sampling, Policy(policy), self._on_token(job), tag=job).result
            except BaseException as e:
                self._done(job, None, e)

    @staticmethod
    def _on_token(job: Job) -> Callable[[int], bool]:
        """The row's token callback: hand the token out unless the client went away."""
        return lambda token: not job.cancelled.is_set() and job.on_token(token)

    def _done(self, job: Job, result: GenerationResult | None, err: BaseException | None) -> None:
        """Report a job's end and free its place in the queue."""
        try:
            job.on_done(result, err)
        finally:
            with self._count_lock:
                self._held -= 1
