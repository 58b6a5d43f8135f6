"""The simulated Istiod's protocol behaviour and config shapes, without gRPC."""

import re

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.any_pb2 import Any

from tests.helpers import istio_node
from tests.xds_messages import delta_request, sotw_request
from xdsproxy.sim.istiod import DeltaConnection, IstiodError, Snapshot, SotwConnection
from xdsproxy.sim.mesh import Endpoint, cluster_name, generate
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import (
    decode_delta_response,
    decode_sotw_response,
    encode_delta_response,
    encode_sotw_response,
)

CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE
VERSION = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/\d+$")


def snapshot(services: int = 40, registry_only: bool = False) -> Snapshot:
    return Snapshot(generate(services, registry_only=registry_only), "2026-11-22T10:00:00Z", None)


def sotw() -> tuple[SotwConnection, bytes]:
    connection = SotwConnection(snapshot())
    [response] = connection.receive(sotw_request(with_node=True))
    return connection, response


def test_missing_node_and_bad_node_id_are_invalid_argument() -> None:
    with pytest.raises(IstiodError) as missing:
        SotwConnection(snapshot()).receive(sotw_request())
    assert missing.value.code == "INVALID_ARGUMENT"
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

    request = DiscoveryRequest(type_url=CDS)
    request.node.id = "not-an-istio-node"
    with pytest.raises(IstiodError, match="not TYPE~IP"):
        SotwConnection(snapshot()).receive(request.SerializeToString())


def test_initial_cds_is_full_with_istio_version_and_fresh_nonce() -> None:
    _, raw = sotw()
    response = decode_sotw_response(raw)
    assert VERSION.match(response.version)
    assert response.nonce
    assert {
        "PassthroughCluster",
        "BlackHoleCluster",
        "InboundPassthroughCluster",
        "inbound|8080||",
    } <= set(response.names)
    assert any(n.startswith("outbound|") and n.count("|") == 3 for n in response.names)


def test_ack_gets_no_answer_stale_nonce_is_ignored_nack_is_recorded() -> None:
    connection, raw = sotw()
    nonce = decode_sotw_response(raw).nonce
    assert connection.receive(sotw_request(version="v", nonce=nonce)) == []
    assert connection.receive(sotw_request(names=("x",), nonce="stale")) == []
    assert connection.receive(sotw_request(nonce=nonce, error="bad")) == []
    assert connection.watches[CDS].nacks == 1


def test_eds_and_rds_answer_only_requested_names() -> None:
    connection, _ = sotw()
    [eds] = connection.receive(sotw_request(EDS, ("outbound|80||svc-0.ns-0.svc.cluster.local",)))
    assert decode_sotw_response(eds).names == ("outbound|80||svc-0.ns-0.svc.cluster.local",)
    nonce = decode_sotw_response(eds).nonce
    [more] = connection.receive(
        sotw_request(
            EDS,
            (
                "outbound|80||svc-0.ns-0.svc.cluster.local",
                "outbound|8080||svc-4.ns-0.svc.cluster.local",
            ),
            nonce=nonce,
        )
    )
    # Istiod answers a subscription change with the newly subscribed assignments only.
    assert decode_sotw_response(more).names == ("outbound|8080||svc-4.ns-0.svc.cluster.local",)
    nonce = decode_sotw_response(more).nonce
    # ... and a change that only removes names not at all.
    fewer = ("outbound|8080||svc-4.ns-0.svc.cluster.local",)
    assert connection.receive(sotw_request(EDS, fewer, nonce=nonce)) == []
    [rds] = connection.receive(sotw_request(RDS, ("8080", "nope")))
    assert decode_sotw_response(rds).names == ("8080",)


def test_a_request_naming_nothing_of_a_type_that_is_no_wildcard_is_never_answered() -> None:
    """Istiod's shouldUnsubscribe: Envoy sends one for RDS after losing its last table."""
    connection, _ = sotw()
    [rds] = connection.receive(sotw_request(RDS, ("8080",)))
    nonce = decode_sotw_response(rds).nonce
    assert connection.receive(sotw_request(RDS, (), nonce=nonce)) == []
    assert connection.receive(sotw_request(RDS, ())) == []  # a reconnect's, likewise
    assert RDS not in connection.watches


