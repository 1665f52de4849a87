"""The one engine worker: owns the LLM, takes jobs from a bounded queue, streams tokens back to the asking thread or loop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM


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


class EngineWorker:
    """A daemon thread running jobs one at a time on one LLM; at most `max_queue` jobs wait or run."""

    def __init__(self, llm: LLM, max_queue: int) -> None:
        self.llm = llm
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.max_queue = max_queue
        self._held = 0  # jobs waiting or running
        self._count_lock = threading.Lock()
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

    def close(self) -> None:
        """Stop after the jobs already queued."""
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                result = None if job.cancelled.is_set() else self.llm.generate(
                    job.prompt, job.sampling, job.policy, on_token=lambda t: not job.cancelled.is_set() and job.on_token(t))
                job.on_done(result, None)
            except BaseException as e:  # the request fails; the worker and the engine go on
                job.on_done(None, e)
            finally:
                with self._count_lock:
                    self._held -= 1
