"""The lazy egress: full config, plus what xdsproxy synthesizes for it.

- A listener (`--egress-port`) whose HTTP connection manager picks a route table per request
  by the caller's (namespace, original port), through Envoy's scoped routes (SRDS); it takes
  the caller's address from the socket (`use_remote_address`), moves the `x-xdsproxy-*`
  headers into dynamic metadata (so backends never see them but the access log does), and
  streams one access log entry per request to xdsproxy's ALS endpoint without buffering.
- Caller routes (Envoy's `ScopedRouteConfiguration`s, served by xdsproxy only; "scope" here
  is kept for a workload's dependencies), one per (namespace, port) of the mesh, each with the
  caller namespace's own table inline; a namespace whose tables this
  replica does not hold falls back to the egress's own table for that port. TCP and sniffed
  services (no vhost in a port table) get a vhost there that terminates the CONNECT of a
  sidecar's tunnel (see `tunnel`); the listener keeps tunnels open however idle, and logs each
  at establishment, so a TCP dependency is learned at connect.
- A cluster for the ALS endpoint and an ORIGINAL_DST cluster that reads the original
  destination the sidecar recorded, for hosts that are not mesh services.
"""

from dataclasses import dataclass

from cachetools import LRUCache
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration
from envoy.extensions.access_loggers.grpc.v3.als_pb2 import HttpGrpcAccessLogConfig
from envoy.extensions.filters.http.header_to_metadata.v3.header_to_metadata_pb2 import (
    Config as HeaderToMetadata,
)
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import TlsParameters
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import DownstreamTlsContext
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from google.protobuf.any_pb2 import Any

from xdsproxy import caches
from xdsproxy.istio.envoyconfig import ads, istio_sds, pack, typed
from xdsproxy.istio.names import is_port, outbound_cluster, service_namespace
from xdsproxy.scope import inputs
from xdsproxy.scope.contract import METADATA_NAMESPACE
from xdsproxy.scope.listeners import listener_refs
from xdsproxy.scope.mesh import MeshTables
from xdsproxy.scope.routes import (
    LAZY_HEADERS,
    ORIGINAL_DST,
    ORIGINAL_DST_CLUSTER,
    ORIGINAL_PORT,
    PASSTHROUGH,
    SOURCE_NAMESPACE,
    egress_table,
    parse_table,
    route_clusters,
)
from xdsproxy.wire import typeurls
from xdsproxy.xds.ordering import is_original_dst
from xdsproxy.xds.view import NOTHING, Selection, UpstreamView

EGRESS_LISTENER = "xdsproxy_lazy_egress"
# The caller routes read the egress's own CDS, RDS and LDS, and every namespace's tables; the
# rest of its config is Istio's, plus fixed resources.
_CALLER_ROUTE_UPSTREAM = (typeurls.CLUSTER, typeurls.ROUTE, typeurls.LISTENER)
_SCOPED_ROUTE_INPUTS = frozenset({*_CALLER_ROUTE_UPSTREAM, inputs.MESH_ROUTE_TABLES})
# The newest caller routes per input state (the inputs kept, to confirm a hit by identity)
_CALLER_ROUTES: LRUCache[tuple, tuple[tuple[Selection, ...], Selection]] = caches.lru(
    "egress_caller_routes"
)
ALS_CLUSTER = "xdsproxy-als"
ALS_LOG_NAME = "xdsproxy-lazy-egress"


@dataclass(frozen=True, slots=True)
class EgressSettings:
    port: int = 15081
    bind_address: str = "0.0.0.0"
    als_host: str = "xdsproxy.istio-system.svc"
    als_port: int = 15020
    # Terminate Istio mTLS on the lazy listener with the egress's own workload certificate
    # (SDS from its pilot-agent), requiring a mesh client certificate: only mesh sidecars can
    # use the header-driven passthrough, and attribution can use the caller's identity.
    mtls: bool = True


def _is_ip(host: str) -> bool:
    return host.replace(".", "").isdigit() or ":" in host


@caches.memo("egress_als_cluster")
def als_cluster(settings: EgressSettings) -> bytes:
    """The cluster through which Envoys stream access logs to xdsproxy (HTTP/2)."""
    als = Cluster(
        name=ALS_CLUSTER, type=Cluster.STATIC if _is_ip(settings.als_host) else Cluster.STRICT_DNS
    )
    als.connect_timeout.seconds = 1
    als.load_assignment.cluster_name = ALS_CLUSTER
    als.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.CopyFrom(
        Address(
            socket_address=SocketAddress(address=settings.als_host, port_value=settings.als_port)
        )
    )
    options = HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.SetInParent()
    als.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Pack(options)
    return pack(als)