def test_wildcard_is_answered_even_when_empty() -> None:
    connection = SotwConnection(Snapshot(generate(0), "2026-11-22T10:00:00Z", None))
    [cds] = connection.receive(sotw_request(with_node=True))
    assert decode_sotw_response(cds).names == (
        "inbound|8080||",
        "PassthroughCluster",
        "BlackHoleCluster",
        "InboundPassthroughCluster",
    )
    [lds] = connection.receive(sotw_request(LDS))
    assert decode_sotw_response(lds).names == ("virtualOutbound", "virtualInbound")


def test_push_order_is_cds_eds_lds_rds() -> None:
    connection, _ = sotw()
    for type_url, names in ((RDS, ("80",)), (LDS, ()), (EDS, ("x",))):
        connection.receive(sotw_request(type_url, names))
    pushed = connection.push(snapshot())
    assert [decode_sotw_response(p).type_url for p in pushed] == [CDS, EDS, LDS, RDS]


def test_routes_depend_on_the_node_namespace() -> None:
    snap = snapshot()
    mine = snap.resources(RDS, istio_node("ns-0"))
    theirs = snap.resources(RDS, istio_node("ns-1"))
    table = RouteConfiguration()
    Any.FromString(mine["8080"]).Unpack(table)
    vhost = next(v for v in table.virtual_hosts if v.name.startswith("svc-4.ns-0"))
    assert "svc-4" in vhost.domains
    Any.FromString(theirs["8080"]).Unpack(table)
    vhost = next(v for v in table.virtual_hosts if v.name.startswith("svc-4.ns-0"))
    assert "svc-4" not in vhost.domains and "svc-4.ns-0" in vhost.domains
    assert table.virtual_hosts[-1].name == "allow_any"


def test_registry_only_ends_with_block_all() -> None:
    table = RouteConfiguration()
    Any.FromString(snapshot(registry_only=True).resources(RDS, istio_node("ns-0"))["80"]).Unpack(
        table
    )
    assert table.virtual_hosts[-1].name == "block_all"
    assert table.virtual_hosts[-1].routes[0].direct_response.status == 502


def test_mesh_has_every_cluster_type_istio_emits() -> None:
    types = set()
    for body in snapshot().resources(CDS, istio_node("ns-0")).values():
        cluster = Cluster()
        Any.FromString(body).Unpack(cluster)
        types.add(Cluster.DiscoveryType.Name(cluster.type))
    assert {"EDS", "ORIGINAL_DST", "STRICT_DNS", "STATIC"} <= types


def test_weighted_route_references_subset_clusters() -> None:
    snap = snapshot()
    table = RouteConfiguration()
    clusters = set(snap.resources(CDS, istio_node("ns-0")))
    weighted = 0
    for body in snap.resources(RDS, istio_node("ns-0")).values():
        Any.FromString(body).Unpack(table)
        for vhost in table.virtual_hosts:
            for entry in vhost.routes[0].route.weighted_clusters.clusters:
                assert entry.name in clusters
                weighted += 1
    assert weighted >= 2


def test_delta_initial_sends_all_and_removes_vanished() -> None:
    connection = DeltaConnection(snapshot())
    [raw] = connection.receive(
        delta_request(with_node=True, initial={"gone": "", "BlackHoleCluster": ""})
    )
    response = decode_delta_response(raw)
    assert "BlackHoleCluster" in response.names
    assert response.removed == ("gone",)
    assert set(response.versions) == {""}


def test_delta_full_push_resends_everything_watched_and_removes_vanished() -> None:
    """As Istiod's generators do on a full push: unchanged resources are sent again."""
    snap = snapshot()
    connection = DeltaConnection(snap)
    [first] = connection.receive(delta_request(with_node=True))
    fqdn = "svc-0.ns-0.svc.cluster.local"
    [eds] = connection.receive(delta_request(EDS, subscribe=(cluster_name(80, fqdn),)))
    assert decode_delta_response(eds).names == (cluster_name(80, fqdn),)
    mesh = snap.mesh
    mesh.set_endpoints(fqdn, [Endpoint("10.9.9.9", 80)])
    cds, eds = map(decode_delta_response, connection.push(Snapshot(mesh, "t", None)))
    assert (cds.type_url, eds.type_url) == (CDS, EDS)
    assert cds.names == decode_delta_response(first).names and cds.removed == ()
    assert eds.names == (cluster_name(80, fqdn),)
    mesh.remove("svc-5.ns-1.svc.cluster.local")
    cds, _ = map(decode_delta_response, connection.push(Snapshot(mesh, "t", None)))
    assert cds.removed == ("outbound|9080||svc-5.ns-1.svc.cluster.local",)
    assert "outbound|9080||svc-5.ns-1.svc.cluster.local" not in cds.names


