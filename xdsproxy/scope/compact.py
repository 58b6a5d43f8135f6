"""Compact lazy sidecars: an out-of-scope TCP or sniffed service costs the sidecar nothing.

Istio gives each TCP or protocol-sniffed service port a `VIP_PORT` listener. In compact mode
a sidecar gets those listeners (and their clusters) only for in-scope services. A connection
to any other service VIP finds no listener, so Envoy's original-destination hand-off leaves it
on `virtualOutbound` (or on the port's `0.0.0.0_PORT` HTTP listener, if there is one); a filter
chain added there for the mesh's service ranges tunnels it to the egress as an HTTP CONNECT to
`VIP:PORT`, which the egress routes by the VIP domains of its service vhosts and logs. Learning
brings back Istio's listener and cluster; adding a listener does not disturb connections open
through the tunnel. See shared/envoy-tcp-lazy.md, design "C".

The added chains depend only on the ranges and the sidecar's identity, never on its scope: an
in-place filter-chain update would drain that chain's connections (45 s with Istio's settings).
So the ranges are fixed once known (`MeshRanges`), and a listener whose VIP falls outside them
is kept as Istio sent it (its cluster becomes a placeholder, as without compact mode).

Envoy matches a filter chain's destination IP before its application protocol, so a mesh-range
TCP chain on a `0.0.0.0_PORT` listener would take HTTP too: it comes as a pair, a copy of
Istio's HTTP chain and a tunnel chain, both for the ranges, the TCP one for `raw_buffer`
(without it raw TCP falls to the default chain: measured, "Does not work" 2 in the shared doc).
"""

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.listener.v3.listener_components_pb2 import FilterChain
from envoy.config.listener.v3.listener_pb2 import Listener
from google.protobuf.any_pb2 import Any

from xdsproxy import caches
from xdsproxy.istio.envoyconfig import pack, typed
from xdsproxy.istio.names import ServicePort, outbound_cluster, service_namespace
from xdsproxy.scope.listeners import ListenerRefs
from xdsproxy.scope.tunnel import tunnel_proxy
from xdsproxy.xds.ordering import is_eds_cluster

log = logging.getLogger("xdsproxy.compact")

