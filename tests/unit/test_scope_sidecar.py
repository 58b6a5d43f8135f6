"""The sidecar view: consistency on the simulator mesh and on real Istio dumps, exact bytes,
the catch-all to the egress and its header rules."""

from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.any_pb2 import Any
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import EGRESS, scope_of, sim_upstream, upstream_from_dump, upstream_of
from tests.istio_fixtures import dump_files, load_dump
from xdsproxy.istio.names import ServicePort, outbound_cluster
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.contract import LAZY_HEADERS
from xdsproxy.scope.listeners import listener_refs
from xdsproxy.scope.routes import EGRESS_VHOST, route_clusters
from xdsproxy.scope.scope import HostPattern, Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.sim.mesh import generate
from xdsproxy.wire import typeurls

CDS, LDS, RDS = typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE
SIM_UPSTREAM = sim_upstream()
SIM_SERVICES = sorted({p[0] for n in SIM_UPSTREAM[CDS][0] if (p := outbound_cluster(n))})

DUMPS = {path.name: load_dump(path) for path in dump_files()}


def _table(body: bytes) -> RouteConfiguration:
    table = RouteConfiguration()
    Any.FromString(body).Unpack(table)
    return table


def assert_consistent(view: SidecarView, upstream: dict) -> dict:
    """Nothing pushed references a cluster or route table that was not pushed (but the egress)."""
    clusters = set(view.select(CDS, upstream)[0])
    _, listeners = view.select(LDS, upstream)
    route_names, routes = view.select(RDS, upstream)
    allowed = clusters | {EGRESS}
    # Every table Envoy asked for (here: every upstream table) is pushed, renamed never.
    assert route_names == upstream[RDS][0]
    for body in listeners:
        refs = listener_refs(body)
        assert refs.clusters <= allowed, refs.clusters - allowed
    for body in routes:
        for vhost in _table(body).virtual_hosts:
            for route in vhost.routes:
                assert route_clusters(route) <= allowed, (
                    vhost.name,
                    route_clusters(route) - allowed,
                )
    return {"clusters": clusters, "routes": routes, "listeners": listeners}


@settings(max_examples=30, deadline=None)
@given(st.sets(st.sampled_from(SIM_SERVICES), max_size=12))
def test_consistency_on_the_simulator_mesh(services) -> None:
    view = SidecarView(scope_of(services), EGRESS)
    pushed = assert_consistent(view, SIM_UPSTREAM)
    for name in SIM_UPSTREAM[CDS][0]:
        parsed = outbound_cluster(name)
        if parsed is None or parsed[0] in services:
            assert name in pushed["clusters"], name  # always kept, or in scope with all subsets


def test_consistency_on_every_real_dump_with_random_scopes() -> None:
    import random

    rng = random.Random(7)
    for name, dump in DUMPS.items():
        upstream = upstream_from_dump(dump)
        services = sorted({p[0] for n in upstream[CDS][0] if (p := outbound_cluster(n))})
        for size in (0, 1, 5, len(services)):
            chosen = rng.sample(services, min(size, len(services)))
            pushed = assert_consistent(SidecarView(scope_of(chosen), EGRESS), upstream)
            assert len(pushed["clusters"]) <= len(upstream[CDS][0]), name


def test_empty_scope_keeps_only_what_is_always_kept_and_tcp() -> None:
    view = SidecarView(scope_of(()), EGRESS)
    kept = set(view.select(CDS, SIM_UPSTREAM)[0])
    outbound = {n for n in kept if n.startswith("outbound|")}
    tcp = {n for n in outbound if n.startswith("outbound|3306|")}
    assert outbound == tcp, outbound - tcp  # TCP services stay in scope by default
    assert {
        "PassthroughCluster",
        "BlackHoleCluster",
        "InboundPassthroughCluster",
        "inbound|8080||",
    } <= kept