def test_delta_subscription_change_sends_only_the_new_names() -> None:
    base = snapshot()
    connection = DeltaConnection(base)
    connection.receive(delta_request(with_node=True))
    services = [s for s in base.mesh.services.values() if s.kind == "eds" and not s.subsets]
    a, b = (cluster_name(s.ports[0].number, s.fqdn) for s in services[:2])
    connection.receive(delta_request(EDS, subscribe=(a,)))
    [raw] = connection.receive(delta_request(EDS, subscribe=(b,)))
    assert decode_delta_response(raw).names == (b,)


def test_responses_are_spliced_exactly_as_an_encoder_would_write_them() -> None:
    """The simulator splices shared encodings; the bytes must equal a plain encode."""
    connection = SotwConnection(snapshot())
    [raw] = connection.receive(sotw_request(with_node=True))
    response = decode_sotw_response(raw)
    assert raw == encode_sotw_response(
        response.version, response.type_url, response.nonce, response.bodies
    )
    delta = DeltaConnection(snapshot())
    [raw] = delta.receive(delta_request(with_node=True, initial={"gone": ""}))
    d = decode_delta_response(raw)
    assert raw == encode_delta_response(d.system_version, d.type_url, d.nonce, d.bodies, d.removed)


def _eds_watch(connection, delta: bool, names: tuple[str, ...]) -> None:
    if delta:
        connection.receive(delta_request(EDS, subscribe=names))
    else:
        connection.receive(sotw_request(EDS, names))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_endpoint_change_pushes_only_the_changed_assignments(delta: bool) -> None:
    base = snapshot()
    mesh = base.mesh
    [a, b] = [s for s in mesh.services.values() if s.kind == "eds" and not s.subsets][:2]
    names = (cluster_name(a.ports[0].number, a.fqdn), cluster_name(b.ports[0].number, b.fqdn))
    connection = DeltaConnection(base) if delta else SotwConnection(base)
    connection.receive(delta_request(with_node=True) if delta else sotw_request(with_node=True))
    _eds_watch(connection, delta, names)

    mesh.set_endpoints(a.fqdn, [Endpoint("10.9.9.9", 80)])
    following = base.with_endpoints(mesh, {a.fqdn})
    assert following.version != base.version
    [raw] = connection.push_endpoints(following, frozenset({names[0]}))
    response = decode_delta_response(raw) if delta else decode_sotw_response(raw)
    assert response.type_url == EDS and response.names == (names[0],)
    assert b"10.9.9.9" in response.bodies[0]
    # Every other type, and b's assignment, are the same objects as before the change.
    for key, resources in base._cache.items():
        if key[0] != EDS:
            assert following._cache[key] is resources
    assert (
        following.resources(EDS, connection.node)[names[1]]
        is base.resources(EDS, connection.node)[names[1]]
    )
    # A change to a cluster this node does not watch sends it nothing.
    assert connection.push_endpoints(following, frozenset({"outbound|1||elsewhere"})) == []


async def test_endpoint_changes_within_the_debounce_share_one_push() -> None:
    from xdsproxy.harness.ads import AdsClient
    from xdsproxy.harness.stack import running_sim

    async with running_sim(generate(20)) as sim:
        eds = [s for s in sim.mesh.services.values() if s.kind == "eds" and not s.subsets][:2]
        names = tuple(cluster_name(s.ports[0].number, s.fqdn) for s in eds)
        client = AdsClient(sim.port)
        await client.send(sotw_request(with_node=True))
        await client.recv()
        await client.send(sotw_request(EDS, names))
        first = decode_sotw_response(await client.recv())
        await client.send(sotw_request(EDS, names, first.version, first.nonce))
        for service in eds:
            sim.set_endpoints(service.fqdn, [Endpoint("10.8.8.8", 80)])
        pushed = decode_sotw_response(await client.recv())
        assert sorted(pushed.names) == sorted(names)
        assert len(sim.endpoint_pushes) == 1 and sim.endpoint_pushes[0][0] == pushed.version
        await client.close()


