"""Route tables: what they reference, the sidecar's scoped copy, and the egress's renamed copy.

Parsing a table costs far more than anything else in scoping, so parsed tables and rewritten
copies are cached by the exact upstream bytes (shared by every node that received them).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

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
    # Vhosts every scoped sidecar keeps (neither a service nor the catch-all), and the others
    # by each service they are or route to: a scope of k services keeps what it keeps in O(k).
    always: tuple[int, ...] = ()
    by_service: Mapping[ServicePort, tuple[int, ...]] = field(default_factory=dict)


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
    targets = tuple(
        frozenset(parsed.service for c in names if (parsed := outbound_cluster(c)))
        for names in clusters
    )
    catch_all = tuple(
        _is_catch_all(v, service) for v, service in zip(vhosts, services, strict=True)
    )
    always: list[int] = []
    by_service: dict[ServicePort, list[int]] = {}
    for index, (service, is_catch_all, routed) in enumerate(
        zip(services, catch_all, targets, strict=True)
    ):
        if is_catch_all:
            continue
        if service is None:
            always.append(index)
            continue
        for covered in {service, *routed}:
            by_service.setdefault(covered, []).append(index)
    return ParsedTable(
        name=table.name,
        port=route_table_port(table.name),
        services=services,
        clusters=clusters,
        targets=targets,
        referenced=frozenset().union(*clusters),
        catch_all=catch_all,
        always=tuple(always),
        by_service={s: tuple(i) for s, i in by_service.items()},
    )


class Coverage(Protocol):
    """What a scope covers: its learned services, its static patterns, and both as one test."""

    learned: Mapping[ServicePort, object]
    static: tuple

    def covers(self, service: ServicePort) -> bool: ...


def kept_vhosts(parsed: ParsedTable, scope: Coverage) -> tuple[int, ...]:
    """Indexes of the vhosts a scoped sidecar keeps: in-scope services (their own `*` vhost
    included), vhosts that route to an in-scope service, and any vhost that is neither a
    service nor the catch-all (kept as Istiod sent it, to stay on the safe side).

    A vhost is kept for what it routes to because the egress learns the cluster a request
    reached, not the host it asked for: `hello:80` sent by a VirtualService to
    `outbound|8080||hello` (the Istio 1.20 dump) teaches `hello:8080`, and the caller's
    `hello:80` vhost must then go direct, or its requests would reach the egress forever.

    Computed from the table's index: the vhosts of the scope's learned services, and (once per
    table) those its static patterns keep."""
    kept: set[int] = set(_static_kept(parsed, scope.static) if scope.static else parsed.always)
    by_service = parsed.by_service
    for service in scope.learned:
        kept.update(by_service.get(service, ()))
    return tuple(sorted(kept))


@caches.by_identity("static_kept_vhosts")
def _static_kept(parsed: ParsedTable, patterns: tuple) -> frozenset[int]:
    """The vhosts a scope's static patterns keep, once per table and set of patterns (both
    shared by the sidecars of a workload, and the patterns never change at run time)."""
    return frozenset(parsed.always).union(
        i
        for service, indexes in parsed.by_service.items()
        if any(p.matches(service) for p in patterns)
        for i in indexes
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


@caches.memo("route_shell")
def _without_vhosts(any_bytes: bytes) -> RouteConfiguration:
    """The table's settings without its vhosts: copying the whole table to drop thousands of
    vhosts cost a learn O(mesh)."""
    shell = RouteConfiguration()
    shell.CopyFrom(_decode(any_bytes))
    del shell.virtual_hosts[:]
    return shell


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
    table.CopyFrom(_without_vhosts(any_bytes))
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


@dataclass(frozen=True, slots=True)
class TablesIndex:
    """The clusters a scoped sidecar's route tables keep vhosts for, over all its tables:
    those every scope keeps, and those each service keeps (its own vhosts, and vhosts that
    route to it)."""

    always: frozenset[str]
    by_service: Mapping[ServicePort, frozenset[str]]


@caches.by_identity("tables_index")
def tables_index(bodies: tuple[bytes, ...]) -> TablesIndex:
    """Shared by every stream holding the same response's tables."""
    always: set[str] = set()
    by_service: dict[ServicePort, set[str]] = {}
    for body in bodies:
        parsed = parse_table(body)
        for index in parsed.always:
            always |= parsed.clusters[index]
        for service, indexes in parsed.by_service.items():
            named = by_service.setdefault(service, set())
            for index in indexes:
                named |= parsed.clusters[index]
    return TablesIndex(frozenset(always), {s: frozenset(c) for s, c in by_service.items()})


def kept_table_clusters(bodies: tuple[bytes, ...], scope: Coverage) -> set[str]:
    """The clusters that the vhosts a scope keeps in `bodies` route to: what `kept_vhosts`
    keeps, over every table, in O(scope)."""
    index = tables_index(bodies)
    kept = set(index.always)
    by_service = index.by_service
    for service in scope.learned:
        kept |= by_service.get(service, frozenset())
    if scope.static:
        for service, clusters in by_service.items():
            if scope.covers(service):  # static matches memoized by the scope
                kept |= clusters
    return kept
