"""Istio-shaped Envoy resources for a node of the simulated mesh, built from the Envoy protos.

Shapes follow what Istiod emits for a sidecar (see the fixtures in shared/fixtures): EDS clusters
named `outbound|PORT|SUBSET|FQDN`, per-port HTTP listeners whose RDS table is named by the port,
`IP_PORT` TCP listeners, protocol-sniffed `IP_PORT` listeners (an HTTP chain to the per-service
table `FQDN:PORT` whose one vhost has `domains: ["*"]`, a default tcp_proxy chain), one virtual
host per service with namespace-dependent domains, and a final `allow_any` (or `block_all`)
virtual host. Istio-only extension types are left out so that
a stock Envoy accepts everything.
"""

from dataclasses import dataclass

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.config.endpoint.v3.endpoint_components_pb2 import LbEndpoint
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_components_pb2 import VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.listener.http_inspector.v3.http_inspector_pb2 import HttpInspector
from envoy.extensions.filters.listener.proxy_protocol.v3.proxy_protocol_pb2 import ProxyProtocol
from envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2 import TlsInspector
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2 import RawBuffer
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import TlsParameters
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import UpstreamTlsContext

from xdsproxy.istio.envoyconfig import ads, istio_sds, typed
from xdsproxy.sim.mesh import Mesh, Service, cluster_name

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


@dataclass(frozen=True, slots=True)
class ListenerPorts:
    """Where a node's virtual listeners bind; `address=None` binds nothing (config-only Envoys)."""

    address: str | None = None
    outbound: int = 15001
    inbound: int = 15006
    # A stand-in for iptables on loopback: clients state the original destination in a PROXY
    # protocol header, and virtualOutbound hands the connection to the listener for it.
    proxy_protocol: bool = False


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _istio_metadata(cluster: Cluster, service: Service, port: int, subset: str) -> None:
    istio = cluster.metadata.filter_metadata["istio"]
    istio.update({"default_original_port": port})
    if subset:
        istio.update({"subset": subset})
    istio.get_or_create_list("services").add_struct().update(
        {"host": service.fqdn, "name": service.name, "namespace": service.namespace}
    )


def _istio_mtls_matches(cluster: Cluster, service: Service, port: int) -> None:
    """Istio's auto mTLS: TLS with the workload certificate to endpoints labelled
    `tlsMode: istio`, plaintext to the rest."""
    context = UpstreamTlsContext(sni=f"outbound_.{port}_._.{service.fqdn}")
    common = context.common_tls_context
    common.tls_params.tls_minimum_protocol_version = TlsParameters.TLSv1_2
    common.alpn_protocols.extend(["istio-peer-exchange", "istio"])
    common.tls_certificate_sds_secret_configs.add(name="default").sds_config.CopyFrom(istio_sds())
    validation = common.combined_validation_context
    validation.default_validation_context.SetInParent()
    validation.validation_context_sds_secret_config.name = "ROOTCA"
    validation.validation_context_sds_secret_config.sds_config.CopyFrom(istio_sds())
    tls = cluster.transport_socket_matches.add(name="tlsMode-istio")
    tls.match.update({"tlsMode": "istio"})
    tls.transport_socket.name = "envoy.transport_sockets.tls"
    tls.transport_socket.typed_config.CopyFrom(typed(context))
    plain = cluster.transport_socket_matches.add(name="tlsMode-disabled")
    plain.transport_socket.name = "envoy.transport_sockets.raw_buffer"
    plain.transport_socket.typed_config.CopyFrom(typed(RawBuffer()))


