"""`xdsproxy scope why` and `export`, the pure parts: the reasons given for a service, and the
Sidecar resource written for a scope."""

import pytest

from xdsproxy.istio.names import ServicePort
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.explain import DIRECT, EGRESS, WITHHELD, explain
from xdsproxy.scope.rules import parse_rules
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.sidecar_resource import NoSelector, sidecar_resource

W = WorkloadKey("shop", "frontend")
REVIEWS = ServicePort("reviews.shop.svc.cluster.local", 9080)
PAYMENTS = ServicePort("payments.billing.svc.cluster.local", 80)
DB = ServicePort("db.shop.svc.cluster.local", 5432)
EGRESS_SERVICE = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
RULES = """\
namespaces:
  shop:
    - "*/payments.billing.svc.cluster.local"
"""


def _scope() -> Scope:
    scope = Scope(W)
    scope.learn(REVIEWS, 1_700_000_000.0, by="xdsproxy-a")
    scope.set_static(parse_rules(RULES, "rules.yaml").patterns_for("shop", {}))
    return scope


def _why(service: ServicePort, clusters=None, referrers=None, dropped=None) -> dict:
    (answer,) = explain(
        _scope(), [service], lambda s: dropped, {service: clusters or {}}, referrers or {}
    )
    return answer


def test_a_learned_service_says_when_and_by_which_replica() -> None:
    answer = _why(REVIEWS, {"outbound|9080||reviews.shop.svc.cluster.local": DIRECT})
    assert answer["in_scope"]
    assert answer["reasons"] == [
        "learned by xdsproxy-a: first seen 2023-11-14T22:13:20Z, last seen 2023-11-14T22:13:20Z"
    ]


def test_a_static_service_names_the_rule_and_where_it_is_written() -> None:
    answer = _why(PAYMENTS)
    assert answer["in_scope"]
    assert answer["reasons"] == ["static rule 'payments.billing.svc.cluster.local' (rules.yaml:3)"]


def test_a_service_kept_by_a_reference_names_the_referrer() -> None:
    name = "outbound|5432||db.shop.svc.cluster.local"
    answer = _why(DB, {name: DIRECT}, {name: ["listener 10.0.0.9_5432"]})
    assert not answer["in_scope"]
    assert answer["reasons"] == [f"kept: {name} is referenced by listener 10.0.0.9_5432"]


@pytest.mark.parametrize(
    ("dropped", "reason"),
    [
        (None, "not in scope: no request from this workload to it has reached the lazy egress"),
        (("aged out", 1_700_000_000.0), "not in scope: aged out at 2023-11-14T22:13:20Z"),
        (("forgotten", 1_700_000_000.0), "not in scope: forgotten at 2023-11-14T22:13:20Z"),
    ],
)
def test_an_absent_service_says_why(dropped, reason) -> None:
    name = "outbound|5432||db.shop.svc.cluster.local"
    answer = _why(DB, {name: EGRESS}, dropped=dropped)
    assert not answer["in_scope"] and answer["reasons"][0].startswith(reason)
    assert answer["clusters"] == {name: EGRESS}


def test_withheld_clusters_are_listed_as_such() -> None:
    name = "outbound|5432||db.shop.svc.cluster.local"
    assert _why(DB, {name: WITHHELD})["clusters"] == {name: WITHHELD}


def test_export_selects_by_the_workloads_own_labels_and_lists_its_hosts() -> None:
    labels = {
        "app": "frontend",
        "version": "v2",
        "pod-template-hash": "7d9f5c",
        "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": "frontend",
    }
    resource = sidecar_resource(_scope(), labels, EGRESS_SERVICE, "2026-12-04T00:00:00Z")
    assert resource["apiVersion"] == "networking.istio.io/v1" and resource["kind"] == "Sidecar"
    assert resource["metadata"]["name"] == "frontend"
    assert resource["metadata"]["namespace"] == "shop"
    assert resource["spec"]["workloadSelector"] == {"labels": {"app": "frontend", "version": "v2"}}
    assert resource["spec"]["egress"] == [
        {
            "hosts": [
                "*/payments.billing.svc.cluster.local",
                "istio-system/lazy-egress.istio-system.svc.cluster.local",
                "shop/reviews.shop.svc.cluster.local",
            ]
        }
    ]


def test_export_refuses_a_workload_whose_labels_are_unknown() -> None:
    """Without a selector, a Sidecar applies to every workload of its namespace."""
    with pytest.raises(NoSelector, match="whole namespace"):
        sidecar_resource(_scope(), {"pod-template-hash": "x"}, EGRESS_SERVICE, "now")
