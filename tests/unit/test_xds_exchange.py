"""What Envoy's answer means (`xds.exchange`), pure: each row of the module's table, one test."""

import dataclasses

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from tests.xds_messages import delta_request, sotw_request
from xdsproxy.wire import typeurls
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.exchange import LOCAL_NONCE_PREFIX, Answer, Exchange, Subscription
from xdsproxy.xds.sotw import SotwStream

LOCAL = f"{LOCAL_NONCE_PREFIX}1"


def _relayed(nonce: str = "up-2") -> Exchange:
    """Istiod sent `nonce`, and it was relayed to Envoy."""
    exchange = Exchange()
    exchange.record_upstream("v2", nonce)
    exchange.record_push("v2", nonce)
    return exchange


def test_an_answer_to_the_newest_relayed_push_is_istiods() -> None:
    assert _relayed().classify("up-2") is Answer.RELAYED


def test_an_answer_to_the_newest_local_push_stays_here() -> None:
    exchange = _relayed()
    exchange.record_push("v2+local", LOCAL)
    assert exchange.classify(LOCAL) is Answer.LOCAL and Answer.LOCAL.ours


def test_a_push_that_covers_a_self_acked_response_is_answered_here() -> None:
    """docs/protocol.md R2, R6: Istiod's up-3 changed nothing Envoy holds, and was ACKed here;
    the push Envoy holds (up-2) now stands for it."""
    exchange = _relayed()
    exchange.record_upstream("v3", "up-3")
    exchange.cover()
    assert exchange.classify("up-2") is Answer.LOCAL


def test_an_answer_to_istiods_newest_superseded_by_a_local_push_is_istiods() -> None:
    """docs/protocol.md R15."""
    exchange = _relayed()
    exchange.record_push("v2+local", LOCAL)
    assert exchange.classify("up-2") is Answer.SUPERSEDED and not Answer.SUPERSEDED.ours


def test_older_answers_are_stale_and_keep_their_owner() -> None:
    exchange = _relayed("up-1")
    exchange.record_push("v1+local", LOCAL)
    exchange.record_upstream("v2", "up-2")
    exchange.record_push("v2", "up-2")
    assert exchange.classify("up-1") is Answer.STALE and not Answer.STALE.ours
    assert exchange.classify(LOCAL) is Answer.STALE_LOCAL and Answer.STALE_LOCAL.ours
    assert exchange.classify("never-sent") is Answer.STALE


def test_status_is_a_read_only_view_in_istioctls_terms() -> None:
    exchange = Exchange()
    assert exchange.status().state == "NOT SENT"
    exchange.record_upstream("v1", "up-1")
    exchange.record_push("v1", "up-1")
    assert exchange.status().state == "STALE" and not exchange.accepted
    nack = DiscoveryRequest(type_url="t", response_nonce="up-1")
    nack.error_detail.message = "bad cluster"
    assert exchange.answered(nack, "v0").relayed
    assert exchange.status().state == "NACK" and exchange.status().nack_count == 1
    ack = DiscoveryRequest(type_url="t", response_nonce="up-1", version_info="v1")
    assert exchange.answered(ack, "v1") is None
    status = exchange.status()
    assert (status.state, status.acked_version, status.accepted) == ("SYNCED", "v1", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.state = "STALE"  # type: ignore[misc]


def test_both_protocols_keep_the_subscription_as_one_value_type() -> None:
    """SotW: no names is everything, for the wildcard types (Istiod's rule, docs/protocol.md
    R16); Delta: the first request's, then `*` in or out (R22). Either is a `Subscription`."""
    sotw = SotwStream()
    sotw.receive_downstream(sotw_request(typeurls.CLUSTER, with_node=True))
    sotw.receive_downstream(sotw_request(typeurls.ENDPOINT, ("a", "b")))
    assert sotw.subscription(typeurls.CLUSTER) == Subscription(True, ())
    assert sotw.subscription(typeurls.ENDPOINT) == Subscription(False, ("a", "b"))
    delta = DeltaStream()
    delta.receive_downstream(delta_request(typeurls.CLUSTER, with_node=True))
    delta.receive_downstream(delta_request(typeurls.ENDPOINT, subscribe=("a", "b")))
    assert delta.subscription(typeurls.CLUSTER) == Subscription(True, frozenset())
    assert delta.subscription(typeurls.ENDPOINT) == Subscription(False, frozenset({"a", "b"}))
    status = sotw.status()[typeurls.ENDPOINT]
    assert (status.wildcard, status.subscribed) == (False, 2)
