"""Prometheus metrics, in a registry of their own so several proxies can share a process.

Every series exists from start, at zero, so that a `rate()` or an absent-series alert works
before the first event; the `type` label is bounded (an unknown type URL counts as `other`).
"""

import platform
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from xdsproxy import __version__
from xdsproxy.wire.typeurls import SHORT_NAMES

TYPES = (*dict.fromkeys(SHORT_NAMES.values()), "other")
PROTOCOLS = ("SotW", "Delta")
ORIGINS = ("relayed", "local")
STATES = ("SYNCED", "STALE", "NACK", "NOT SENT")
ALS_REJECTION_REASONS = (
    "peer_not_allowed",
    "malformed",
    "unknown_service_expired",
    "not_a_mesh_service",
    "unknown_source",
    "ambiguous_source",
    "forged_source",
    "forged_claim",
    "internal_error",
)
# gRPC status codes xdsproxy sees ending an upstream stream; any other counts as `OTHER`.
UPSTREAM_CODES = (
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
    "INTERNAL",
    "OK",
    "OTHER",
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def metric_type(type_url: str) -> str:
    """The bounded `type` label: `CDS`... for the types xdsproxy knows, else `other`."""
    return SHORT_NAMES.get(type_url, "other")


class SyncStates(Collector):
    """`xdsproxy_sidecars{type, state}`, counted at scrape time from the live streams."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self.states = states

    def collect(self):
        family = GaugeMetricFamily(
            "xdsproxy_sidecars",
            "Connected nodes by xDS type subscribed and sync state (as xdsproxy status shows)",
            labels=["type", "state"],
        )
        counts = dict.fromkeys(((t, s) for t in TYPES for s in STATES), 0)
        for type_url, state in self.states():
            counts[(metric_type(type_url), state)] += 1
        for (kind, state), count in counts.items():
            family.add_metric([kind, state], count)
        yield family


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
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.store_errors = Counter(
            "xdsproxy_store_errors", "Store operations that failed", registry=self.registry
        )
        self.push_latency = Histogram(
            "xdsproxy_push_latency_seconds",
            "From an Istiod response received to the resulting push written to Envoy",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_outbox_bytes = Gauge(
            "xdsproxy_upstream_outbox_bytes",
            "Bytes queued for Istiod across streams (Envoy's answers, xdsproxy's own ACKs)",
            registry=self.registry,
        )
        self.upstream_outbox_pauses = Counter(
            "xdsproxy_upstream_outbox_pauses",
            "Times a sidecar's requests stopped being read because too much waited for Istiod",
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "xdsproxy_upstream_errors",
            "Upstream (Istiod) streams that ended in error, by gRPC status code",
            ["code"],
            registry=self.registry,
        )
        Info("xdsproxy_build", "The running xdsproxy", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._create_every_series()

    def _create_every_series(self) -> None:
        for protocol in PROTOCOLS:
            self.streams.labels(protocol)
            self.streams_opened.labels(protocol)
        for kind in TYPES:
            for origin in ORIGINS:
                self.pushes.labels(kind, origin)
                self.nacks.labels(kind, origin)
            for per_type in (
                self.acked_here,
                self.upstream_bytes,
                self.downstream_bytes,
                self.push_latency,
            ):
                per_type.labels(kind)
        for reason in ALS_REJECTION_REASONS:
            self.als_rejections.labels(reason)
        for code in UPSTREAM_CODES:
            self.upstream_errors.labels(code)

    def watch_sync_states(self, states: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Count nodes by (type URL, state) from `states` at each scrape."""
        self.registry.register(SyncStates(states))

    def upstream_error(self, code_name: str) -> None:
        self.upstream_errors.labels(code_name if code_name in UPSTREAM_CODES else "OTHER").inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0