def test_kept_resources_are_the_exact_upstream_bytes() -> None:
    view = SidecarView(scope_of(SIM_SERVICES[:5]), EGRESS)
    names, bodies = view.select(CDS, SIM_UPSTREAM)
    upstream = dict(zip(*SIM_UPSTREAM[CDS], strict=True))
    assert all(upstream[n] is b for n, b in zip(names, bodies, strict=True))
    assert view.select(LDS, SIM_UPSTREAM) == SIM_UPSTREAM[LDS]


def test_route_tables_end_with_the_egress_and_strip_forged_headers() -> None:
    a = ServicePort("svc-0.ns-0.svc.cluster.local", 80)
    view = SidecarView(scope_of([a]), EGRESS)
    names, bodies = view.select(RDS, SIM_UPSTREAM)
    table = _table(bodies[names.index("80")])
    assert [v.name for v in table.virtual_hosts] == [
        "svc-0.ns-0.svc.cluster.local:80",
        EGRESS_VHOST,
    ]
    catch_all = table.virtual_hosts[-1]
    assert list(catch_all.domains) == ["*"]
    assert catch_all.routes[0].route.cluster == EGRESS
    added = {o.header.key: o.header.value for o in catch_all.request_headers_to_add}
    assert added == {
        "x-xdsproxy-source-namespace": "ns-0",
        "x-xdsproxy-source-workload": "app",
        "x-xdsproxy-original-dst": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "x-xdsproxy-original-port": "80",
    }
    assert all(
        o.append_action == o.OVERWRITE_IF_EXISTS_OR_ADD for o in catch_all.request_headers_to_add
    )
    assert set(LAZY_HEADERS) <= set(table.request_headers_to_remove)
    assert table.most_specific_header_mutations_wins


def test_static_patterns_widen_thescope_of() -> None:
    scope = scope_of(())
    scope.set_static((HostPattern.parse("ns-1/*"),))
    kept = set(SidecarView(scope, EGRESS).select(CDS, SIM_UPSTREAM)[0])
    assert any(".ns-1.svc" in n for n in kept if not n.startswith("outbound|3306|"))
    assert not any(".ns-2.svc" in n for n in kept if not n.startswith("outbound|3306|"))


def test_host_patterns() -> None:
    svc = ServicePort("reviews.shop.svc.cluster.local", 9080)
    assert HostPattern.parse("shop/*").matches(svc)
    assert not HostPattern.parse("other/*").matches(svc)
    assert HostPattern.parse("*/reviews.shop.svc.cluster.local").matches(svc)
    assert HostPattern.parse("reviews.shop.svc.cluster.local:9080").matches(svc)
    assert not HostPattern.parse("reviews.shop.svc.cluster.local:80").matches(svc)
    assert HostPattern.parse("*.shop.svc.cluster.local").matches(svc)


def test_usage_logging_adds_a_sampled_logger_to_outbound_http_listeners_only() -> None:
    from envoy.config.listener.v3.listener_pb2 import Listener
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm,
    )

    from xdsproxy.scope.egress import ALS_CLUSTER, EgressSettings

    view = SidecarView(scope_of(()), EGRESS, EgressSettings(als_host="10.0.0.9"), 2.5)
    assert ALS_CLUSTER in view.select(CDS, SIM_UPSTREAM)[0]
    names, bodies = view.select(LDS, SIM_UPSTREAM)
    upstream = dict(zip(*SIM_UPSTREAM[LDS], strict=True))
    for name, body in zip(names, bodies, strict=True):
        listener = Listener()
        Any.FromString(body).Unpack(listener)
        managers = []
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.typed_config.type_url.endswith("HttpConnectionManager"):
                    manager = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(manager)
                    managers.append(manager)
        if not managers:
            assert body is upstream[name], name  # untouched: the very same bytes
            continue
        [manager] = managers
        [log] = manager.access_log
        assert log.filter.runtime_filter.percent_sampled.numerator == 25_000  # per million
    assert_consistent(view, SIM_UPSTREAM)