def _outbound_cluster(service: Service, port: int, subset: str, mtls: bool) -> Cluster:
    name = cluster_name(port, service.fqdn, subset)
    cluster = Cluster(name=name, lb_policy=Cluster.LEAST_REQUEST)
    cluster.connect_timeout.seconds = 10
    thresholds = cluster.circuit_breakers.thresholds.add(track_remaining=True)
    for limit in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
        getattr(thresholds, limit).value = 4294967295
    _istio_metadata(cluster, service, port, subset)
    if service.kind == "headless":
        cluster.type = Cluster.ORIGINAL_DST
        cluster.lb_policy = Cluster.CLUSTER_PROVIDED
    elif service.kind == "dns":
        cluster.type = Cluster.STRICT_DNS
        cluster.dns_lookup_family = Cluster.V4_ONLY
        cluster.load_assignment.cluster_name = name
        cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.CopyFrom(
            _address(service.fqdn, port)
        )
    else:
        cluster.type = Cluster.EDS
        cluster.eds_cluster_config.service_name = name
        cluster.eds_cluster_config.eds_config.CopyFrom(ads())
        cluster.eds_cluster_config.eds_config.initial_fetch_timeout.SetInParent()
        cluster.common_lb_config.locality_weighted_lb_config.SetInParent()
    if mtls:
        _istio_mtls_matches(cluster, service, port)
    return cluster


def _named_cluster(name: str, kind: int, lb: int = Cluster.ROUND_ROBIN) -> Cluster:
    cluster = Cluster(name=name, type=kind, lb_policy=lb)
    cluster.connect_timeout.seconds = 10
    return cluster


def build_clusters(mesh: Mesh, inbound_ports: tuple[int, ...] = (8080,)) -> list[Cluster]:
    clusters: list[Cluster] = []
    for service in mesh.services.values():
        for port in service.ports:
            clusters.append(_outbound_cluster(service, port.number, "", mesh.auto_mtls))
            for subset, _ in service.subsets:
                clusters.append(_outbound_cluster(service, port.number, subset, mesh.auto_mtls))
    for port in inbound_ports:
        inbound = _named_cluster(f"inbound|{port}||", Cluster.STATIC)
        inbound.load_assignment.cluster_name = inbound.name
        inbound.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.CopyFrom(
            _address("127.0.0.1", port)
        )
        clusters.append(inbound)
    clusters.append(_named_cluster(PASSTHROUGH, Cluster.ORIGINAL_DST, Cluster.CLUSTER_PROVIDED))
    clusters.append(_named_cluster(BLACKHOLE, Cluster.STATIC))
    clusters.append(
        _named_cluster(INBOUND_PASSTHROUGH, Cluster.ORIGINAL_DST, Cluster.CLUSTER_PROVIDED)
    )
    return clusters


def build_endpoints(mesh: Mesh) -> list[ClusterLoadAssignment]:
    assignments: list[ClusterLoadAssignment] = []
    for service in mesh.services.values():
        if service.kind != "eds":
            continue
        for port in service.ports:
            subsets = [""] + [name for name, _ in service.subsets]
            for subset in subsets:
                cla = ClusterLoadAssignment(
                    cluster_name=cluster_name(port.number, service.fqdn, subset)
                )
                group = cla.endpoints.add()
                group.load_balancing_weight.value = 0
                for endpoint in service.endpoints:
                    if subset and endpoint.subset != subset:
                        continue
                    lb_endpoint: LbEndpoint = group.lb_endpoints.add()
                    lb_endpoint.endpoint.address.CopyFrom(_address(endpoint.address, endpoint.port))
                    lb_endpoint.load_balancing_weight.value = 1
                    lb_endpoint.metadata.filter_metadata["istio"].update(
                        {"workload": f"{service.name};{service.namespace};{service.name};;"}
                    )
                    if endpoint.istio_mtls:
                        lb_endpoint.metadata.filter_metadata["envoy.transport_socket_match"].update(
                            {"tlsMode": "istio"}
                        )
                group.load_balancing_weight.value = max(1, len(group.lb_endpoints))
                assignments.append(cla)
    return assignments


def _http_manager(stat_prefix: str, route_name: str) -> hcm.HttpConnectionManager:
    manager = hcm.HttpConnectionManager(stat_prefix=stat_prefix)
    manager.rds.route_config_name = route_name
    manager.rds.config_source.CopyFrom(ads())
    manager.http_filters.add(name="envoy.filters.http.router", typed_config=typed(Router()))
    manager.use_remote_address.value = False
    return manager


