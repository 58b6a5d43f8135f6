"""Prometheus metrics, in a registry of their own so several proxies can share a process."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.streams = Gauge(
            "xdsproxy_streams", "Open downstream ADS streams", ["protocol"], registry=self.registry
        )
        self.streams_opened = Counter(
            "xdsproxy_streams_opened",
            "Downstream ADS streams accepted",
            ["protocol"],
            registry=self.registry,
        )
        self.pushes = Counter(
            "xdsproxy_pushes",
            "Responses sent to Envoy, by type and origin (relayed from Istiod or local)",
            ["type", "origin"],
            registry=self.registry,
        )
        self.acked_here = Counter(
            "xdsproxy_acked_here",
            "Istiod responses that changed nothing a scoped sidecar holds: ACKed by xdsproxy, "
            "not sent to Envoy",
            ["type"],
            registry=self.registry,
        )
        self.upstream_bytes = Counter(
            "xdsproxy_upstream_bytes",
            "Response bytes received from Istiod",
            ["type"],
            registry=self.registry,
        )
        self.downstream_bytes = Counter(
            "xdsproxy_downstream_bytes",
            "Response bytes sent to Envoy",
            ["type"],
            registry=self.registry,
        )
        self.nacks = Counter(
            "xdsproxy_nacks",
            "Responses Envoy rejected, by type and origin",
            ["type", "origin"],
            registry=self.registry,
        )
        self.als_rejections = Counter(
            "xdsproxy_als_rejections",
            "Access log streams or entries that taught nothing, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.fail_open = Gauge(
            "xdsproxy_fail_open",
            "1 while scoped sidecars get full config because the egress has no ready endpoint",
            registry=self.registry,
        )
        self.egress_nodes = Gauge(
            "xdsproxy_egress_nodes",
            "Lazy egress nodes connected to this replica",
            registry=self.registry,
        )
        self.als_held = Gauge(
            "xdsproxy_als_held_entries",
            "Access log entries held for a service not known here yet (up to 1,000, for 30 s)",
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
