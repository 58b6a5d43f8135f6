"""Evidence of direct use, for ageing: a sampled access logger on a sidecar's outbound HTTP
listeners streams a small share of its requests to xdsproxy, which only refreshes the last-seen
time of dependencies the workload already has (it never adds one from these entries).

Traffic that goes direct never passes the egress, so without this a dependency in daily use
would age out and take one detour through the egress per TTL. Entries are sampled
(`--usage-sample`, percent of requests) and buffered by Envoy (`FLUSH_SECONDS` by default), so
the cost is
one gRPC stream per sidecar and a few entries per flush.
"""

from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.v3.percent_pb2 import FractionalPercent
from google.protobuf.any_pb2 import Any

from xdsproxy import caches
from xdsproxy.istio.envoyconfig import pack, typed
from xdsproxy.scope.egress import grpc_access_log

USAGE_LOG_NAME = "xdsproxy-usage"
FLUSH_SECONDS = 30
_HCM = "type.googleapis.com/" + hcm.HttpConnectionManager.DESCRIPTOR.full_name
_OUTBOUND = 2


def usage_logger(sample_percent: float, flush_seconds: int) -> AccessLog:
    log = AccessLog(name="envoy.access_loggers.http_grpc")
    runtime = log.filter.runtime_filter
    runtime.runtime_key = "xdsproxy.usage_sample"
    runtime.percent_sampled.numerator = round(sample_percent * 10_000)
    runtime.percent_sampled.denominator = FractionalPercent.MILLION
    runtime.use_independent_randomness = True
    log.typed_config.CopyFrom(typed(grpc_access_log(USAGE_LOG_NAME, flush_seconds)))
    return log


@caches.memo("usage_logger")
def with_usage_logger(
    listener_any: bytes, sample_percent: float, flush_seconds: int = FLUSH_SECONDS
) -> bytes:
    """The listener with the sampled logger on each outbound HTTP connection manager; other
    listeners come back as the very same bytes."""
    listener = Listener()
    Any.FromString(listener_any).Unpack(listener)
    if listener.traffic_direction != _OUTBOUND:
        return listener_any
    changed = False
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url != _HCM:
                continue
            manager = hcm.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            if not manager.HasField("rds"):
                continue
            manager.access_log.append(usage_logger(sample_percent, flush_seconds))
            network_filter.typed_config.CopyFrom(typed(manager))
            changed = True
    return pack(listener) if changed else listener_any