@caches.memo("egress_original_dst")
def original_dst_cluster() -> bytes:
    original = Cluster(
        name=ORIGINAL_DST_CLUSTER, type=Cluster.ORIGINAL_DST, lb_policy=Cluster.CLUSTER_PROVIDED
    )
    original.connect_timeout.seconds = 10
    key = original.original_dst_lb_config.metadata_key
    key.key = METADATA_NAMESPACE
    key.path.add().key = ORIGINAL_DST
    return pack(original)


def grpc_access_log(log_name: str, flush_seconds: int = 0) -> HttpGrpcAccessLogConfig:
    """An access logger streaming to xdsproxy; `flush_seconds=0` sends every entry at once."""
    logger = HttpGrpcAccessLogConfig()
    common = logger.common_config
    common.log_name = log_name
    common.grpc_service.envoy_grpc.cluster_name = ALS_CLUSTER
    common.transport_api_version = ApiVersion.V3
    if flush_seconds:
        common.buffer_flush_interval.seconds = flush_seconds
    else:
        common.buffer_size_bytes.value = 0
    return logger


@caches.memo("egress_listener")
def synthesized_listener(settings: EgressSettings) -> bytes:
    manager = hcm.HttpConnectionManager(stat_prefix=EGRESS_LISTENER)
    manager.use_remote_address.value = True
    # Tunnels carry database and queue connections that idle for minutes: Envoy's default
    # stream idle timeout (300 s) would reset them.
    manager.stream_idle_timeout.SetInParent()
    manager.upgrade_configs.add(upgrade_type="CONNECT")
    manager.access_log_options.flush_log_on_tunnel_successfully_established = True
    scoped = manager.scoped_routes
    scoped.name = "xdsproxy-lazy-scopes"
    for header in (SOURCE_NAMESPACE, ORIGINAL_PORT):
        fragment = scoped.scope_key_builder.fragments.add()
        fragment.header_value_extractor.name = header
        fragment.header_value_extractor.index = 0
    scoped.rds_config_source.CopyFrom(ads())
    scoped.scoped_rds.scoped_rds_config_source.CopyFrom(ads())
    to_metadata = HeaderToMetadata()
    for header in LAZY_HEADERS:
        rule = to_metadata.request_rules.add(header=header, remove=True)
        rule.on_header_present.metadata_namespace = METADATA_NAMESPACE
        rule.on_header_present.key = header
    manager.http_filters.add(
        name="envoy.filters.http.header_to_metadata", typed_config=typed(to_metadata)
    )
    manager.http_filters.add(name="envoy.filters.http.router", typed_config=typed(Router()))
    # Flush every entry: a learn waits for nothing.
    manager.access_log.add(
        name="envoy.access_loggers.http_grpc", typed_config=typed(grpc_access_log(ALS_LOG_NAME))
    )
    listener = Listener(
        name=EGRESS_LISTENER,
        address=Address(
            socket_address=SocketAddress(address=settings.bind_address, port_value=settings.port)
        ),
    )
    chain = listener.filter_chains.add()
    chain.filters.add(
        name="envoy.filters.network.http_connection_manager", typed_config=typed(manager)
    )
    if settings.mtls:
        chain.transport_socket.name = "envoy.transport_sockets.tls"
        chain.transport_socket.typed_config.CopyFrom(typed(istio_mtls()))
    return pack(listener)


def istio_mtls() -> DownstreamTlsContext:
    context = DownstreamTlsContext()
    context.require_client_certificate.value = True
    common = context.common_tls_context
    common.tls_params.tls_minimum_protocol_version = TlsParameters.TLSv1_2
    common.alpn_protocols.extend(["h2", "http/1.1"])
    certificate = common.tls_certificate_sds_secret_configs.add(name="default")
    certificate.sds_config.CopyFrom(istio_sds())
    validation = common.combined_validation_context
    validation.default_validation_context.SetInParent()
    validation.validation_context_sds_secret_config.name = "ROOTCA"
    validation.validation_context_sds_secret_config.sds_config.CopyFrom(istio_sds())
    return context


@caches.memo("caller_route")
def caller_route(
    table_any: bytes | None, namespace: str, port: int, tunnelled: tuple[tuple[str, str], ...]
) -> bytes:
    """The route table for callers from `namespace` to `port`, keyed for Envoy's SRDS."""
    name = f"{namespace}/{port}"
    entry = ScopedRouteConfiguration(name=name)
    entry.route_configuration.CopyFrom(egress_table(table_any, name, namespace, tunnelled))
    entry.key.fragments.add(string_key=namespace)
    entry.key.fragments.add(string_key=str(port))
    return pack(entry)


@caches.memo("caller_route_clusters")
def caller_route_clusters(body: bytes) -> frozenset[str]:
    entry = ScopedRouteConfiguration()
    Any.FromString(body).Unpack(entry)
    return frozenset(
        cluster
        for vhost in entry.route_configuration.virtual_hosts
        for route in vhost.routes
        for cluster in route_clusters(route)
    )