def _tcp_proxy(stat_prefix: str, cluster: str) -> TcpProxy:
    return TcpProxy(stat_prefix=stat_prefix, cluster=cluster)


def _listener(name: str, host: str, port: int, bind: bool) -> Listener:
    listener = Listener(name=name, address=_address(host, port))
    listener.bind_to_port.value = bind
    listener.traffic_direction = 2 if name != "virtualInbound" else 1  # OUTBOUND / INBOUND
    return listener


def build_listeners(mesh: Mesh, ports: ListenerPorts) -> list[Listener]:
    bind = ports.address is not None
    host = ports.address or "0.0.0.0"
    outbound = _listener("virtualOutbound", host, ports.outbound, bind)
    outbound.use_original_dst.value = True
    if ports.proxy_protocol:
        outbound.listener_filters.add(
            name="envoy.filters.listener.proxy_protocol", typed_config=typed(ProxyProtocol())
        )
    realistic = mesh.profile == "realistic"
    if realistic:
        # Istio's guard against a loop: traffic to 15001 itself goes nowhere.
        blackhole = outbound.filter_chains.add(name="virtualOutbound-blackhole")
        blackhole.filter_chain_match.destination_port.value = ports.outbound
        blackhole.filters.add(
            name="envoy.filters.network.tcp_proxy",
            typed_config=typed(_tcp_proxy(BLACKHOLE, BLACKHOLE)),
        )
    outbound.filter_chains.add(name="virtualOutbound-catchall-tcp").filters.add(
        name="envoy.filters.network.tcp_proxy",
        typed_config=typed(_tcp_proxy(PASSTHROUGH, PASSTHROUGH)),
    )
    inbound = _listener("virtualInbound", host, ports.inbound, bind)
    inbound.filter_chains.add(name="virtualInbound-catchall-tcp").filters.add(
        name="envoy.filters.network.tcp_proxy",
        typed_config=typed(_tcp_proxy("InboundPassthroughCluster", INBOUND_PASSTHROUGH)),
    )
    listeners = [outbound, inbound]
    http_ports = sorted(
        {p.number for s in mesh.services.values() for p in s.ports if p.protocol == "HTTP"}
    )
    for port in http_ports:
        listener = _listener(f"0.0.0.0_{port}", "0.0.0.0", port, False)
        manager = _http_manager(f"outbound_0.0.0.0_{port}", str(port))
        if realistic:
            # Istio sniffs HTTP ports too: plaintext HTTP to the port's table, anything else
            # to its original destination.
            _sniff(listener, manager)
            listener.default_filter_chain.name = "PassthroughFilterChain"
            listener.default_filter_chain.filters.add(
                name="envoy.filters.network.tcp_proxy",
                typed_config=typed(_tcp_proxy(PASSTHROUGH, PASSTHROUGH)),
            )
        else:
            listener.filter_chains.add().filters.add(
                name="envoy.filters.network.http_connection_manager", typed_config=typed(manager)
            )
        listeners.append(listener)
    for service in mesh.services.values():
        for port in service.ports:
            if port.protocol == "HTTP":
                continue
            target = cluster_name(port.number, service.fqdn)
            name = f"{service.cluster_ip}_{port.number}"
            listener = _listener(name, service.cluster_ip, port.number, False)
            if port.protocol == "TCP":
                chain = listener.filter_chains.add()
            else:
                table = f"{service.fqdn}:{port.number}"
                _sniff(listener, _http_manager(f"outbound_{name}", table))
                chain = listener.default_filter_chain
            chain.filters.add(
                name="envoy.filters.network.tcp_proxy",
                typed_config=typed(_tcp_proxy(target, target)),
            )
            listeners.append(listener)
    return listeners