async def test_full_pushes_queue_and_merge_like_istiods_push_queue() -> None:
    import asyncio

    from xdsproxy.harness.ads import AdsClient
    from xdsproxy.harness.stack import running_sim

    async with running_sim(generate(20)) as sim:
        clients = [AdsClient(sim.port) for _ in range(3)]
        for client in clients:
            await client.send(sotw_request(with_node=True))
            first = decode_sotw_response(await client.recv())
            await client.send(sotw_request(version=first.version, nonce=first.nonce))
        sim.push()
        sim.push()  # before the queue ran: one push, of the newest snapshot
        for client in clients:
            pushed = decode_sotw_response(await client.recv())
            assert pushed.version == sim.snapshot.version
            with pytest.raises(asyncio.TimeoutError):
                await client.recv(timeout=0.3)
            await client.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_synced_once_the_newest_response_of_every_type_is_acked(delta: bool) -> None:
    connection = DeltaConnection(snapshot()) if delta else SotwConnection(snapshot())
    first = delta_request(with_node=True) if delta else sotw_request(with_node=True)
    [raw] = connection.receive(first)
    nonce = (decode_delta_response(raw) if delta else decode_sotw_response(raw)).nonce
    assert not connection.synced()
    nack = (
        delta_request(nonce=nonce, error="bad") if delta else sotw_request(nonce=nonce, error="x")
    )
    connection.receive(nack)
    assert not connection.synced()
    connection.receive(delta_request(nonce=nonce) if delta else sotw_request(nonce=nonce))
    assert connection.synced()
    connection.push(connection.snapshot)
    assert not connection.synced()


def _listener_shape(listener: dict) -> dict:
    """What makes a listener sniffed, TCP or HTTP: its filter chain matches, listener filters,
    and the network filters of its chains (Istio-only stats filters left out)."""

    def filters(chain: dict) -> list[str]:
        return [f["name"] for f in chain.get("filters", []) if not f["name"].startswith("istio.")]

    return {
        "listener_filters": [f["name"] for f in listener.get("listener_filters", [])],
        "continue_on_timeout": listener.get("continue_on_listener_filters_timeout", False),
        "matches": [c.get("filter_chain_match", {}) for c in listener.get("filter_chains", [])],
        "chains": [filters(c) for c in listener.get("filter_chains", [])],
        "default": filters(listener.get("default_filter_chain", {})),
        "rds": [
            f["typed_config"]["rds"]["route_config_name"].count(":")
            for c in listener.get("filter_chains", [])
            for f in c.get("filters", [])
            if "rds" in f.get("typed_config", {})
        ],
    }


def test_realistic_profile_emits_the_listener_shapes_of_the_real_dump() -> None:
    """Each listener shape the simulator emits (sniffed and TCP `VIP_PORT`, HTTP `0.0.0.0_PORT`)
    is one Istio 1.18 sent (DeathStarBench dump), so the simulator cannot drift from Istio."""
    import json as jsonlib

    from envoy.config.listener.v3.listener_pb2 import Listener
    from google.protobuf.any_pb2 import Any
    from google.protobuf.json_format import MessageToDict

    from tests.istio_fixtures import FIXTURES

    dump = jsonlib.loads(
        (FIXTURES / "istio-1.18.2_sidecar_geo_with-eds_deathstarbench.json").read_text()
    )
    [section] = [c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump")]
    real = [
        e["active_state"]["listener"] for e in section["dynamic_listeners"] if "active_state" in e
    ]
    real_shapes = [_listener_shape(x) for x in real if not x["name"].startswith("virtual")]
    emitted = Snapshot(generate(40, profile="realistic"), "v", None).resources(
        typeurls.LISTENER, istio_node("ns-0")
    )
    shapes = []
    for name, body in emitted.items():
        if name.startswith("virtual"):
            continue
        listener = Listener()
        Any.FromString(body).Unpack(listener)
        shapes.append(_listener_shape(MessageToDict(listener, preserving_proto_field_name=True)))
    kinds = {"http" if s["rds"] == [0] else "sniffed" if s["default"] else "tcp" for s in shapes}
    assert kinds == {"sniffed", "tcp", "http"}
    for shape in shapes:
        assert shape in real_shapes, shape
