"""The open streams' Istio nodes (`istio.sessions`), pure: parsed once, found by workload and
by IP, let go on close."""

from tests.helpers import sidecar_node
from xdsproxy.istio.node import parse_node
from xdsproxy.istio.sessions import Sessions
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.contract import EGRESS_ROLE, EGRESS_ROLE_LABEL

APP = WorkloadKey("ns-0", "app")


def test_streams_are_found_by_workload_and_ip_until_they_close() -> None:
    sessions: Sessions[str] = Sessions()
    sessions.open("a-1", parse_node(sidecar_node("10.0.0.1", "app")))
    sessions.open("a-2", parse_node(sidecar_node("10.0.0.2", "app")))
    egress = parse_node(sidecar_node("10.0.0.9", "lazy-egress", {EGRESS_ROLE_LABEL: EGRESS_ROLE}))
    sessions.open("e", egress)
    assert sorted(sessions.of(APP)) == ["a-1", "a-2"]
    assert sessions.egress == {"e"}
    assert sessions.workloads() == [APP]  # the egress is no workload to re-push
    assert sessions.workloads_at("10.0.0.2") == {APP}
    assert sessions.workloads_at("10.0.0.9") == frozenset()
    assert [n.workload for n in sessions.at("10.0.0.9")] == ["lazy-egress"]
    sessions.close("a-1")
    assert sessions.of(APP) == ["a-2"] and sessions.node("a-1") is None
    sessions.close("a-2")
    sessions.close("e")
    assert sessions.workloads() == [] and not sessions.egress
    assert sessions.workloads_at("10.0.0.2") == frozenset()
    sessions.close("never-opened")  # a stream whose node was not Istio's


def test_a_workloads_service_accounts_come_from_its_nodes() -> None:
    sessions: Sessions[int] = Sessions()
    node = sidecar_node("10.0.0.1", "app")
    node.metadata.update({"SERVICE_ACCOUNT": "app-sa"})
    sessions.open(1, parse_node(node))
    assert sessions.service_accounts(APP) == {"app-sa"}
    assert sessions.service_accounts(WorkloadKey("ns-0", "other")) == frozenset()