class EgressView:
    transparent = False
    local_types = frozenset({typeurls.SCOPED_ROUTE})

    def __init__(self, settings: EgressSettings, tables: MeshTables) -> None:
        self.settings = settings
        self.tables = tables

    def depends_on(self, type_url: str) -> frozenset[str]:
        if type_url == typeurls.SCOPED_ROUTE:
            return _SCOPED_ROUTE_INPUTS
        return frozenset()

    def references(self, type_url: str, selection: Selection) -> frozenset[str]:
        """The clusters the caller routes name: a caller route naming a cluster the egress has
        not warmed waits for it like a sidecar's route (docs/protocol.md R11)."""
        if type_url != typeurls.SCOPED_ROUTE:
            return frozenset()
        return frozenset().union(*(caller_route_clusters(body) for body in selection.bodies))

    def select(self, type_url: str, upstream: UpstreamView) -> Selection:
        current = upstream.get(type_url, NOTHING)
        if type_url == typeurls.CLUSTER:
            return Selection(
                (*current.names, ALS_CLUSTER, ORIGINAL_DST_CLUSTER),
                (*current.bodies, als_cluster(self.settings), original_dst_cluster()),
            )
        if type_url == typeurls.LISTENER:
            return Selection(
                (*current.names, EGRESS_LISTENER),
                (*current.bodies, synthesized_listener(self.settings)),
            )
        if type_url == typeurls.SCOPED_ROUTE:
            return self._caller_routes(upstream)
        return current

    def _caller_routes(self, upstream: UpstreamView) -> Selection:
        """A function of the mesh's tables (by version) and the egress's own CDS, RDS and LDS:
        replicas of the egress fed the same responses (decoded once, `wire.codec`) compute it
        once per change of either."""
        read = tuple(upstream.get(t, NOTHING) for t in _CALLER_ROUTE_UPSTREAM)
        key = (id(self.tables), self.tables.version, *(id(part) for s in read for part in s))
        found = _CALLER_ROUTES.get(key)
        if found is not None and all(
            a is b
            for old, new in zip(found[0], read, strict=True)
            for a, b in zip(old, new, strict=True)
        ):
            return found[1]
        selection = self._compute_caller_routes(upstream)
        _CALLER_ROUTES[key] = (read, selection)
        return selection

    def _compute_caller_routes(self, upstream: UpstreamView) -> Selection:
        own = {
            int(name): body
            for name, body in zip(*upstream.get(typeurls.ROUTE, NOTHING), strict=True)
            if is_port(name)
        }
        clusters, cluster_bodies = upstream.get(typeurls.CLUSTER, NOTHING)
        namespaces = set(self.tables.namespaces())
        by_port: dict[int, list[str]] = {}
        for cluster, body in zip(clusters, cluster_bodies, strict=True):
            parsed = outbound_cluster(cluster)
            if parsed is None:
                continue
            service, subset = parsed
            if namespace := service_namespace(service.host):
                namespaces.add(namespace)
            # A headless service's ORIGINAL_DST cluster would connect back to the egress itself.
            if not subset and not is_original_dst(body):
                by_port.setdefault(service.port, []).append(cluster)
        vips = _vips(upstream.get(typeurls.LISTENER, NOTHING)[1])
        held = frozenset(clusters) | {PASSTHROUGH}
        names: list[str] = []
        bodies: list[bytes] = []
        for namespace in sorted(namespaces):
            for port in sorted(by_port.keys() | own.keys()):
                table = self.tables.table(namespace, port)
                if table is None or not parse_table(table).referenced <= held:
                    # A caller's table can name a service whose CDS has not reached the egress
                    # yet: routing to it would 503. The egress's own table is consistent with
                    # its own CDS (Istiod pushes CDS first on each stream).
                    table = own.get(port)
                names.append(f"{namespace}/{port}")
                bodies.append(
                    caller_route(table, namespace, port, _tunnelled(table, by_port.get(port), vips))
                )
        return Selection(tuple(names), tuple(bodies))


def _vips(listeners: tuple[bytes, ...]) -> dict[str, str]:
    """Each TCP or sniffed service's VIP, by cluster, from Istio's `VIP_PORT` listeners: the
    egress routes a compact sidecar's CONNECT `VIP:PORT` by it."""
    vips: dict[str, str] = {}
    for body in listeners:
        refs = listener_refs(body)
        if refs.address not in ("", "0.0.0.0", "::"):
            vips.update(dict.fromkeys(refs.tcp_clusters, refs.address))
    return vips


def _tunnelled(
    table: bytes | None, clusters: list[str] | None, vips: dict[str, str]
) -> tuple[tuple[str, str], ...]:
    """The port's services that have no vhost in its table (TCP and sniffed ones), each with
    its VIP ("" if none)."""
    if not clusters:
        return ()
    routed = set(parse_table(table).services) if table is not None else set()
    return tuple(
        (c, vips.get(c, ""))
        for c in clusters
        if (p := outbound_cluster(c)) and p.service not in routed
    )
