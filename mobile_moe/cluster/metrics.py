"""Engine metrics across Ray Serve replicas: each replica copies its /metrics counters and gauges into Ray's metrics
(exported by every node's metrics agent, tagged with the replica), and the ingress's /metrics reads them back from the
nodes' Prometheus endpoints, one series per replica under the single server's names."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics as ray_metrics

PREFIX = "mobile_moe_"
RAY_PREFIX = "ray_"  # Ray's Prometheus export names every application metric ray_<name>
MIRROR_PERIOD_S = 1.0  # how often a replica copies its metrics into Ray's (Ray exports them every metrics_report_interval_ms)


class RayMirror:
    """Copies a registry's counters (as increments) and gauges (as values) into Ray Serve metrics, which Serve tags with
    the application, deployment and replica; histograms stay out (Serve exports its own request latencies)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.counters: dict[str, ray_metrics.Counter] = {}
        self.gauges: dict[str, ray_metrics.Gauge] = {}
        self.pushed: dict[str, float] = {}  # each counter's total already added to Ray's
        self.stop = threading.Event()

    def push(self) -> None:
        """One copy of every counter and gauge."""
        for family in self.registry.collect():
            if family.type == "counter":
                total = sum(s.value for s in family.samples if s.name.endswith("_total"))
                counter = self.counters.get(family.name) or self.counters.setdefault(family.name, ray_metrics.Counter(family.name, family.documentation))
                if total > self.pushed.get(family.name, 0.0):
                    counter.inc(total - self.pushed.get(family.name, 0.0))
                    self.pushed[family.name] = total
            elif family.type == "gauge" and family.samples:
                gauge = self.gauges.get(family.name) or self.gauges.setdefault(family.name, ray_metrics.Gauge(family.name, family.documentation))
                gauge.set(family.samples[0].value)

    def start(self) -> None:
        """Copy every MIRROR_PERIOD_S in a daemon thread until `stop` is set."""

        def loop() -> None:
            while not self.stop.wait(MIRROR_PERIOD_S):
                self.push()

        self.push()
        threading.Thread(target=loop, name="mobile-moe-ray-metrics", daemon=True).start()


class Families:
    """A prometheus collector handing out fixed metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        """The families."""
        return iter(self.families)


def replica_metrics(exports: Iterable[str]) -> bytes:
    """The engine metrics in Ray's Prometheus exports (one text per node) as the single server names them, one series
    per replica (label `replica`), in the exposition format."""
    merged: dict[str, Metric] = {}
    for text in exports:
        for family in text_string_to_metric_families(text):
            name = family.name.removeprefix(RAY_PREFIX)
            if not family.name.startswith(RAY_PREFIX + PREFIX) or family.type not in ("counter", "gauge"):
                continue
            kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
            out = merged.setdefault(name, kind(name, family.documentation, labels=["replica"]))
            for sample in family.samples:
                if family.type == "gauge" or sample.name.endswith("_total"):
                    out.add_metric([sample.labels.get("replica", "")], sample.value)
    return generate_latest(Families(list(merged.values())))  # type: ignore[arg-type]
