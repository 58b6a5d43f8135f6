"""Compact lazy sidecars on the real Istio dumps and the realistic simulator profile: an
out-of-scope service's VIP listener and cluster are left out, mesh-range chains tunnel to the
egress, and one CONNECT entry brings back Istio's exact listener and cluster while the chains
stay byte for byte. Pure: no Envoy (tests/envoy/test_e2e_compact.py runs it on Envoy)."""

import ipaddress

import pytest
from envoy.config.listener.v3.listener_pb2 import Listener
from google.protobuf.any_pb2 import Any

from tests.helpers import APP, APP_IP, EGRESS, Directory, is_placeholder_body, upstreams
from xdsproxy.istio.names import outbound_cluster
from xdsproxy.learn.attribution import AccessRecord, Learned, attribute
from xdsproxy.scope.compact import (
    MESH_CHAIN,
    MESH_HTTP_CHAIN,
    VIRTUAL_OUTBOUND,
    CompactMode,
    MeshRanges,
    service_listener,
)
from xdsproxy.scope.listeners import listener_refs
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.server.app import ServeConfig, compact_mode
from xdsproxy.wire import typeurls
from xdsproxy.xds.ordering import is_original_dst

CDS, LDS = typeurls.CLUSTER, typeurls.LISTENER
# The ranges derived from each upstream's Kubernetes service VIPs (a /16 each, collapsed).
DERIVED = {
    "istio-1.18.2_sidecar_geo_with-eds_deathstarbench.json": ["10.68.0.0/16"],
    "istio-1.20.8-ossm_sidecar_hello-openshift.json": ["172.30.0.0/16"],
    "istio-1.9.1_sidecar_productpage_slime-lazyload.json": [
        "10.96.0.0/15",
        "10.98.0.0/16",
        "10.104.0.0/15",
    ],
    "simulator, realistic profile": ["10.96.0.0/16"],
}


def _decode(body: bytes) -> Listener:
    listener = Listener()
    Any.FromString(body).Unpack(listener)
    return listener


def _service_listeners(upstream: dict) -> dict[str, tuple]:
    """Listener name -> (service, body) for every Kubernetes service VIP listener."""
    clusters = dict(zip(*upstream[CDS], strict=True))
    found = {}
    for name, body in zip(*upstream[LDS], strict=True):
        service = service_listener(listener_refs(body), clusters)
        if service is not None:
            found[name] = (service, body)
    return found


def _view(scope: Scope, ranges: MeshRanges) -> SidecarView:
    return SidecarView(scope, EGRESS, tunnel=True, compact=CompactMode(ranges, sniffed=True))


@pytest.mark.parametrize("name", sorted(upstreams()))
def test_before_learning_no_listener_or_cluster_of_an_out_of_scope_service(name: str) -> None:
    upstream = upstreams()[name]
    ranges = MeshRanges()
    view = _view(Scope(APP), ranges)
    cluster_names, _ = view.select(CDS, upstream)
    listener_names, listeners = view.select(LDS, upstream)
    if name in DERIVED:
        assert [str(n) for n in ranges.networks] == DERIVED[name]

    vip_listeners = _service_listeners(upstream)
    assert vip_listeners, "the upstream has service VIP listeners"
    assert not set(vip_listeners) & set(listener_names)
    services = {service for service, _ in vip_listeners.values()}
    for cluster in cluster_names:
        parsed = outbound_cluster(cluster)
        assert parsed is None or parsed[0] not in services, cluster
    # What stays is Istio's, byte for byte, but for the listeners that carry the mesh chains.
    istio = dict(zip(*upstream[LDS], strict=True))
    for listener_name, body in zip(listener_names, listeners, strict=True):
        if listener_name in istio and body != istio[listener_name]:
            decoded, original = _decode(body), _decode(istio[listener_name])
            added = [c.name for c in decoded.filter_chains[: -len(original.filter_chains)]]
            assert added in ([MESH_CHAIN], [MESH_HTTP_CHAIN, MESH_CHAIN]), listener_name
            assert list(decoded.filter_chains[len(added) :]) == list(original.filter_chains)
    assert VIRTUAL_OUTBOUND in listener_names
    # A headless service's per-pod listeners stay: the egress cannot reach a pod address.
    clusters = dict(zip(*upstream[CDS], strict=True))
    for listener_name, body in zip(*upstream[LDS], strict=True):
        if any(is_original_dst(clusters.get(c, b"")) for c in listener_refs(body).tcp_clusters):
            assert listener_name in listener_names


@pytest.mark.parametrize("name", sorted(upstreams()))
def test_one_connect_to_a_vip_brings_back_istios_listener_and_cluster(name: str) -> None:
    upstream = upstreams()[name]
    scope = Scope(APP)
    view = _view(scope, MeshRanges())
    before = dict(zip(*view.select(LDS, upstream), strict=True))
    listener_name, (service, body) = sorted(_service_listeners(upstream).items())[0]
    refs = listener_refs(body)
    cluster = sorted(refs.tcp_clusters)[0]
    entry = AccessRecord(
        remote_ip=APP_IP,
        claimed_namespace=APP.namespace,
        claimed_workload=APP.workload,
        upstream_cluster=cluster,
        authority=f"{refs.address}:{refs.port}",
        original_port=str(refs.port),
    )
    outcome = attribute(entry, Directory(), lambda s: True)
    assert outcome == Learned(APP, service)
    scope.learn(service, 1.0)

    after = dict(zip(*view.select(LDS, upstream), strict=True))
    assert after[listener_name] is body, "Istio's exact listener"
    assert set(after) - set(before) == {listener_name}
    for kept, kept_body in before.items():
        assert after[kept] == kept_body, f"{kept} changed: its chains would drain"
    clusters = dict(zip(*view.select(CDS, upstream), strict=True))
    istio = dict(zip(*upstream[CDS], strict=True))
    assert clusters[cluster] is istio[cluster]


