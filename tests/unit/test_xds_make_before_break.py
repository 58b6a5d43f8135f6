"""Make before break on the pure SotW and Delta machines (docs/protocol.md): a listener that
starts naming a cluster waits until Envoy has warmed it (CDS and its EDS ACKed), and the
cluster it stops naming leaves CDS only after Envoy ACKed the listener without it. Driven with
bytes through a retarget (`needs:a` becomes `needs:b`), the shape of a VirtualService moving a
route to another service."""

from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse

from tests.xds_messages import (
    KeepPrefix,
    cluster_any,
    delta_request,
    delta_response,
    receive_upstream,
    sotw_request,
    sotw_response,
)
from xdsproxy.istio.envoyconfig import pack
from xdsproxy.istio.names import ServicePort
from xdsproxy.model import WorkloadKey
from xdsproxy.scope import inputs
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.wire import lean, typeurls
from xdsproxy.wire.codec import encode_sotw_response
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import SendDownstream, SendUpstream
from xdsproxy.xds.sotw import SotwStream

CDS, EDS, LDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER


def _pushed(events) -> dict[str, SendDownstream]:
    return {e.type_url: e for e in events if isinstance(e, SendDownstream)}


def _sotw(event: SendDownstream) -> tuple[str, list[str]]:
    head = lean.SotwResponse.FromString(event.payload)
    return head.nonce, [r.value.name for r in lean.SotwNames.FromString(event.payload).resources]


def test_sotw_retarget_adds_first_moves_when_warm_removes_last() -> None:
    stream = SotwStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
    stream.receive_downstream(sotw_request(CDS, with_node=True))
    stream.receive_downstream(sotw_request(LDS))
    receive_upstream(stream, sotw_response(["svc-1", "a", "b"], "v1", "c1"))
    pushed = _pushed(receive_upstream(stream, sotw_response(["needs:a"], "v1", "l1", LDS)))
    assert _sotw(pushed[CDS])[1] == ["svc-1", "a"]
    stream.receive_downstream(sotw_request(CDS, version="v1", nonce="c1"))
    stream.receive_downstream(sotw_request(LDS, version="v1", nonce="l1"))
    stream.receive_downstream(sotw_request(EDS, ("a",)))
    receive_upstream(stream, sotw_response(["a"], "v1", "e1", EDS))
    stream.receive_downstream(sotw_request(EDS, ("a",), version="v1", nonce="e1"))

    # The listener moves to b: b is added, a kept, the listener waits for b to warm.
    pushed = _pushed(receive_upstream(stream, sotw_response(["needs:b"], "v2", "l2", LDS)))
    assert list(pushed) == [CDS]
    cds_nonce, names = _sotw(pushed[CDS])
    assert sorted(names) == ["a", "b", "svc-1"]
    assert not _pushed(stream.receive_downstream(sotw_request(CDS, version="x", nonce=cds_nonce)))
    stream.receive_downstream(sotw_request(EDS, ("a", "b"), version="v1", nonce="e1"))
    receive_upstream(stream, sotw_response(["a", "b"], "v2", "e2", EDS))
    # b's endpoints ACKed: the listener goes out, relayed with Istiod's nonce.
    events = stream.receive_downstream(sotw_request(EDS, ("a", "b"), version="v2", nonce="e2"))
    pushed = _pushed(events)
    assert list(pushed) == [LDS] and _sotw(pushed[LDS]) == ("l2", ["needs:b"])
    # Envoy ACKs the listener: now, and only now, a leaves CDS.
    events = stream.receive_downstream(sotw_request(LDS, version="v2", nonce="l2"))
    assert SendUpstream(sotw_request(LDS, version="v2", nonce="l2")) in events
    assert sorted(_sotw(_pushed(events)[CDS])[1]) == ["b", "svc-1"]


def _delta(event: SendDownstream) -> DeltaDiscoveryResponse:
    return DeltaDiscoveryResponse.FromString(event.payload)


def test_delta_retarget_adds_first_moves_when_warm_removes_last() -> None:
    stream = DeltaStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
    stream.receive_downstream(delta_request(CDS, with_node=True))
    stream.receive_downstream(delta_request(LDS))
    receive_upstream(stream, delta_response(["svc-1", "a", "b"], "c1"))
    receive_upstream(stream, delta_response(["needs:a"], "l1", type_url=LDS))
    stream.receive_downstream(delta_request(CDS, nonce="c1"))
    stream.receive_downstream(delta_request(LDS, nonce="l1"))
    stream.receive_downstream(delta_request(EDS, subscribe=("a",)))
    receive_upstream(stream, delta_response(["a"], "e1", type_url=EDS))
    stream.receive_downstream(delta_request(EDS, nonce="e1"))

    retarget = delta_response(["needs:b"], "l2", removed=("needs:a",), type_url=LDS)
    pushed = _pushed(receive_upstream(stream, retarget))
    assert list(pushed) == [CDS]
    cds = _delta(pushed[CDS])
    assert [r.name for r in cds.resources] == ["b"] and not cds.removed_resources
    assert not _pushed(stream.receive_downstream(delta_request(CDS, nonce=cds.nonce)))
    stream.receive_downstream(delta_request(EDS, subscribe=("b",)))
    receive_upstream(stream, delta_response(["b"], "e2", type_url=EDS))
    pushed = _pushed(stream.receive_downstream(delta_request(EDS, nonce="e2")))
    assert list(pushed) == [LDS] and _delta(pushed[LDS]).nonce == "l2"
    pushed = _pushed(stream.receive_downstream(delta_request(LDS, nonce="l2")))
    assert list(_delta(pushed[CDS]).removed_resources) == ["a"]


