"""What a listener references: the clusters of its TCP proxies and inline routes, its RDS names."""

from dataclasses import dataclass

from envoy.config.listener.v3.listener_components_pb2 import FilterChain
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from google.protobuf.any_pb2 import Any

from xdsproxy import caches
from xdsproxy.scope.routes import route_clusters

_TCP_PROXY = "type.googleapis.com/" + TcpProxy.DESCRIPTOR.full_name
_HCM = "type.googleapis.com/" + hcm.HttpConnectionManager.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class ListenerRefs:
    clusters: frozenset[str]  # every cluster the listener can send to
    route_tables: frozenset[str]
    tcp_clusters: frozenset[str]  # those its TCP proxies send to (placeholder candidates)
    address: str  # the listener's IP: a service VIP for Istio's `VIP_PORT` listeners
    port: int


def _chain_refs(chain: FilterChain, clusters: set[str], tables: set[str], tcp: set[str]) -> None:
    for network_filter in chain.filters:
        config = network_filter.typed_config
        if config.type_url == _TCP_PROXY:
            proxy = TcpProxy()
            config.Unpack(proxy)
            if proxy.cluster:
                tcp.add(proxy.cluster)
            tcp.update(entry.name for entry in proxy.weighted_clusters.clusters)
        elif config.type_url == _HCM:
            manager = hcm.HttpConnectionManager()
            config.Unpack(manager)
            if manager.HasField("rds"):
                tables.add(manager.rds.route_config_name)
            for vhost in manager.route_config.virtual_hosts:
                for route in vhost.routes:
                    clusters.update(route_clusters(route))


@caches.memo("listener_refs")
def listener_refs(any_bytes: bytes) -> ListenerRefs:
    listener = Listener()
    Any.FromString(any_bytes).Unpack(listener)
    clusters: set[str] = set()
    tables: set[str] = set()
    tcp: set[str] = set()
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        _chain_refs(chain, clusters, tables, tcp)
    socket = listener.address.socket_address
    return ListenerRefs(
        frozenset(clusters | tcp),
        frozenset(tables),
        frozenset(tcp),
        socket.address,
        socket.port_value,
    )
