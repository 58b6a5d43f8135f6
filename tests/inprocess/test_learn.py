"""Attribution (pure), static rules parsing, and the ALS endpoint over real gRPC."""

import asyncio

import grpc
import pytest
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

from tests.helpers import StandInSession, sidecar_node
from xdsproxy.istio.names import ServicePort
from xdsproxy.learn.attribution import AccessRecord, Learned, Rejected, attribute
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.contract import EGRESS_ROLE, EGRESS_ROLE_LABEL, METADATA_NAMESPACE
from xdsproxy.scope.egress import EgressSettings
from xdsproxy.scope.rules import RulesError, parse_rules
from xdsproxy.scope.scope import HostPattern
from xdsproxy.server.als import AlsService, peer_ip
from xdsproxy.server.lazy import LazyRuntime

A = ServicePort("svc-a.ns-1.svc.cluster.local", 8080)
W = WorkloadKey("ns-0", "app")
V = WorkloadKey("ns-0", "victim")


class FakeDirectory:
    def __init__(self, at: dict[str, set[WorkloadKey]], accounts: dict | None = None) -> None:
        self.at, self.accounts = at, accounts or {}

    def workloads_at(self, ip):
        return frozenset(self.at.get(ip, ()))

    def service_accounts(self, workload):
        return frozenset(self.accounts.get(workload, ()))


KNOWN = {A}.__contains__
DIRECTORY = FakeDirectory({"10.0.0.1": {W}, "10.0.0.2": {V}, "10.0.0.9": {W, V}})


def record(**fields) -> AccessRecord:
    base = {
        "remote_ip": "10.0.0.1",
        "claimed_namespace": "ns-0",
        "claimed_workload": "app",
        "upstream_cluster": f"outbound|8080||{A.host}",
    }
    return AccessRecord(**{**base, **fields})


def test_claim_that_agrees_with_the_ip_is_learned() -> None:
    assert attribute(record(), DIRECTORY, KNOWN) == Learned(W, A)


def test_subset_cluster_gives_the_service() -> None:
    result = attribute(record(upstream_cluster=f"outbound|8080|v2|{A.host}"), DIRECTORY, KNOWN)
    assert result == Learned(W, A)


def test_claim_of_another_workload_falls_back_to_the_ip() -> None:
    result = attribute(record(claimed_workload="victim"), DIRECTORY, KNOWN)
    assert result == Learned(W, A, claim_ignored=True)


def test_claim_from_unknown_ip_is_rejected_as_forged() -> None:
    assert attribute(record(remote_ip="10.9.9.9"), DIRECTORY, KNOWN) == Rejected("forged_source")


def test_peer_certificate_can_vouch_for_the_claim() -> None:
    directory = FakeDirectory({}, {W: {"app-sa"}})
    ok = record(remote_ip="10.9.9.9", peer_namespace="ns-0", peer_service_account="app-sa")
    assert attribute(ok, directory, KNOWN) == Learned(W, A)
    wrong = record(remote_ip="10.9.9.9", peer_namespace="ns-0", peer_service_account="other")
    assert attribute(wrong, directory, KNOWN) == Rejected("forged_source")


def test_shared_ip_without_a_matching_claim_is_ambiguous() -> None:
    no_claim = record(remote_ip="10.0.0.9", claimed_namespace="", claimed_workload="")
    assert attribute(no_claim, DIRECTORY, KNOWN) == Rejected("ambiguous_source")
    assert attribute(record(remote_ip="10.0.0.9"), DIRECTORY, KNOWN) == Learned(W, A)


def test_destinations() -> None:
    unknown = record(upstream_cluster="outbound|8080||nope.ns.svc.cluster.local")
    nope = ServicePort("nope.ns.svc.cluster.local", 8080)
    assert attribute(unknown, DIRECTORY, KNOWN) == Rejected("unknown_service", nope)
    passthrough = record(upstream_cluster="xdsproxy-original-dst", authority="example.com")
    assert attribute(passthrough, DIRECTORY, KNOWN) == Rejected("not_a_mesh_service")
    by_authority = record(upstream_cluster="", authority=f"{A.host}:8080", original_port="8080")
    assert attribute(by_authority, DIRECTORY, KNOWN) == Learned(W, A)


