"""Out-of-scope TCP through the egress: the sidecar's tunnel listener and placeholder clusters.

Istio's listeners stay byte-for-byte. A `VIP_PORT` listener (pure TCP, or a sniffed port's
default chain) names its service's cluster `outbound|PORT|SUBSET|FQDN`; while the service is
out of scope that name holds a STATIC placeholder whose one endpoint is the sidecar's internal
listener `xdsproxy_lazy_tunnel`. The placeholder passes its metadata (the service's host and
port) to that listener, whose tcp_proxy opens an HTTP CONNECT to the egress with the authority
`FQDN:PORT` and the lazy headers. Learning swaps the placeholder for Istio's cluster under the
same name: only CDS and EDS change, so connections open through the tunnel keep running (a
listener change would close them when its drain ends: 45 s with Istio's settings). See
shared/envoy-tcp-lazy.md, design "B".

Envoy needs the `envoy.bootstrap.internal_listener` bootstrap extension for this, which
Istio's sidecar bootstrap has enabled since 1.18; older sidecars NACK the internal listener
with `TUNNEL_UNSUPPORTED` and keep their TCP services in scope.
"""

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from envoy.extensions.transport_sockets.internal_upstream.v3.internal_upstream_pb2 import (
    InternalUpstreamTransport,
)
from envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2 import RawBuffer

from xdsproxy import caches
from xdsproxy.istio.envoyconfig import pack, typed
from xdsproxy.istio.names import ServicePort
from xdsproxy.scope.contract import (
    ORIGINAL_PORT,
    SOURCE_NAMESPACE,
    SOURCE_WORKLOAD,
    TUNNEL_METADATA,
)

TUNNEL_LISTENER = "xdsproxy_lazy_tunnel"
# Dynamic metadata the placeholder hands the tunnel listener (a filter-metadata namespace).
# What Envoy says when its bootstrap lacks the internal-listener extension (Istio before 1.18).
TUNNEL_UNSUPPORTED = "InternalListener bootstrap extension is mandatory"
# Istio's sidecar bootstrap enables the internal-listener extension from this release on.
FIRST_ISTIO_WITH_TUNNEL = (1, 18)


def _header(key: str, value: str) -> HeaderValueOption:
    option = HeaderValueOption(append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    option.header.key, option.header.value = key, value
    return option


def tunnel_proxy(
    egress_cluster: str, namespace: str, workload: str, hostname: str, port: str
) -> TcpProxy:
    """A tcp_proxy that carries each connection to the egress as an HTTP CONNECT to
    `hostname`, naming the caller (namespace, workload, port): the headers select the caller's
    scope at the egress, as the HTTP catch-all's do."""
    proxy = TcpProxy(stat_prefix=TUNNEL_LISTENER, cluster=egress_cluster)
    tunnel = proxy.tunneling_config
    tunnel.hostname = hostname
    tunnel.headers_to_add.extend(
        [
            _header(SOURCE_NAMESPACE, namespace),
            _header(SOURCE_WORKLOAD, workload),
            _header(ORIGINAL_PORT, port),
        ]
    )
    return proxy


@caches.memo("tunnel_listener")
def tunnel_listener(egress_cluster: str, namespace: str, workload: str) -> bytes:
    """The sidecar's internal listener: every placeholder's connection becomes a CONNECT to the
    egress naming the service (`FQDN:PORT`, from the placeholder's metadata)."""
    proxy = tunnel_proxy(
        egress_cluster,
        namespace,
        workload,
        f"%DYNAMIC_METADATA({TUNNEL_METADATA}:host)%",
        f"%DYNAMIC_METADATA({TUNNEL_METADATA}:port)%",
    )
    listener = Listener(name=TUNNEL_LISTENER)
    listener.internal_listener.SetInParent()
    listener.filter_chains.add(name=TUNNEL_LISTENER).filters.add(
        name="envoy.filters.network.tcp_proxy", typed_config=typed(proxy)
    )
    return pack(listener)


@caches.memo("placeholder_cluster")
def placeholder_cluster(name: str, service: ServicePort) -> bytes:
    """A same-name stand-in for Istio's cluster `name`, sending to the tunnel listener.

    STATIC, so it asks for no EDS and warms at once; about 27 KB in Envoy against about 64 KB
    for Istio's cluster (measured, shared/envoy-tcp-lazy.md)."""
    cluster = Cluster(name=name, type=Cluster.STATIC)
    cluster.connect_timeout.seconds = 10
    cluster.metadata.filter_metadata[TUNNEL_METADATA].update(
        {"host": str(service), "port": str(service.port)}
    )
    endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    cluster.load_assignment.cluster_name = name
    endpoint.address.envoy_internal_address.server_listener_name = TUNNEL_LISTENER
    transport = InternalUpstreamTransport()
    passthrough = transport.passthrough_metadata.add(name=TUNNEL_METADATA)
    passthrough.kind.cluster.SetInParent()
    transport.transport_socket.name = "envoy.transport_sockets.raw_buffer"
    transport.transport_socket.typed_config.CopyFrom(typed(RawBuffer()))
    cluster.transport_socket.name = "envoy.transport_sockets.internal_upstream"
    cluster.transport_socket.typed_config.CopyFrom(typed(transport))
    return pack(cluster)


def supports_tunnel(istio_version: str) -> bool | None:
    """From the node's ISTIO_VERSION: None when absent or unreadable (then the NACK decides)."""
    parts = istio_version.lstrip("v").split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None
    return (major, minor) >= FIRST_ISTIO_WITH_TUNNEL
