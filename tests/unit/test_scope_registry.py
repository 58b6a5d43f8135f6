"""The scope registry: which static patterns each workload gets from the rules file (by
namespace and its sidecars' labels) and from the store, and which workloads a change touches."""

from xdsproxy.istio.names import ServicePort
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.registry import Scopes
from xdsproxy.scope.rules import parse_rules
from xdsproxy.scope.scope import HostPattern

FRONTEND = WorkloadKey("shop", "frontend")
CART = WorkloadKey("shop", "cart")
PAYMENTS = ServicePort("payments.billing.svc.cluster.local", 80)
REVIEWS = ServicePort("reviews.shop.svc.cluster.local", 9080)
RULES = """\
workloads:
  - namespace: shop
    labels: {app: frontend}
    hosts: [payments.billing.svc.cluster.local]
"""


def test_labels_choose_the_rules_that_apply() -> None:
    scopes = Scopes(parse_rules(RULES))
    assert not scopes.get(FRONTEND).covers(PAYMENTS)  # labels unknown until a sidecar says
    assert scopes.get(FRONTEND, {"app": "frontend"}).covers(PAYMENTS)
    assert not scopes.get(CART, {"app": "cart"}).covers(PAYMENTS)
    assert scopes.labels_of(FRONTEND) == {"app": "frontend"}


def test_new_rules_name_the_workloads_they_change() -> None:
    scopes = Scopes(parse_rules(RULES))
    scopes.get(FRONTEND, {"app": "frontend"})
    scopes.get(CART, {"app": "cart"})
    assert scopes.set_rules(parse_rules(RULES)) == []  # the same rules change nothing
    assert scopes.set_rules(parse_rules("")) == [FRONTEND]
    assert not scopes.get(FRONTEND).covers(PAYMENTS)


def test_stored_patterns_add_to_the_rules() -> None:
    scopes = Scopes(parse_rules(RULES))
    scopes.get(FRONTEND, {"app": "frontend"})
    assert scopes.set_stored(FRONTEND, (HostPattern.parse("reviews.shop.svc.cluster.local"),))
    scope = scopes.get(FRONTEND)
    assert scope.covers(PAYMENTS) and scope.covers(REVIEWS)
    assert not scopes.set_stored(FRONTEND, (HostPattern.parse("reviews.shop.svc.cluster.local"),))
