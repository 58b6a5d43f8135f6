"""The lazy egress's caller routes (SRDS, served by xdsproxy itself), on the pure view and the
pure SotW and Delta machines: never answered from inputs that have not arrived (an egress
reconnect must not remove them), and never routing to a cluster the egress does not hold yet."""

import pytest
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration
from google.protobuf.any_pb2 import Any

from tests.helpers import istio_node
from tests.model_envoy import Loop, ModelEnvoy
from tests.xds_messages import delta_request, node, receive_upstream, sotw_request
from xdsproxy.harness.lazymesh import egress_service
from xdsproxy.istio.node import parse_node
from xdsproxy.scope import inputs
from xdsproxy.scope.egress import EgressSettings, EgressView
from xdsproxy.scope.mesh import MeshTables
from xdsproxy.sim.istiod import DeltaConnection, Snapshot, SotwConnection
from xdsproxy.sim.mesh import Endpoint, Port, Service, generate
from xdsproxy.wire import lean, typeurls
from xdsproxy.wire.codec import (
    decode_delta_response,
    encode_delta_resource,
    encode_delta_response,
    encode_sotw_response,
)
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import SendDownstream
from xdsproxy.xds.sotw import SotwStream

CDS, RDS, SRDS = typeurls.CLUSTER, typeurls.ROUTE, typeurls.SCOPED_ROUTE
MESH = generate(20, tcp_every=0)
NODE = istio_node("istio-system")


def _upstream(mesh=MESH) -> dict:
    snapshot = Snapshot(mesh, "v", None)
    return {t: tuple(zip(*snapshot.resources(t, NODE).items(), strict=True)) for t in (CDS, RDS)}


def _scope_clusters(body: bytes) -> set[str]:
    scope = ScopedRouteConfiguration()
    Any.FromString(body).Unpack(scope)
    return {
        route.route.cluster
        for vhost in scope.route_configuration.virtual_hosts
        for route in vhost.routes
        if route.route.cluster
    }


def test_a_callers_table_naming_a_cluster_the_egress_lacks_is_not_used() -> None:
    late = Service(
        "late", "ns-0", (Port(8080, "HTTP"),), "10.97.0.9", endpoints=(Endpoint("10.1.1.1", 8080),)
    )
    ahead = generate(20, tcp_every=0)
    ahead.add(late)
    tables = MeshTables()
    # A sidecar of ns-0 already received late's route; the egress has not received its CDS.
    tables.record("ns-0", _upstream(ahead)[RDS])
    view = EgressView(EgressSettings(), tables)
    cluster = f"outbound|8080||{late.fqdn}"
    names, bodies = view.select(SRDS, _upstream())
    scope = dict(zip(names, bodies, strict=True))["ns-0/8080"]
    assert cluster not in _scope_clusters(scope)
    # Once the egress holds the cluster, the caller's own table is used.
    names, bodies = view.select(SRDS, _upstream(ahead))
    assert cluster in _scope_clusters(dict(zip(names, bodies, strict=True))["ns-0/8080"])


def _sotw_response(type_url: str, selection, nonce: str) -> bytes:
    return encode_sotw_response("v1", type_url, nonce, list(selection[1]))


def _delta_response(type_url: str, selection, nonce: str) -> bytes:
    bodies = [encode_delta_resource(n, b) for n, b in zip(*selection, strict=True)]
    return encode_delta_response("v1", type_url, nonce, bodies)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_an_egress_reconnect_keeps_every_scope(delta: bool) -> None:
    upstream = _upstream()
    tables = MeshTables()
    view = EgressView(EgressSettings(), tables)
    expected = view.select(SRDS, upstream)[0]
    assert len(expected) > 3
    if delta:
        stream = DeltaStream(view)
        held = dict.fromkeys(expected, "1")
        stream.receive_downstream(delta_request(CDS, initial={"x": "1"}, with_node=True))
        # The egress listener's scopes, re-requested with what Envoy holds.
        assert stream.receive_downstream(delta_request(SRDS, initial=held)) == []
        stream.receive_downstream(delta_request(RDS, subscribe=upstream[RDS][0]))
        assert receive_upstream(stream, _delta_response(CDS, upstream[CDS], "u-c"))[1:] == []
        events = receive_upstream(stream, _delta_response(RDS, upstream[RDS], "u-r"))
        [srds] = [e for e in events if e.type_url == SRDS]
        response = decode_delta_response(srds.payload)
        assert not response.removed and set(response.names) == set(expected)
    else:
        stream = SotwStream(view)
        stream.receive_downstream(sotw_request(CDS, version="v0", with_node=True))
        assert stream.receive_downstream(sotw_request(SRDS, version="v0")) == []
        stream.receive_downstream(sotw_request(RDS, upstream[RDS][0], version="v0"))
        events = receive_upstream(stream, _sotw_response(CDS, upstream[CDS], "u-c"))
        assert not [e for e in events if e.type_url == SRDS]
        events = receive_upstream(stream, _sotw_response(RDS, upstream[RDS], "u-r"))
        [srds] = [e for e in events if isinstance(e, SendDownstream) and e.type_url == SRDS]
        names = [r.value.name for r in lean.SotwNames.FromString(srds.payload).resources]
        assert len(names) == len(expected)


