"""Route tables: what they reference, the sidecar's scoped copy, and the egress's renamed copy.

Parsing a table costs far more than anything else in scoping, so parsed tables and rewritten
copies are cached by the exact upstream bytes (shared by every node that received them).
"""

from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.config.route.v3.route_components_pb2 import Route, VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.any_pb2 import Any

from xdsproxy import caches
from xdsproxy.istio.envoyconfig import pack
from xdsproxy.istio.names import ServicePort, outbound_cluster, route_table_port, vhost_service
from xdsproxy.scope.contract import (
    LAZY_HEADERS,
    ORIGINAL_DST,
    ORIGINAL_PORT,
    SOURCE_NAMESPACE,
    SOURCE_WORKLOAD,
)

EGRESS_VHOST = "xdsproxy_lazy_egress"
PASSTHROUGH = "PassthroughCluster"
ORIGINAL_DST_CLUSTER = "xdsproxy-original-dst"


def route_clusters(route: Route) -> set[str]:
    """Clusters a route can send to: its cluster, weighted clusters and mirrors."""
    if not route.HasField("route"):
        return set()
    action = route.route
    found = {action.cluster} if action.cluster else set()
    found.update(entry.name for entry in action.weighted_clusters.clusters)
    found.update(policy.cluster for policy in action.request_mirror_policies if policy.cluster)
    return found


def _is_catch_all(vhost: VirtualHost, service: ServicePort | None) -> bool:
    """Istio's catch-all: the `allow_any` (PassthroughCluster) or `block_all` vhost with
    `domains: ["*"]`, or any other `*` vhost that is no service (such as slime's fallback).
    A service's own vhost in its per-service table (`FQDN:PORT`, on a protocol-sniffed
    listener) also has `*`, but it is that service's route, not a catch-all."""
    return service is None and "*" in vhost.domains


@dataclass(frozen=True, slots=True)
class ParsedTable:
    name: str
    port: int | None
    services: tuple[ServicePort | None, ...]  # per vhost; None when not a service vhost
    clusters: tuple[frozenset[str], ...]  # per vhost
    targets: tuple[frozenset[ServicePort], ...]  # per vhost: the services its clusters serve
    referenced: frozenset[str]  # every cluster the table can send to
    catch_all: tuple[bool, ...]  # per vhost


@caches.memo("route_decode")
def _decode(any_bytes: bytes) -> RouteConfiguration:
    table = RouteConfiguration()
    Any.FromString(any_bytes).Unpack(table)
    return table


@caches.memo("route_table")
def parse_table(any_bytes: bytes) -> ParsedTable:
    table = _decode(any_bytes)
    vhosts = table.virtual_hosts
    services = tuple(vhost_service(v.name) for v in vhosts)
    clusters = tuple(
        frozenset(c for route in v.routes for c in route_clusters(route)) for v in vhosts
    )
    return ParsedTable(
        name=table.name,
        port=route_table_port(table.name),
        services=services,
        clusters=clusters,
        targets=tuple(
            frozenset(parsed.service for c in names if (parsed := outbound_cluster(c)))
            for names in clusters
        ),
        referenced=frozenset().union(*clusters),
        catch_all=tuple(
            _is_catch_all(v, service) for v, service in zip(vhosts, services, strict=True)
        ),
    )


def kept_vhosts(parsed: ParsedTable, covers: Callable[[ServicePort], bool]) -> tuple[int, ...]:
    """Indexes of the vhosts a scoped sidecar keeps: in-scope services (their own `*` vhost
    included), vhosts that route to an in-scope service, and any vhost that is neither a
    service nor the catch-all (kept as Istiod sent it, to stay on the safe side).

    A vhost is kept for what it routes to because the egress learns the cluster a request
    reached, not the host it asked for: `hello:80` sent by a VirtualService to
    `outbound|8080||hello` (the Istio 1.20 dump) teaches `hello:8080`, and the caller's
    `hello:80` vhost must then go direct, or its requests would reach the egress forever."""
    return tuple(
        i
        for i, (service, catch_all, targets) in enumerate(
            zip(parsed.services, parsed.catch_all, parsed.targets, strict=True)
        )
        if not catch_all and (service is None or covers(service) or any(map(covers, targets)))
    )