VIRTUAL_OUTBOUND = "virtualOutbound"
MESH_CHAIN = "xdsproxy_lazy_mesh"
MESH_HTTP_CHAIN = "xdsproxy_lazy_mesh_http"
# The prefix of the ranges derived from VIPs when none are configured: Kubernetes allocates
# service addresses from one CIDR (kube-apiserver's --service-cluster-ip-range, /12 by default).
DERIVED_PREFIX = {4: 16, 6: 112}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class MeshRanges:
    """The mesh's service address ranges: configured (`--service-cidr`, or the Kubernetes
    ServiceCIDR objects read at start), else, if `derive`, derived once from the first VIPs
    Istiod sends (the /16 of each IPv4 VIP, the /112 of each IPv6 one). Fixed once set, so the
    chains built from them never change; while unset, compact mode does nothing."""

    def __init__(self, configured: Iterable[str] = (), derive: bool = True) -> None:
        self.networks: tuple[Network, ...] = ()
        self.source = ""
        self.derive = derive
        self.configure(configured, "--service-cidr")

    def configure(self, cidrs: Iterable[str], source: str) -> None:
        if not self.networks:
            self.networks = _collapse(ipaddress.ip_network(c, strict=False) for c in cidrs)
            self.source = source if self.networks else ""

    def settle(self, vips: Iterable[str]) -> None:
        if self.networks or not self.derive:
            return
        derived = []
        for vip in vips:
            address = _address(vip)
            if address is not None and not address.is_unspecified:
                prefix = DERIVED_PREFIX[address.version]
                derived.append(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
        self.networks = _collapse(derived)
        if self.networks:
            self.source = "derived from the first service VIPs"
            log.warning(
                "compact mode: mesh service ranges derived from Istio's VIPs: %s; an address "
                "in them without a listener of its own goes to the egress, so give the "
                "cluster's service CIDR with --service-cidr",
                ", ".join(map(str, self.networks)),
            )

    def contains(self, ip: str) -> bool:
        address = _address(ip)
        return address is not None and any(address in network for network in self.networks)


@dataclass(frozen=True)
class CompactMode:
    """Which out-of-scope service listeners a sidecar goes without, and the ranges that reach
    the egress instead. Pure TCP ones lose nothing; a sniffed port's first-contact HTTP is then
    tunnelled at L4 unless a `0.0.0.0_PORT` HTTP listener of its port exists (see docs)."""

    ranges: MeshRanges
    tcp: bool = True
    sniffed: bool = False

    def leaves_out(self, refs: ListenerRefs) -> bool:
        """Whether a service listener of this kind, at this address, may be left out."""
        kind_on = self.sniffed if refs.route_tables else self.tcp
        return kind_on and self.ranges.contains(refs.address)


def service_listener(refs: ListenerRefs, clusters: Mapping[str, bytes]) -> ServicePort | None:
    """The Kubernetes service whose VIP listener this is: every TCP proxy of it names an EDS
    cluster of that one service. None for anything else: `0.0.0.0_PORT` and virtual listeners,
    a headless service's per-pod listeners (ORIGINAL_DST), ServiceEntry addresses, or a
    cluster not received."""
    if not refs.tcp_clusters or refs.address in ("", "0.0.0.0", "::"):
        return None
    services = set()
    for cluster in refs.tcp_clusters:
        parsed = outbound_cluster(cluster)
        body = clusters.get(cluster)
        if parsed is None or body is None or not is_eds_cluster(body):
            return None
        if not service_namespace(parsed.service.host):
            return None
        services.add(parsed.service)
    return services.pop() if len(services) == 1 else None


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def _collapse(networks: Iterable[Network]) -> tuple[Network, ...]:
    listed = list(networks)
    return tuple(
        network
        for version in (4, 6)
        for network in ipaddress.collapse_addresses(n for n in listed if n.version == version)
    )


def _match_ranges(chain: FilterChain, networks: tuple[Network, ...]) -> None:
    for network in networks:
        match = chain.filter_chain_match
        cidr = match.prefix_ranges.add(address_prefix=str(network.network_address))
        cidr.prefix_len.value = network.prefixlen


def _tunnel_chain(
    egress_cluster: str, namespace: str, workload: str, networks: tuple[Network, ...]
) -> FilterChain:
    """Every connection to a mesh VIP that has no listener of its own: a CONNECT to the egress
    for `VIP:PORT`, the caller named as the placeholders' tunnel names it."""
    proxy = tunnel_proxy(
        egress_cluster,
        namespace,
        workload,
        "%DOWNSTREAM_LOCAL_ADDRESS%",
        "%DOWNSTREAM_LOCAL_PORT%",
    )
    chain = FilterChain(name=MESH_CHAIN)
    _match_ranges(chain, networks)
    chain.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=typed(proxy))
    return chain


def _decode(any_bytes: bytes) -> Listener:
    listener = Listener()
    Any.FromString(any_bytes).Unpack(listener)
    return listener


@caches.memo("mesh_chains")
def with_mesh_chains(
    any_bytes: bytes,
    egress_cluster: str,
    namespace: str,
    workload: str,
    networks: tuple[Network, ...],
) -> bytes:
    """Istio's `virtualOutbound` or `0.0.0.0_PORT` HTTP listener with the mesh-range chains
    in front; any other listener unchanged."""
    listener = _decode(any_bytes)
    tunnel = _tunnel_chain(egress_cluster, namespace, workload, networks)
    if listener.name == VIRTUAL_OUTBOUND:
        # Istio's chains: `destination_port: 15001` to BlackHole (matched first, by port) and
        # the catch-all to PassthroughCluster, which keeps non-mesh destinations.
        chains = [tunnel]
    else:
        http = next((c for c in listener.filter_chains if _is_http(c)), None)
        if http is None:
            return any_bytes
        copy = FilterChain()
        copy.CopyFrom(http)
        copy.name = MESH_HTTP_CHAIN
        _match_ranges(copy, networks)
        tunnel.filter_chain_match.transport_protocol = "raw_buffer"
        chains = [copy, tunnel]
    kept = list(listener.filter_chains)
    del listener.filter_chains[:]
    listener.filter_chains.extend([*chains, *kept])
    return pack(listener)


def _is_http(chain: FilterChain) -> bool:
    """Istio's HTTP chain of a `0.0.0.0_PORT` listener (`application_protocols` http/1.1, h2c)."""
    match = chain.filter_chain_match
    return bool(match.application_protocols) and not match.prefix_ranges


def takes_mesh_chains(name: str, address: str) -> bool:
    """`virtualOutbound`, or an outbound listener on all addresses for one port."""
    return name == VIRTUAL_OUTBOUND or address in ("0.0.0.0", "::")