def test_connect_goes_only_to_services_the_egress_can_reach() -> None:
    """A TCP or sniffed service gets a CONNECT vhost in its port's scopes; a headless one does
    not: its ORIGINAL_DST cluster would connect to the egress's own address."""
    mesh = generate(20, profile="realistic")
    view = EgressView(EgressSettings(), MeshTables())
    _, bodies = view.select(SRDS, _upstream(mesh))
    tunnelled = set().union(*map(_scope_clusters, bodies))
    headless = [s for s in mesh.services.values() if s.kind == "headless"]
    assert headless, "the profile has a headless service"
    for service in headless:
        assert f"outbound|{service.ports[0].number}||{service.fqdn}" not in tunnelled
    sniffed_or_tcp = [
        s
        for s in mesh.services.values()
        if s.kind == "eds" and s.ports[0].protocol != "HTTP" and not s.subsets
    ]
    assert sniffed_or_tcp
    for service in sniffed_or_tcp:
        assert f"outbound|{service.ports[0].number}||{service.fqdn}" in tunnelled


def test_tunnel_vhosts_answer_to_the_service_vip() -> None:
    """A compact sidecar tunnels `VIP:PORT`: the egress's vhost for each TCP or sniffed service
    lists its VIP, bare and with the port, taken from Istio's `VIP_PORT` listener."""
    mesh = generate(20, profile="realistic")
    snapshot = Snapshot(mesh, "v", None)
    upstream = {
        t: tuple(zip(*snapshot.resources(t, NODE).items(), strict=True))
        for t in (CDS, RDS, typeurls.LISTENER)
    }
    _, bodies = EgressView(EgressSettings(), MeshTables()).select(SRDS, upstream)
    domains: dict[str, set[str]] = {}
    for body in bodies:
        scope = ScopedRouteConfiguration()
        Any.FromString(body).Unpack(scope)
        for vhost in scope.route_configuration.virtual_hosts:
            domains.setdefault(vhost.name, set()).update(vhost.domains)
    tunnelled = [
        s
        for s in mesh.services.values()
        if s.kind == "eds" and s.ports[0].protocol != "HTTP" and not s.subsets
    ]
    assert tunnelled
    for service in tunnelled:
        port = service.ports[0].number
        assert {service.cluster_ip, f"{service.cluster_ip}:{port}"} <= domains[
            f"{service.fqdn}:{port}"
        ]


def test_caller_routes_follow_the_mesh_tables_version_and_are_shared_until_it_moves() -> None:
    """The tables are a versioned input: the same upstream and version give the very same
    selection (the egress's replicas compute it once); a changed table gives a new one."""
    late = Service(
        "late", "ns-0", (Port(8080, "HTTP"),), "10.97.0.9", endpoints=(Endpoint("10.1.1.1", 8080),)
    )
    ahead = generate(20, tcp_every=0)
    ahead.add(late)
    upstream = _upstream(ahead)
    tables = MeshTables()
    tables.record("ns-0", _upstream()[RDS])
    first = EgressView(EgressSettings(), tables).select(SRDS, upstream)
    assert EgressView(EgressSettings(), tables).select(SRDS, upstream) is first
    assert tables.record("ns-0", upstream[RDS])  # a sidecar of ns-0 got late's route
    second = EgressView(EgressSettings(), tables).select(SRDS, upstream)
    changed = dict(zip(*second, strict=True))["ns-0/8080"]
    assert changed != dict(zip(*first, strict=True))["ns-0/8080"]
    assert second.names == first.names


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_new_services_caller_route_waits_for_the_egress_to_warm_its_cluster(delta: bool) -> None:
    """N3. A sidecar of the namespace gets a new service's route table before the egress gets
    its cluster: the caller route naming it reaches the egress only once the egress has ACKed
    the cluster and its endpoints (R11); until then the egress's own table serves."""
    mesh = generate(20, tcp_every=0)
    mesh.add(egress_service(80, 15081))
    tables = MeshTables()
    egress_node = node("sidecar~10.0.0.9~lazy-egress-0.istio-system~istio-system.svc.cluster.local")
    egress_node.metadata.update({"NAMESPACE": "istio-system"})
    envoy = ModelEnvoy(egress_node, delta)
    stream = (DeltaStream if delta else SotwStream)(EgressView(EgressSettings(), tables))
    istiod = (DeltaConnection if delta else SotwConnection)(Snapshot(mesh, "e", None))
    loop = Loop(envoy, stream, istiod, to_proxy=envoy.connect())
    loop.run()
    loop.to_proxy.append(envoy.watch(SRDS))
    loop.run()
    new = Service(
        "new-svc", "ns-0", (Port(80, "HTTP"),), "10.96.9.9", endpoints=(Endpoint("10.9.9.9", 80),)
    )
    mesh.add(new)
    mesh.generation += 1
    snapshot = Snapshot(mesh, "e2", None)
    routes = snapshot.resources(RDS, parse_node(node()))
    assert tables.record("ns-0", (tuple(routes), tuple(routes.values())))
    loop.handle(stream.inputs_changed(frozenset({inputs.MESH_ROUTE_TABLES})))
    loop.run()
    loop.push(snapshot)
    # The egress's own route tables follow Istiod's order, as they would without xdsproxy.
    assert [v for v in envoy.violations if v.startswith("caller route")] == []
    cluster = f"outbound|80||{new.fqdn}"
    named = {c for body in envoy.held[SRDS].values() for c in _scope_clusters(body)}
    assert cluster in named and cluster not in envoy.warming
