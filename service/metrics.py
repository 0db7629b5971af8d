"""Prometheus metrics of one service instance, in a registry of its own (tests run several apps)."""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Sub-millisecond buckets: the stages of a request take tens of microseconds to a few milliseconds.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.006,
    0.008,
    0.012,
    0.016,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
GATE_BUCKETS = tuple(i / 10 for i in range(11))
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "coldwarm_requests",
            "Requests by endpoint, HTTP status and user group",
            ["endpoint", "status", "user_group"],
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "coldwarm_stage_latency_seconds",
            "Latency of each stage of /recommend: features, queue (waiting for the model thread), model, "
            "search, total",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "coldwarm_batch_size",
            "Requests computed in one model call (dynamic batching)",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.gate_cold_weight = Histogram(
            "coldwarm_gate_cold_weight",
            "Gate weight of the cold-start expert, by user group",
            ["user_group"],
            buckets=GATE_BUCKETS,
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "coldwarm_redis_errors",
            "Feature-store calls that failed or timed out",
            ["operation"],
            registry=self.registry,
        )
        self.degraded = Counter(
            "coldwarm_degraded_answers",
            "Answers served from the cold path, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "coldwarm_reloads", "Artifact reloads by result", ["result"], registry=self.registry
        )
        self.versions = Info(
            "coldwarm_serving",
            "Model and index versions being served, the search backend, the tower's device and format",
            registry=self.registry,
        )
        # Label children bound once (stage, gate, request); endpoints are route templates, statuses and
        # groups few, so these stay small.
        self._stages: dict[tuple[str, ...], Histogram] = {}
        self._gates: dict[tuple[str, ...], Histogram] = {}
        self._requests: dict[tuple[str, ...], Counter] = {}
        self.index_size = Gauge("coldwarm_index_items", "Items in the served index", registry=self.registry)

    def stage(self, name: str) -> Histogram:
        return bound(self._stages, self.stage_latency, name)

    def gate(self, group: str) -> Histogram:
        return bound(self._gates, self.gate_cold_weight, group)

    def request(self, endpoint: str, status: int, group: str) -> Counter:
        return bound(self._requests, self.requests, endpoint, str(status), group)

    def set_versions(
        self,
        model_version: str,
        index_version: str,
        n_items: int,
        search_backend: str,
        device: str,
        tower_format: str,
    ) -> None:
        self.versions.info(
            {
                "model_version": model_version,
                "index_version": index_version,
                "search_backend": search_backend,
                "device": device,
                "tower_format": tower_format,
            }
        )
        self.index_size.set(n_items)


M = TypeVar("M", Counter, Histogram)


def bound(children: dict[tuple[str, ...], M], metric: M, *labels: str) -> M:
    """``metric.labels(*labels)``, bound once and kept in ``children``: ``labels()`` on every request
    costs a lock and a dict lookup per call."""
    child = children.get(labels)
    if child is None:
        child = children[labels] = metric.labels(*labels)
    return child