def test_rules_parse_and_apply() -> None:
    rules = parse_rules(
        "default: [istio-system/*]\n"
        "namespaces:\n  shop: ['*/pay.billing.svc.cluster.local']\n"
        "workloads:\n  - namespace: shop\n    labels: {app: web}\n"
        "    hosts: [reviews.shop.svc.cluster.local:9080]\n"
    )
    web = rules.patterns_for("shop", {"app": "web"})
    assert HostPattern.parse("istio-system/*") in web
    assert HostPattern.parse("reviews.shop.svc.cluster.local:9080") in web
    assert HostPattern.parse("reviews.shop.svc.cluster.local:9080") not in rules.patterns_for(
        "shop", {"app": "api"}
    )
    assert rules.patterns_for("other", {}) == (HostPattern.parse("istio-system/*"),)


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("default: [a/*]\nbogus: 1\n", ":2", "bogus"),
        ("default: x\n", ":1", "must be a list"),
        ("workloads:\n  - namespace: a\n", ":2", "needs 'hosts'"),
        ("workloads:\n  - namespace: a\n    hosts: [a/*]\n    extra: 1\n", ":4", "extra"),
        ("default: [ok/*, '']\n", ":1", "non-empty"),
        ("default: [a/*\n", ":2", "not valid YAML"),
    ],
)
def test_rules_errors_name_the_line(text: str, where: str, what: str) -> None:
    with pytest.raises(RulesError) as error:
        parse_rules(text, "rules.yaml")
    assert str(error.value).startswith(f"rules.yaml{where}:") and what in str(error.value)


def test_peer_ip() -> None:
    assert peer_ip("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_ip("ipv6:[::1]:5555") == "::1"


def _runtime(als_allow=()) -> LazyRuntime:
    runtime = LazyRuntime(
        ServicePort("egress.istio-system.svc.cluster.local", 80),
        EgressSettings(),
        als_allow=als_allow,
    )
    runtime.learner.known_services.add(A)
    return runtime


def _message(ip: str, claim: tuple[str, str], cluster: str) -> bytes:
    message = StreamAccessLogsMessage()
    entry = message.http_logs.log_entry.add()
    common = entry.common_properties
    common.downstream_direct_remote_address.socket_address.address = ip
    common.upstream_cluster = cluster
    common.metadata.filter_metadata[METADATA_NAMESPACE].update(
        {"x-xdsproxy-source-namespace": claim[0], "x-xdsproxy-source-workload": claim[1]}
    )
    return message.SerializeToString()


async def _als(runtime: LazyRuntime):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AlsService(runtime).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.stream_unary("/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs")
    return server, channel, call


async def test_als_refuses_peers_that_are_not_allowed() -> None:
    runtime = _runtime()
    server, channel, method = await _als(runtime)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await method(iter([_message("10.0.0.1", ("ns-0", "app"), f"outbound|8080||{A.host}")]))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert runtime.learner.rejections["peer_not_allowed"] == 1
        assert runtime.learner.learns == 0
    finally:
        await channel.close()
        await server.stop(0)


async def test_als_learns_from_an_allowed_peer_and_counts_bad_entries() -> None:
    runtime = _runtime(als_allow=["127.0.0.0/8"])
    runtime.opened(StandInSession(sidecar_node("10.0.0.1", "app")))
    runtime.opened(StandInSession(sidecar_node("10.0.0.2", "victim")))
    server, channel, method = await _als(runtime)
    try:
        messages = [
            b"\xff\xff not protobuf",
            _message("10.0.0.1", ("ns-0", "app"), "outbound|8080||unknown.ns.svc.cluster.local"),
            _message("10.0.0.1", ("ns-0", "victim"), f"outbound|8080||{A.host}"),  # forged claim
            _message("10.7.7.7", ("ns-0", "victim"), f"outbound|8080||{A.host}"),  # unknown ip
        ]
        await asyncio.wait_for(method(iter(messages)), 10)
        assert runtime.learner.rejections["malformed"] == 1
        # Not rejected: held until the service's config reaches this replica.
        learner = runtime.learner
        assert len(learner.pending) == 1 and not learner.rejections["unknown_service"]
        assert runtime.learner.rejections["forged_claim"] == 1
        assert runtime.learner.rejections["forged_source"] == 1
        assert runtime.scope(W).covers(A)
        assert not runtime.scope(V).covers(A), "an edge reached the workload a header claimed"
        assert runtime.learner.learns == 1
        metric = "xdsproxy_als_rejections_total"
        assert runtime.metrics.value(metric, {"reason": "forged_source"}) == 1
        assert runtime.metrics.value(metric, {"reason": "malformed"}) == 1
        assert runtime.metrics.value("xdsproxy_learns_total") == 1
    finally:
        await channel.close()
        await server.stop(0)


def test_als_roles_by_peer_ip() -> None:
    runtime = _runtime()
    runtime.opened(
        StandInSession(sidecar_node("10.0.0.5", "lazy-egress", {EGRESS_ROLE_LABEL: EGRESS_ROLE}))
    )
    runtime.opened(StandInSession(sidecar_node("10.0.0.7", "app")))
    assert runtime.als_role("10.0.0.5") == "egress"
    assert runtime.als_role("10.0.0.7") == "sidecar"
    assert runtime.als_role("10.0.0.6") is None
    assert runtime.learner.directory.workloads_at("10.0.0.5") == frozenset()


def test_repeated_warnings_are_rate_limited(caplog) -> None:
    import logging

    from xdsproxy.logs import RateLimitedLog

    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), interval=60)
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        for _ in range(100):
            limited.warning("cause-a", "same problem")
        limited.warning("cause-b", "other problem")
    assert [r.getMessage() for r in caplog.records] == ["same problem", "other problem"]
