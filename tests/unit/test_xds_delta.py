"""The Delta stream state machine, driven directly with bytes."""

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DeltaDiscoveryResponse

from tests.xds_messages import KeepPrefix, delta_request, delta_response, receive_upstream
from xdsproxy.wire import typeurls
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import AckedHere, Nacked, ProtocolError, SendDownstream, SendUpstream

CDS, EDS = typeurls.CLUSTER, typeurls.ENDPOINT


def started(view=None, initial=None) -> DeltaStream:
    stream = DeltaStream(view) if view else DeltaStream()
    first = delta_request(with_node=True, initial=initial)
    assert stream.receive_downstream(first) == [SendUpstream(first)]
    return stream


def test_first_request_needs_a_node() -> None:
    with pytest.raises(ProtocolError, match="node"):
        DeltaStream().receive_downstream(delta_request())


def test_garbage_request_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        DeltaStream().receive_downstream(b"\x0a\x05ab")


def test_empty_first_cds_request_is_wildcard_eds_is_not() -> None:
    stream = started()
    assert stream.subscription(CDS) == (True, frozenset())
    stream.receive_downstream(delta_request(EDS, subscribe=("a", "b")))
    assert stream.subscription(EDS) == (False, frozenset({"a", "b"}))
    stream.receive_downstream(delta_request(EDS, unsubscribe=("a",)))
    assert stream.subscription(EDS) == (False, frozenset({"b"}))


def test_explicit_wildcard_subscription() -> None:
    stream = DeltaStream()
    stream.receive_downstream(delta_request(subscribe=("*", "x"), with_node=True))
    assert stream.subscription(CDS) == (True, frozenset({"x"}))
    stream.receive_downstream(delta_request(unsubscribe=("*",)))
    assert stream.subscription(CDS) == (False, frozenset({"x"}))


def test_relay_is_byte_identical_and_tracks_what_envoy_holds() -> None:
    stream = started()
    response = delta_response(["a", "b"], "up-1")
    [down] = receive_upstream(stream, response)
    assert isinstance(down, SendDownstream) and down.payload == response
    assert set(stream.held(CDS)) == {"a", "b"}
    removal = delta_response([], "up-2", removed=("a",))
    [down] = receive_upstream(stream, removal)
    assert down.payload == removal
    assert set(stream.held(CDS)) == {"b"}


def test_ack_and_nack_go_upstream_verbatim() -> None:
    stream = started()
    receive_upstream(stream, delta_response(["a"], "up-1"))
    ack = delta_request(nonce="up-1")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]
    assert stream.status()[CDS].state == "SYNCED"
    receive_upstream(stream, delta_response(["bad"], "up-2"))
    nack = delta_request(nonce="up-2", error="bad cluster")
    events = stream.receive_downstream(nack)
    assert events == [Nacked(CDS, "up-2", "bad cluster", True), SendUpstream(nack)]
    assert stream.status()[CDS].state == "NACK"


def test_initial_resource_versions_count_as_held() -> None:
    stream = started(initial={"a": "1", "b": "2"})
    assert stream.held(CDS) == {"a", "b"}


def test_narrowing_view_removes_only_what_envoy_holds() -> None:
    stream = started(KeepPrefix("keep"), initial={"drop-old": ""})
    response = delta_response(["keep-a", "drop-b", "drop-old"], "up-1", removed=("never-held",))
    [down] = receive_upstream(stream, response)
    sent = DeltaDiscoveryResponse.FromString(down.payload)
    original = DeltaDiscoveryResponse.FromString(response)
    assert sent.nonce == "up-1"
    assert list(sent.resources) == [original.resources[0]]
    # drop-old was held from a previous connection and is now out of view: removed.
    # never-held and drop-b were never sent: no removal for them.
    assert list(sent.removed_resources) == ["drop-old"]
    assert stream.held(CDS) == {"keep-a"}


def test_ack_of_local_response_stays_local_but_subscription_change_goes_up() -> None:
    stream = started()
    plain = delta_request(EDS, nonce="xdsproxy-3")
    assert stream.receive_downstream(plain) == []
    mixed = delta_request(EDS, subscribe=("c",), nonce="xdsproxy-4", error="oops")
    events = stream.receive_downstream(mixed)
    assert events[0] == Nacked(EDS, "xdsproxy-4", "oops", False)
    forwarded = DeltaDiscoveryRequest.FromString(events[1].payload)
    assert forwarded.response_nonce == "" and not forwarded.HasField("error_detail")
    assert list(forwarded.resource_names_subscribe) == ["c"]


def test_unknown_type_passes_through() -> None:
    stream = started()
    url = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"
    request = delta_request(url, subscribe=("x",))
    assert stream.receive_downstream(request) == [SendUpstream(request)]
    response = delta_response(["x"], "p-1", type_url=url)
    [down] = receive_upstream(stream, response)
    assert down.payload == response