def _egress_vhost(
    egress_cluster: str, namespace: str, workload: str, port: int | None
) -> VirtualHost:
    vhost = VirtualHost(name=EGRESS_VHOST, domains=["*"])
    vhost.include_request_attempt_count = True
    route = vhost.routes.add(name=EGRESS_VHOST)
    route.match.prefix = "/"
    route.route.cluster = egress_cluster
    route.route.timeout.SetInParent()
    values = (
        (SOURCE_NAMESPACE, namespace),
        (SOURCE_WORKLOAD, workload),
        (ORIGINAL_DST, "%DOWNSTREAM_LOCAL_ADDRESS%"),
        (ORIGINAL_PORT, str(port) if port is not None else ""),
    )
    for key, value in values:
        option = vhost.request_headers_to_add.add(
            append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        )
        option.header.key, option.header.value = key, value
    return vhost


@caches.memo("sidecar_table")
def sidecar_table(
    any_bytes: bytes, kept: tuple[int, ...], egress_cluster: str, namespace: str, workload: str
) -> bytes:
    """The scoped copy: kept vhosts, then a catch-all to the egress that sets the lazy headers.

    Every other vhost strips those headers (route-table level removal with
    `most_specific_header_mutations_wins`), so an app cannot forge them through a known host.
    """
    source = _decode(any_bytes)
    table = RouteConfiguration()
    table.CopyFrom(source)
    del table.virtual_hosts[:]
    table.virtual_hosts.extend(source.virtual_hosts[i] for i in kept)
    # A kept `*` vhost (an in-scope service's own table) already takes every request, and
    # Envoy allows one `*` per table: the egress catch-all goes only where none is kept.
    if not any("*" in source.virtual_hosts[i].domains for i in kept):
        table.virtual_hosts.append(
            _egress_vhost(egress_cluster, namespace, workload, route_table_port(source.name))
        )
    for header in LAZY_HEADERS:
        if header not in table.request_headers_to_remove:
            table.request_headers_to_remove.append(header)
    table.most_specific_header_mutations_wins = True
    return pack(table)


def _short_domains(service: ServicePort, caller_namespace: str) -> list[str]:
    """The host forms a caller in `caller_namespace` can use for a Kubernetes service, each
    bare and with the port (Istio's own vhosts list the same forms)."""
    hosts = [service.host]
    parts = service.host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        hosts += [f"{parts[0]}.{parts[1]}", f"{parts[0]}.{parts[1]}.svc"]
        if parts[1] == caller_namespace:
            hosts.append(parts[0])
    return [form for host in hosts for form in (host, f"{host}:{service.port}")]


def _tunnel_vhost(
    cluster: str, vip: str, service: ServicePort, caller_namespace: str
) -> VirtualHost:
    """A TCP or sniffed service at the egress: CONNECT from a sidecar's tunnel (to `FQDN:PORT`
    from a placeholder, to `VIP:PORT` from a compact sidecar's mesh chain) is terminated and its
    bytes go to the service; HTTP (a sniffed port's catch-all) goes there too."""
    domains = _short_domains(service, caller_namespace)
    if vip:
        domains += [vip, f"{vip}:{service.port}"]
    vhost = VirtualHost(name=str(service), domains=domains)
    tunnel = vhost.routes.add(name="tunnel")
    tunnel.match.connect_matcher.SetInParent()
    tunnel.route.cluster = cluster
    tunnel.route.upgrade_configs.add(upgrade_type="CONNECT").connect_config.SetInParent()
    http = vhost.routes.add(name="http")
    http.match.prefix = "/"
    http.route.cluster = cluster
    http.route.timeout.SetInParent()  # 0s: no limit, as Istio's own routes
    return vhost


@caches.memo("egress_table")
def egress_table(
    any_bytes: bytes | None,
    name: str,
    caller_namespace: str,
    tunnelled: tuple[tuple[str, str], ...] = (),
) -> RouteConfiguration:
    """The egress's copy of a namespace's table for one port: renamed, with passthrough routes
    sent to the ORIGINAL_DST cluster that reads the original destination the sidecar recorded,
    plus a vhost for each `tunnelled` (cluster, VIP) (a TCP or sniffed service on that port,
    which has no vhost in Istio's port table). Only those vhosts accept CONNECT: the catch-all is no
    relay to arbitrary addresses."""
    table = RouteConfiguration()
    if any_bytes is not None:
        table.CopyFrom(_decode(any_bytes))
    table.name = name
    for vhost in table.virtual_hosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            if route.route.cluster == PASSTHROUGH:
                route.route.cluster = ORIGINAL_DST_CLUSTER
            for entry in route.route.weighted_clusters.clusters:
                if entry.name == PASSTHROUGH:
                    entry.name = ORIGINAL_DST_CLUSTER
    table.virtual_hosts.extend(
        _tunnel_vhost(cluster, vip, parsed.service, caller_namespace)
        for cluster, vip in tunnelled
        if (parsed := outbound_cluster(cluster))
    )
    return table
