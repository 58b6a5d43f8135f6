"""NACKs heal as they do without xdsproxy (pure state machines, fed bytes): a Delta response
Envoy rejected is not assumed applied, and a SotW answer to Istiod's newest response reaches
Istiod even when a local push superseded that response before Envoy answered."""

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse, DiscoveryResponse

from tests.xds_messages import (
    KeepPrefix,
    delta_request,
    delta_response,
    receive_upstream,
    sotw_request,
    sotw_response,
)
from xdsproxy.wire import typeurls
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import AckedHere, Nacked, SendDownstream, SendUpstream
from xdsproxy.xds.sotw import SotwStream

CDS, EDS, LDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER


def _names(event: SendDownstream) -> list[str]:
    return [r.name for r in DeltaDiscoveryResponse.FromString(event.payload).resources]


def test_delta_a_nacked_resource_is_offered_again_and_never_acked_here() -> None:
    stream = DeltaStream(KeepPrefix("keep"))
    stream.receive_downstream(delta_request(with_node=True))
    receive_upstream(stream, delta_response(["keep-a"], "u1"))
    stream.receive_downstream(delta_request(nonce="u1"))
    [down] = receive_upstream(stream, delta_response(["keep-a", "keep-bad"], "u2"))
    assert _names(down) == ["keep-bad"]
    events = stream.receive_downstream(delta_request(nonce="u2", error="keep-bad: invalid"))
    assert [type(e) for e in events] == [Nacked, SendUpstream]
    assert "keep-bad" in stream.held(down.type_url)  # Envoy may hold an older one: unknown
    # Istiod's next full push resends it unchanged: Envoy is offered it again.
    [down] = receive_upstream(stream, delta_response(["keep-a", "keep-bad"], "u3"))
    assert isinstance(down, SendDownstream) and _names(down) == ["keep-bad"]
    stream.receive_downstream(delta_request(nonce="u3", error="keep-bad: invalid"))
    [again] = receive_upstream(stream, delta_response(["keep-a", "keep-bad"], "u4"))
    assert not isinstance(again, AckedHere), "ACKed Istiod for an Envoy that rejected it"
    # Once Envoy accepts it, unchanged resends are ACKed here as usual.
    stream.receive_downstream(delta_request(nonce="u4"))
    [acked] = receive_upstream(stream, delta_response(["keep-a", "keep-bad"], "u5"))
    assert isinstance(acked, AckedHere)


def test_delta_a_nacked_removal_is_sent_again() -> None:
    stream = DeltaStream(KeepPrefix("keep"))
    stream.receive_downstream(delta_request(with_node=True))
    receive_upstream(stream, delta_response(["keep-a", "keep-b"], "u1"))
    stream.receive_downstream(delta_request(nonce="u1"))
    [down] = receive_upstream(stream, delta_response([], "u2", removed=("keep-b",)))
    assert list(DeltaDiscoveryResponse.FromString(down.payload).removed_resources) == ["keep-b"]
    stream.receive_downstream(delta_request(nonce="u2", error="rejected"))
    [down] = receive_upstream(stream, delta_response(["keep-a"], "u3"))
    assert "keep-b" in DeltaDiscoveryResponse.FromString(down.payload).removed_resources