def _sniff(listener: Listener, manager: hcm.HttpConnectionManager) -> None:
    """Istio's protocol sniffing: inspectors, and plaintext HTTP to `manager` (the
    per-service table of a sniffed port, the port table of an HTTP port); whatever else
    arrives takes the default chain."""
    listener.listener_filters.add(
        name="envoy.filters.listener.tls_inspector", typed_config=typed(TlsInspector())
    )
    listener.listener_filters.add(
        name="envoy.filters.listener.http_inspector", typed_config=typed(HttpInspector())
    )
    listener.listener_filters_timeout.SetInParent()  # 0s: sniffing never gives up early
    listener.continue_on_listener_filters_timeout = True
    chain = listener.filter_chains.add()
    chain.filter_chain_match.transport_protocol = "raw_buffer"
    chain.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
    chain.filters.add(
        name="envoy.filters.network.http_connection_manager",
        typed_config=typed(manager),
    )


def _domains(service: Service, node_namespace: str) -> list[str]:
    if service.kind == "dns":
        return [service.fqdn]
    name, namespace = service.name, service.namespace
    domains = [service.fqdn]
    if namespace == node_namespace:
        domains.append(name)
    domains += [f"{name}.{namespace}", f"{name}.{namespace}.svc", service.cluster_ip]
    return domains


def _service_vhost(service: Service, port: int, node_namespace: str) -> VirtualHost:
    vhost = VirtualHost(name=f"{service.fqdn}:{port}", domains=_domains(service, node_namespace))
    vhost.include_request_attempt_count = True
    route = vhost.routes.add(name="default")
    route.match.prefix = "/"
    route.decorator.operation = f"{service.fqdn}:{port}/*"
    action = route.route
    if service.subsets:
        for subset, weight in service.subsets:
            entry = action.weighted_clusters.clusters.add(
                name=cluster_name(port, service.fqdn, subset)
            )
            entry.weight.value = weight
    else:
        action.cluster = cluster_name(port, service.fqdn)
    action.timeout.SetInParent()
    action.max_grpc_timeout.SetInParent()
    retry = action.retry_policy
    retry.retry_on = RETRY_ON
    retry.num_retries.value = 2
    retry.host_selection_retry_max_attempts = 5
    retry.retriable_status_codes.append(503)
    return vhost


def _fallback_vhost(registry_only: bool) -> VirtualHost:
    name = "block_all" if registry_only else "allow_any"
    vhost = VirtualHost(name=name, domains=["*"])
    vhost.include_request_attempt_count = True
    route = vhost.routes.add(name=name)
    route.match.prefix = "/"
    if registry_only:
        route.direct_response.status = 502
    else:
        route.route.cluster = PASSTHROUGH
        route.route.timeout.SetInParent()
        route.route.max_grpc_timeout.SetInParent()
    return vhost


def _sniffed_table(service: Service, port: int) -> RouteConfiguration:
    """A sniffed port's own table: one vhost, named after the service, taking every host."""
    name = f"{service.fqdn}:{port}"
    table = RouteConfiguration(name=name, ignore_port_in_host_matching=True)
    table.validate_clusters.value = False
    vhost = _service_vhost(service, port, service.namespace)
    del vhost.domains[:]
    vhost.domains.append("*")
    table.virtual_hosts.append(vhost)
    return table


def build_routes(mesh: Mesh, node_namespace: str) -> list[RouteConfiguration]:
    by_port: dict[int, list[VirtualHost]] = {}
    tables = []
    for service in mesh.services.values():
        for port in service.ports:
            if port.protocol == "HTTP":
                vhost = _service_vhost(service, port.number, node_namespace)
                by_port.setdefault(port.number, []).append(vhost)
            elif port.protocol == "SNIFFED":
                tables.append(_sniffed_table(service, port.number))
    for port in sorted(by_port):
        table = RouteConfiguration(name=str(port), ignore_port_in_host_matching=True)
        table.validate_clusters.value = False
        table.virtual_hosts.extend(by_port[port])
        table.virtual_hosts.append(_fallback_vhost(mesh.registry_only))
        tables.append(table)
    return tables