def test_a_cluster_that_never_warms_is_released_by_the_caller() -> None:
    """The shell calls `release` after a bounded wait: an EDS answer that never comes must
    not hold the listener back for ever."""
    stream = SotwStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
    stream.receive_downstream(sotw_request(CDS, with_node=True))
    stream.receive_downstream(sotw_request(LDS))
    receive_upstream(stream, sotw_response(["svc-1", "a", "b"], "v1", "c1"))
    receive_upstream(stream, sotw_response(["needs:a"], "v1", "l1", LDS))
    stream.receive_downstream(sotw_request(CDS, version="v1", nonce="c1"))
    stream.receive_downstream(sotw_request(LDS, version="v1", nonce="l1"))
    receive_upstream(stream, sotw_response(["needs:b"], "v2", "l2", LDS))
    assert stream.held_back()
    pushed = _pushed(stream.release())
    assert _sotw(pushed[LDS]) == ("l2", ["needs:b"])
    assert not stream.held_back()


# -- the second protocol review (N1, N8, and the order of kept clusters) --------------------

HOST = "a.ns-0.svc.cluster.local"
V1, V2 = f"outbound|80|v1|{HOST}", f"outbound|80|v2|{HOST}"
PLAIN, OTHER = f"outbound|80||{HOST}", "outbound|80||b.ns-0.svc.cluster.local"
EGRESS = "outbound|80||lazy-egress.istio-system.svc.cluster.local"
RDS = typeurls.ROUTE


def _cla(name: str, ip: str = "10.0.0.1") -> bytes:
    assignment = ClusterLoadAssignment(cluster_name=name)
    socket = assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    socket.address, socket.port_value = ip, 8080
    return pack(assignment)


def _table(routes: dict[str, dict[str, int]]) -> bytes:
    """Route table "80": a vhost per host, routing to one cluster or weighted ones."""
    table = RouteConfiguration(name="80")
    for host, weights in routes.items():
        route = table.virtual_hosts.add(name=f"{host}:80", domains=[host]).routes.add()
        route.match.prefix = "/"
        if len(weights) == 1:
            route.route.cluster = next(iter(weights))
        for name, weight in weights.items() if len(weights) > 1 else ():
            route.route.weighted_clusters.clusters.add(name=name).weight.value = weight
    return pack(table)


def _scoped(*hosts: str) -> tuple[Scope, SotwStream]:
    scope = Scope(WorkloadKey("ns-0", "app"))
    for host in hosts:
        scope.learn(ServicePort(host, 80), 1.0)
    return scope, SotwStream(SidecarView(scope, EGRESS))


def _running(stream: SotwStream, clusters: list[str], table: bytes) -> tuple[str, ...]:
    """A sidecar that ACKed CDS, the endpoints of every cluster it holds, and RDS."""
    stream.receive_downstream(sotw_request(CDS, with_node=True))
    receive_upstream(
        stream, encode_sotw_response("v1", CDS, "c1", [cluster_any(n) for n in clusters])
    )
    stream.receive_downstream(
        sotw_request(CDS, version="v1", nonce=stream.status()[CDS].pushed_nonce)
    )
    held = stream.pushed_names(CDS)
    stream.receive_downstream(sotw_request(EDS, held))
    receive_upstream(stream, encode_sotw_response("v1", EDS, "e1", [_cla(n) for n in held]))
    stream.receive_downstream(sotw_request(EDS, held, version="v1", nonce="e1"))
    stream.receive_downstream(sotw_request(RDS, ("80",)))
    receive_upstream(stream, encode_sotw_response("v1", RDS, "r1", [table]))
    stream.receive_downstream(sotw_request(RDS, ("80",), version="v1", nonce="r1"))
    return held


