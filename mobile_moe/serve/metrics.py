"""/metrics: request counters, queue and batch gauges, and the engine's expert-cache counters, in the app's own registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.serve.worker import EngineWorker

COUNTERS = {  # name -> help; each exported as mobile_moe_<name>_total
    "requests": "Generations that finished",
    "failed_requests": "Generations that failed",
    "prompt_tokens": "Prompt tokens",
    "completion_tokens": "Generated tokens",
    "fallback_tokens": "Decode steps recomputed with big",
    "prefix_hits": "Generations that reused a held prompt prefix",
    "reused_tokens": "Prompt tokens taken from a held prefix instead of prefilled",
}


ENGINE_COUNTERS = {  # the expert cache's own counters (rows decoded together share every expert load): name -> (CacheStats field, help)
    "expert_hits": ("hits", "Routed experts found cached"),
    "expert_misses": ("misses", "Routed experts loaded on demand"),
    "h2d_bytes": ("h2d_bytes", "Expert bytes copied host to device"),
    "disk_bytes": ("disk_bytes", "Expert bytes read from the disk store"),
}


class EngineCounters:
    """A prometheus collector reading the engine's expert-cache counters when scraped."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def collect(self) -> Iterator[CounterMetricFamily]:
        """One counter per ENGINE_COUNTERS entry."""
        stats = self.llm.cache.stats
        for name, (field, text) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"mobile_moe_{name}", text, value=getattr(stats, field))


class Metrics:
    """/metrics through prometheus_client, in a registry of this app's own (no process-wide state)."""

    def __init__(self, worker: EngineWorker) -> None:
        self.registry = CollectorRegistry()
        self.counters = {name: Counter(f"mobile_moe_{name}", text, registry=self.registry) for name, text in COUNTERS.items()}
        self.totals = dict.fromkeys(COUNTERS, 0.0)  # the same sums, for the derived gauges
        self.decode_s = 0.0
        Gauge("mobile_moe_queue_depth", "Requests waiting or running", registry=self.registry).set_function(worker.depth)
        Gauge("mobile_moe_batch_occupancy", "Rows of the decode batch in use", registry=self.registry).set_function(worker.occupancy)
        Gauge("mobile_moe_batch_rows", "Rows the decode batch holds (--max-batch)", registry=self.registry).set(worker.max_batch)
        self.queue_seconds = Histogram(
            "mobile_moe_queue_seconds",
            "Seconds a request waited before joining the batch",
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        governor = worker.llm.governor
        Gauge(
            "mobile_moe_batch_little_first_steps", "Batched steps whose mobile rows decoded little first (measured cheaper)", registry=self.registry
        ).set_function(lambda: governor.little_steps)
        Gauge(
            "mobile_moe_batch_big_instead_steps", "Batched steps whose mobile rows ran big (little measured dearer at that batch size)", registry=self.registry
        ).set_function(lambda: governor.big_steps)
        worker.on_admit = self.queue_seconds.observe
        self.registry.register(EngineCounters(worker.llm))
        Gauge("mobile_moe_decode_tokens_per_second", "Generated tokens per second of decoding, all requests", registry=self.registry).set_function(self._tok_s)
        Gauge(
            "mobile_moe_prefix_cache_bytes", "Bytes the held prefixes occupy (KV entries of their positions, recurrent snapshots)", registry=self.registry
        ).set_function(lambda: worker.llm.runner.prefix_bytes)
        Gauge("mobile_moe_fallback_rate", "Share of generated tokens recomputed with big", registry=self.registry).set_function(self._fallback_rate)

    def record(self, result: GenerationResult | None, prompt_tokens: int) -> None:
        """Add one finished generation (None: one that failed)."""
        if result is None:
            self._add("failed_requests", 1)
            return
        s = result.stats
        self._add("requests", 1)
        self._add("prompt_tokens", prompt_tokens)
        self._add("completion_tokens", len(result.token_ids))
        self._add("fallback_tokens", s.fallback_tokens)
        self._add("prefix_hits", s.prefix_hits)
        self._add("reused_tokens", s.reused_tokens)
        self.decode_s += s.decode_s

    def _add(self, name: str, amount: float) -> None:
        self.counters[name].inc(amount)
        self.totals[name] += amount

    def _tok_s(self) -> float:
        return self.totals["completion_tokens"] / self.decode_s if self.decode_s else 0.0

    def _fallback_rate(self) -> float:
        return self.totals["fallback_tokens"] / max(self.totals["completion_tokens"], 1.0)

    def text(self) -> bytes:
        """The Prometheus exposition format (with # HELP and # TYPE lines)."""
        return generate_latest(self.registry)