def test_widened_view_sends_only_the_new_resources_locally() -> None:
    view = KeepPrefix("keep")
    stream = started(view)
    receive_upstream(stream, delta_response(["keep-a", "other-b", "other-c"], "up-1"))
    assert stream.refresh() == []
    view.prefixes.append("other")
    [push] = stream.refresh()
    sent = DeltaDiscoveryResponse.FromString(push.payload)
    assert not push.relayed and sent.nonce.startswith("xdsproxy-")
    assert sorted(r.name for r in sent.resources) == ["other-b", "other-c"]
    assert stream.receive_downstream(delta_request(nonce=sent.nonce)) == []
    view.prefixes.remove("other")
    [narrowed] = stream.refresh()
    sent = DeltaDiscoveryResponse.FromString(narrowed.payload)
    assert not sent.resources and sorted(sent.removed_resources) == ["other-b", "other-c"]


def test_upstream_response_that_changes_nothing_in_view_is_still_relayed_for_its_ack() -> None:
    stream = started(KeepPrefix("keep"))
    receive_upstream(stream, delta_response(["keep-a"], "up-1"))
    [down] = receive_upstream(stream, delta_response(["drop-x"], "up-2"))
    sent = DeltaDiscoveryResponse.FromString(down.payload)
    assert down.relayed and sent.nonce == "up-2"
    assert not sent.resources and not sent.removed_resources
    ack = delta_request(nonce="up-2")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]


def test_an_accepted_view_left_unchanged_is_acked_here_and_envoy_is_sent_nothing() -> None:
    stream = started(KeepPrefix("keep"))
    receive_upstream(stream, delta_response(["keep-a"], "up-1"))
    stream.receive_downstream(delta_request(nonce="up-1"))
    # Istiod resends everything on a full push; a change outside the view changes nothing.
    [ack] = receive_upstream(stream, delta_response(["keep-a", "drop-x"], "up-2"))
    assert isinstance(ack, AckedHere) and ack.type_url == CDS
    sent = DeltaDiscoveryRequest.FromString(ack.payload)
    assert (sent.type_url, sent.response_nonce) == (CDS, "up-2")
    assert not sent.resource_names_subscribe and not sent.HasField("error_detail")
    status = stream.status()[CDS]
    assert (status.upstream_nonce, status.pushed_nonce, status.state) == ("up-2", "up-1", "SYNCED")
    assert stream.receive_downstream(delta_request(nonce="up-1")) == []
    # A spontaneous subscription change still goes up; a change in view is relayed again.
    spontaneous = delta_request(EDS, subscribe=("keep-a",))
    assert stream.receive_downstream(spontaneous) == [SendUpstream(spontaneous)]
    [down] = receive_upstream(stream, delta_response(["keep-b"], "up-3"))
    assert isinstance(down, SendDownstream) and down.relayed


def test_passthrough_relays_even_an_unchanged_resend() -> None:
    stream = started()
    receive_upstream(stream, delta_response(["a"], "up-1"))
    stream.receive_downstream(delta_request(nonce="up-1"))
    [down] = receive_upstream(stream, delta_response(["a"], "up-2"))
    assert isinstance(down, SendDownstream) and down.relayed


def test_unchanged_resource_is_not_resent() -> None:
    stream = started(KeepPrefix("keep"))
    receive_upstream(stream, delta_response(["keep-a"], "up-1"))
    [down] = receive_upstream(stream, delta_response(["keep-a", "keep-b"], "up-2"))
    assert [r.name for r in DeltaDiscoveryResponse.FromString(down.payload).resources] == ["keep-b"]


def test_dependent_type_is_pushed_before_the_relay_that_needs_it() -> None:
    stream = started(KeepPrefix("keep", cds_follows_lds=True))
    receive_upstream(stream, delta_response(["keep-a", "tcp-svc"], "up-1"))
    stream.receive_downstream(delta_request(typeurls.LISTENER))
    events = receive_upstream(
        stream, delta_response(["needs:tcp-svc"], "lds-1", type_url=typeurls.LISTENER)
    )
    assert [(e.type_url, e.relayed) for e in events] == [(CDS, False), (typeurls.LISTENER, True)]
    assert stream.held(CDS) == {"keep-a", "tcp-svc"}


def test_local_type_is_served_here() -> None:
    srds = typeurls.SCOPED_ROUTE
    stream = started(KeepPrefix("keep", local={srds: [("ns-0/80", b"\x0a\x00")]}))
    [push] = stream.receive_downstream(delta_request(srds))
    assert push.type_url == srds and not push.relayed and push.resource_count == 1
    nonce = DeltaDiscoveryResponse.FromString(push.payload).nonce
    assert stream.receive_downstream(delta_request(srds, nonce=nonce)) == []


def test_unsubscribe_forgets_the_resource() -> None:
    stream = started(KeepPrefix("keep"))
    stream.receive_downstream(delta_request(EDS, subscribe=("keep-a",)))
    receive_upstream(stream, delta_response(["keep-a"], "e-1", type_url=EDS))
    assert stream.held(EDS) == {"keep-a"}
    stream.receive_downstream(delta_request(EDS, unsubscribe=("keep-a",), nonce="e-1"))
    assert stream.held(EDS) == frozenset() and stream.upstream(EDS) == ((), ())