def test_configured_ranges_win_and_never_change() -> None:
    upstream = upstreams()["simulator, realistic profile"]
    ranges = MeshRanges(["10.96.0.0/12"])
    view = _view(Scope(APP), ranges)
    view.select(LDS, upstream)
    assert ranges.networks == (ipaddress.ip_network("10.96.0.0/12"),)
    assert ranges.source == "--service-cidr"
    derived = MeshRanges()
    derived.settle(["10.96.0.10", "10.97.3.4"])
    derived.settle(["192.168.1.1"])  # once set, later VIPs change nothing
    assert [str(n) for n in derived.networks] == ["10.96.0.0/15"]


def test_a_vip_outside_the_ranges_keeps_its_listener_and_a_placeholder() -> None:
    upstream = upstreams()["simulator, realistic profile"]
    view = _view(Scope(APP), MeshRanges(["10.200.0.0/16"]))
    listener_names, _ = view.select(LDS, upstream)
    assert set(_service_listeners(upstream)) <= set(listener_names)


def test_compact_for_tcp_only_keeps_sniffed_listeners_with_placeholders() -> None:
    upstream = upstreams()["istio-1.18.2_sidecar_geo_with-eds_deathstarbench.json"]
    view = SidecarView(Scope(APP), EGRESS, tunnel=True, compact=CompactMode(MeshRanges()))
    listener_names, _ = view.select(LDS, upstream)
    clusters = dict(zip(*view.select(CDS, upstream), strict=True))
    sniffed = tcp = 0
    for name, (_, body) in _service_listeners(upstream).items():
        refs = listener_refs(body)
        if refs.route_tables:
            sniffed += 1
            assert name in listener_names
            assert all(is_placeholder_body(c, clusters[c]) for c in refs.tcp_clusters)
        else:
            tcp += 1
            assert name not in listener_names
            assert not refs.tcp_clusters & set(clusters)
    assert sniffed and tcp


@pytest.mark.parametrize(
    ("tcp", "sniffed", "cidrs", "store", "expected"),
    [
        ("auto", "placeholders", (), "memory://", None),
        ("auto", "placeholders", ("10.96.0.0/12",), "memory://", (True, False, False)),
        ("auto", "placeholders", (), "kubernetes://istio-system", (True, False, False)),
        ("compact", "placeholders", (), "memory://", (True, False, True)),
        ("placeholders", "compact", (), "memory://", (False, True, True)),
        ("placeholders", "placeholders", ("10.96.0.0/12",), "memory://", None),
    ],
)
def test_compact_mode_from_flags(
    tcp: str, sniffed: str, cidrs: tuple, store: str, expected
) -> None:
    """TCP goes compact by default once the service ranges are known (given, or from the
    Kubernetes API); sniffed ports only when asked; ranges are derived only when asked."""
    config = ServeConfig(
        "x:1", lazy_tcp=tcp, lazy_sniffed=sniffed, service_cidrs=cidrs, store=store
    )
    mode = compact_mode(config)
    assert (None if mode is None else (mode.tcp, mode.sniffed, mode.ranges.derive)) == expected
    if mode is not None and cidrs:
        assert [str(n) for n in mode.ranges.networks] == list(cidrs)


# Sniffed service listeners, and those whose port also has a `0.0.0.0_PORT` HTTP listener (the
# ones whose first-contact HTTP keeps L7 in compact mode): the figures docs/lazy.md quotes.
SNIFFED_WITH_PORT_LISTENER = {
    "istio-1.18.2_sidecar_geo_with-eds_deathstarbench.json": (74, 14),
    "istio-1.20.8-ossm_sidecar_hello-openshift.json": (3, 0),
    "istio-1.22.3_sidecar_app1_multiparty-lb.json": (21, 0),
    "istio-1.9.1_sidecar_productpage_slime-lazyload.json": (3, 0),
    "simulator, realistic profile": (118, 0),
}


@pytest.mark.parametrize("name", sorted(SNIFFED_WITH_PORT_LISTENER))
def test_first_contact_http_keeps_l7_only_where_the_port_has_an_http_listener(name: str) -> None:
    upstream = upstreams()[name]
    view = SidecarView(Scope(APP), EGRESS, compact=CompactMode(MeshRanges(), sniffed=True))
    listener_names, listeners = view.select(LDS, upstream)
    paired_ports = {
        listener_refs(body).port
        for listener_name, body in zip(listener_names, listeners, strict=True)
        if listener_name.startswith("0.0.0.0_")
        and MESH_HTTP_CHAIN in {c.name for c in _decode(body).filter_chains}
    }
    sniffed = [
        refs
        for _, body in _service_listeners(upstream).values()
        if (refs := listener_refs(body)).route_tables
    ]
    keeps_l7 = [refs for refs in sniffed if refs.port in paired_ports]
    assert (len(sniffed), len(keeps_l7)) == SNIFFED_WITH_PORT_LISTENER[name]