def test_sotw_answer_to_a_superseded_relayed_response_reaches_istiod() -> None:
    view = KeepPrefix("keep")
    stream = SotwStream(view)
    stream.receive_downstream(sotw_request(with_node=True))
    receive_upstream(stream, sotw_response(["keep-a"], "v1", "u1"))
    stream.receive_downstream(sotw_request(version="v1", nonce="u1"))
    receive_upstream(stream, sotw_response(["keep-a", "keep-bad", "other-x"], "v2", "u2"))
    view.prefixes.append("other")  # a learn lands before Envoy answered u2
    [local] = stream.refresh()
    nack = sotw_request(version="v1", nonce="u2", error="keep-bad invalid")
    events = stream.receive_downstream(nack)
    assert events[-1] == SendUpstream(nack), "Istiod never hears its config was rejected"
    assert isinstance(events[0], Nacked) and events[0].relayed
    # An ACK of a superseded relayed response goes up too, so Istiod does not stay STALE.
    receive_upstream(stream, sotw_response(["keep-a", "other-x", "more-y"], "v3", "u3"))
    view.prefixes.append("more")
    assert stream.refresh()
    ack = sotw_request(version="v3", nonce="u3")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]
    local_nonce = DiscoveryResponse.FromString(local.payload).nonce
    # An answer to an older response than Istiod's newest is still dropped (stale).
    assert stream.receive_downstream(sotw_request(version="v1", nonce=local_nonce)) == []


def _delta_after_a_nack_with(in_flight: int) -> list:
    stream = DeltaStream(KeepPrefix("keep"))
    stream.receive_downstream(delta_request(with_node=True))
    receive_upstream(stream, delta_response(["keep-a"], "u0"))
    stream.receive_downstream(delta_request(nonce="u0"))
    receive_upstream(stream, delta_response(["keep-a", "keep-bad"], "u1"))
    for i in range(in_flight):  # relayed before Envoy's NACK of u1 comes back
        receive_upstream(stream, delta_response([f"keep-x{i}"], f"v{i}"))
    stream.receive_downstream(delta_request(nonce="u1", error="keep-bad: invalid"))
    for i in range(in_flight):
        stream.receive_downstream(delta_request(nonce=f"v{i}"))
    return receive_upstream(stream, delta_response(["keep-a", "keep-bad"], "u9"))


@pytest.mark.parametrize("in_flight", [1, 9, 200])
def test_delta_a_nack_is_undone_however_many_responses_are_in_flight(in_flight: int) -> None:
    """N7. Every unanswered response's content is kept until Envoy answers it (R14)."""
    [down] = _delta_after_a_nack_with(in_flight)
    assert isinstance(down, SendDownstream) and _names(down) == ["keep-bad"]


@pytest.mark.parametrize("nacked", [False, True], ids=["acked", "nacked"])
def test_delta_a_listener_from_a_nacked_response_still_protects_its_cluster(nacked: bool) -> None:
    """N9. Envoy applies the valid listeners of an LDS response it NACKs: the cluster such a
    listener names is removed only after the listener (R12)."""
    stream = DeltaStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
    stream.receive_downstream(delta_request(CDS, with_node=True))
    stream.receive_downstream(delta_request(LDS))
    receive_upstream(stream, delta_response(["svc-1", "a", "b"], "c1"))
    receive_upstream(stream, delta_response(["needs:a"], "l1", type_url=LDS))
    stream.receive_downstream(delta_request(CDS, nonce="c1"))
    stream.receive_downstream(delta_request(LDS, nonce="l1"))
    stream.receive_downstream(delta_request(EDS, subscribe=("a", "b")))
    receive_upstream(stream, delta_response(["a", "b"], "e1", type_url=EDS))
    stream.receive_downstream(delta_request(EDS, nonce="e1"))
    events = receive_upstream(stream, delta_response(["needs:b", "other"], "l2", type_url=LDS))
    [cds] = [e for e in events if isinstance(e, SendDownstream) and e.type_url == CDS]
    stream.receive_downstream(
        delta_request(CDS, nonce=DeltaDiscoveryResponse.FromString(cds.payload).nonce)
    )
    stream.receive_downstream(
        delta_request(LDS, nonce="l2", error="other: invalid" if nacked else "")
    )
    events = receive_upstream(stream, delta_response([], "l3", removed=("needs:b",), type_url=LDS))
    removed = [
        name
        for e in events
        if isinstance(e, SendDownstream) and e.type_url == CDS
        for name in DeltaDiscoveryResponse.FromString(e.payload).removed_resources
    ]
    assert "b" not in removed