def test_sotw_a_route_to_clusters_warm_before_an_incremental_eds_push_goes_out_at_once() -> None:
    """N1. SotW EDS responses carry only what changed (Istiod's incremental push): clusters
    warmed by earlier responses stay warm, so a canary step is relayed at once."""
    _, stream = _scoped(HOST, "b.ns-0.svc.cluster.local")
    held = _running(stream, [PLAIN, V1, V2, OTHER, EGRESS], _table({HOST: {V1: 100}}))
    receive_upstream(stream, encode_sotw_response("v2", EDS, "e2", [_cla(OTHER, "10.0.0.9")]))
    stream.receive_downstream(sotw_request(EDS, held, version="v2", nonce="e2"))
    events = receive_upstream(
        stream, encode_sotw_response("v3", RDS, "r2", [_table({HOST: {V1: 90, V2: 10}})])
    )
    assert list(_pushed(events)) == [RDS] and not stream.held_back()


def test_sotw_two_learns_in_one_eds_round_trip_are_routed_once_both_are_warm() -> None:
    """N1. Istiod answers each EDS subscription change with the new assignment only."""
    x, y = "x.ns-1.svc.cluster.local", "y.ns-1.svc.cluster.local"
    cx, cy = f"outbound|80||{x}", f"outbound|80||{y}"
    scope, stream = _scoped(HOST)
    _running(
        stream, [PLAIN, V1, cx, cy, EGRESS], _table({HOST: {V1: 100}, x: {cx: 100}, y: {cy: 100}})
    )
    for host in (x, y):
        scope.learn(ServicePort(host, 80), 2.0)
        stream.inputs_changed(frozenset({inputs.SCOPE}))
        stream.receive_downstream(
            sotw_request(CDS, version="x", nonce=stream.status()[CDS].pushed_nonce)
        )
        held = stream.pushed_names(CDS)
        stream.receive_downstream(sotw_request(EDS, held, version="v1", nonce="e1"))
    receive_upstream(stream, encode_sotw_response("v1", EDS, "ex", [_cla(cx)]))
    stream.receive_downstream(sotw_request(EDS, held, version="v1", nonce="ex"))
    receive_upstream(stream, encode_sotw_response("v1", EDS, "ey", [_cla(cy)]))
    events = stream.receive_downstream(sotw_request(EDS, held, version="v1", nonce="ey"))
    assert RDS in _pushed(events) and not stream.held_back()


def test_sotw_a_learns_route_that_waited_goes_out_as_xdsproxys_own() -> None:
    """N8. The learn's route push waited for its cluster: it carries an `xdsproxy-` nonce, and
    Envoy's NACK of it stays here (docs/protocol.md R3)."""
    c = "c.ns-1.svc.cluster.local"
    scope, stream = _scoped(HOST)
    _running(
        stream,
        [PLAIN, f"outbound|80||{c}", EGRESS],
        _table({HOST: {PLAIN: 100}, c: {f"outbound|80||{c}": 100}}),
    )
    scope.learn(ServicePort(c, 80), 2.0)
    stream.inputs_changed(frozenset({inputs.SCOPE}))
    stream.receive_downstream(
        sotw_request(CDS, version="x", nonce=stream.status()[CDS].pushed_nonce)
    )
    held = stream.pushed_names(CDS)
    stream.receive_downstream(sotw_request(EDS, held, version="v1", nonce="e1"))
    receive_upstream(stream, encode_sotw_response("v1", EDS, "e2", [_cla(f"outbound|80||{c}")]))
    route = _pushed(stream.receive_downstream(sotw_request(EDS, held, version="v1", nonce="e2")))[
        RDS
    ]
    nonce, _ = _sotw(route)
    assert nonce.startswith("xdsproxy-") and not route.relayed
    answer = stream.receive_downstream(sotw_request(RDS, ("80",), nonce=nonce, error="rejected"))
    assert not any(isinstance(e, SendUpstream) for e in answer) and stream.local_nacks == 1


def test_sotw_a_kept_cluster_selected_again_is_no_new_push() -> None:
    """A cluster kept only until the listener naming it goes (R12) keeps Istiod's place in
    CDS, so the same set selected again is the same selection: nothing is pushed."""
    view = KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS}))
    stream = SotwStream(view)
    stream.receive_downstream(sotw_request(CDS, with_node=True))
    stream.receive_downstream(sotw_request(LDS))
    receive_upstream(stream, sotw_response(["a", "svc-1", "svc-2"], "v1", "c1"))
    receive_upstream(stream, sotw_response(["needs:a"], "v1", "l1", LDS))
    stream.receive_downstream(sotw_request(CDS, version="v1", nonce="c1"))
    stream.receive_downstream(sotw_request(LDS, version="v1", nonce="l1"))
    # Istiod drops the listener: `a` is kept until Envoy ACKs the listener without it.
    receive_upstream(stream, sotw_response([], "v2", "l2", LDS))
    assert stream.pushed_names(CDS) == ("a", "svc-1", "svc-2")
    # The listener comes back before that ACK: `a` is selected again, in Istiod's order.
    events = receive_upstream(stream, sotw_response(["needs:a"], "v3", "l3", LDS))
    assert CDS not in _pushed(events)
