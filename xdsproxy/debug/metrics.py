"""Prometheus metrics, in a registry of their own so several proxies can share a process."""

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.als_rejections = Counter(
            "xdsproxy_als_rejections",
            "Access log streams or entries that taught nothing, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.learns = Counter(
            "xdsproxy_learns",
            "Dependencies learned from the egress's access logs",
            registry=self.registry,
        )
        self.learn_latency = Histogram(
            "xdsproxy_learn_latency_seconds",
            "From the egress seeing a request to the widened scope being queued for Envoy",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

        self.store_errors = Counter(
            "xdsproxy_store_errors", "Store operations that failed", registry=self.registry
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0