def test_replicas_of_a_workload_share_each_selection_until_the_scope_changes() -> None:
    key = WorkloadKey("ns-0", "app")
    scope = Scope(key)
    replicas = [SidecarView(scope, EGRESS) for _ in range(3)]
    first = [view.select(CDS, SIM_UPSTREAM) for view in replicas]
    assert first[0] is first[1] is first[2]
    routes = [view.select(RDS, SIM_UPSTREAM) for view in replicas]
    assert routes[0] is routes[1] is routes[2]

    service = SIM_SERVICES[5]
    assert scope.learn(service, 1.0)
    widened = replicas[0].select(CDS, SIM_UPSTREAM)
    assert widened is not first[0]
    assert any(outbound_cluster(n) and outbound_cluster(n)[0] == service for n in widened[0])
    assert replicas[1].select(CDS, SIM_UPSTREAM) is widened

    # Another scope of the same workload name (a new process state) never sees this one's.
    other = SidecarView(Scope(key), EGRESS).select(CDS, SIM_UPSTREAM)
    assert other == first[0] and other is not widened


def _routed_services(table: RouteConfiguration) -> set[ServicePort]:
    """Services a table sends requests to, read from its routes' clusters."""
    found = set()
    for vhost in table.virtual_hosts:
        for route in vhost.routes:
            found |= {p[0] for c in route_clusters(route) if (p := outbound_cluster(c))}
    return found


def _assert_learned_services_route_downstream(upstream: dict) -> int:
    """After learning a service, every table that routes to it upstream routes to it
    downstream; each pushed table has exactly one `*` vhost (Envoy rejects two)."""
    checked = 0
    names, bodies = upstream[RDS]
    routed = {
        name: _routed_services(_table(body)) for name, body in zip(names, bodies, strict=True)
    }
    for service in sorted(set().union(*routed.values())):
        view = SidecarView(scope_of([service]), EGRESS)
        pushed = dict(zip(*view.select(RDS, upstream), strict=True))
        for name, services in routed.items():
            table = _table(pushed[name])
            wildcards = [v.name for v in table.virtual_hosts if "*" in v.domains]
            assert len(wildcards) == 1, (name, wildcards)
            if service in services:
                assert service in _routed_services(table), (name, str(service))
                checked += 1
    return checked


def test_every_real_table_routes_a_learned_service_downstream() -> None:
    per_service_tables = 0
    for name, dump in DUMPS.items():
        upstream = upstream_from_dump(dump)
        assert _assert_learned_services_route_downstream(upstream), name
        per_service_tables += sum(":" in n for n in upstream[RDS][0])
    assert per_service_tables > 50  # Istio's `FQDN:PORT` tables are among them


def test_a_per_service_table_goes_to_the_egress_until_its_service_is_learned() -> None:
    upstream = upstream_from_dump(DUMPS["istio-1.18.2_sidecar_geo_with-eds_deathstarbench.json"])
    table_name = "compose-post-service.social-network.svc.cluster.local:9090"
    service = ServicePort("compose-post-service.social-network.svc.cluster.local", 9090)
    outside = dict(zip(*SidecarView(scope_of(()), EGRESS).select(RDS, upstream), strict=True))
    assert [v.name for v in _table(outside[table_name]).virtual_hosts] == [EGRESS_VHOST]
    inside = dict(zip(*SidecarView(scope_of([service]), EGRESS).select(RDS, upstream), strict=True))
    [vhost] = _table(inside[table_name]).virtual_hosts
    assert vhost.name == table_name and list(vhost.domains) == ["*"]


def test_the_simulator_emits_per_service_tables_that_route_downstream_once_learned() -> None:
    upstream = upstream_of(generate(60, profile="realistic"))
    sniffed = [n for n in upstream[RDS][0] if ":" in n]
    assert len(sniffed) >= 30, "the simulator emits too few per-service (sniffed) route tables"
    assert _assert_learned_services_route_downstream(upstream)
    for size in (0, 3, 20):
        chosen = sorted({p[0] for n in upstream[CDS][0] if (p := outbound_cluster(n))})[:size]
        assert_consistent(SidecarView(scope_of(chosen), EGRESS), upstream)
