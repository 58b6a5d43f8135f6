"""The SotW stream state machine, driven directly with bytes."""

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from tests.xds_messages import KeepPrefix, receive_upstream, sotw_request, sotw_response
from xdsproxy.wire import typeurls
from xdsproxy.xds.events import (
    AckedHere,
    Nacked,
    ProtocolError,
    SendDownstream,
    SendUpstream,
    UpstreamApplied,
    UpstreamProtocolError,
)
from xdsproxy.xds.sotw import SotwStream

CDS, EDS = typeurls.CLUSTER, typeurls.ENDPOINT


def started(view=None) -> SotwStream:
    stream = SotwStream(view) if view else SotwStream()
    first = sotw_request(with_node=True)
    assert stream.receive_downstream(first) == [SendUpstream(first)]
    return stream


def test_first_request_needs_a_node() -> None:
    with pytest.raises(ProtocolError, match="node"):
        SotwStream().receive_downstream(sotw_request())


def test_request_needs_a_type_url() -> None:
    stream = SotwStream()
    with pytest.raises(ProtocolError, match="type_url"):
        stream.receive_downstream(sotw_request(type_url="", with_node=True))


def test_garbage_request_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        SotwStream().receive_downstream(b"\xff\xff\xff")


def test_garbage_response_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        started().receive_upstream(b"\x0a\xff\xff\xff")


def test_node_is_kept_from_the_first_request_only() -> None:
    stream = started()
    assert stream.node is not None and stream.node.id.startswith("sidecar~")
    stream.receive_downstream(sotw_request(EDS, ("a",)))
    assert stream.node.id.startswith("sidecar~")


def test_relay_is_byte_identical_and_ack_goes_upstream() -> None:
    stream = started()
    response = sotw_response(["a", "b"], "v1", "up-1")
    [down] = receive_upstream(stream, response)
    assert isinstance(down, SendDownstream) and down.payload == response and down.relayed
    ack = sotw_request(version="v1", nonce="up-1")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]
    status = stream.status()[CDS]
    assert (status.acked_version, status.state) == ("v1", "SYNCED")


def test_nack_goes_upstream_with_error_detail() -> None:
    stream = started()
    receive_upstream(stream, sotw_response(["a"], "v1", "up-1"))
    stream.receive_downstream(sotw_request(version="v1", nonce="up-1"))
    receive_upstream(stream, sotw_response(["a", "bad"], "v2", "up-2"))
    nack = sotw_request(version="v1", nonce="up-2", error="cluster bad: invalid")
    events = stream.receive_downstream(nack)
    assert Nacked(CDS, "up-2", "cluster bad: invalid", True) in events
    [sent] = [e for e in events if isinstance(e, SendUpstream)]
    forwarded = DiscoveryRequest.FromString(sent.payload)
    assert forwarded.response_nonce == "up-2"
    assert forwarded.version_info == "v1"
    assert forwarded.error_detail.message == "cluster bad: invalid"
    status = stream.status()[CDS]
    assert status.state == "NACK" and status.nack_count == 1 and status.acked_version == "v1"


def test_stale_nonce_is_dropped_not_forwarded() -> None:
    stream = started()
    receive_upstream(stream, sotw_response(["a"], "v1", "up-1"))
    receive_upstream(stream, sotw_response(["a", "b"], "v2", "up-2"))
    assert stream.receive_downstream(sotw_request(version="v1", nonce="up-1")) == []
    assert stream.status()[CDS].state == "STALE"
    ack = sotw_request(version="v2", nonce="up-2")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]


def test_unknown_nonce_is_dropped() -> None:
    stream = started()
    assert stream.receive_downstream(sotw_request(nonce="never-sent")) == []


def test_changed_resource_names_are_forwarded() -> None:
    stream = started()
    first = sotw_request(EDS, ("a",))
    assert stream.receive_downstream(first) == [SendUpstream(first)]
    receive_upstream(stream, sotw_response(["a"], "v1", "e-1", EDS))
    more = sotw_request(EDS, ("a", "b"), version="v1", nonce="e-1")
    assert stream.receive_downstream(more) == [SendUpstream(more)]


def test_passthrough_never_acks_upstream_on_envoys_behalf() -> None:
    stream = started()
    receive_upstream(stream, sotw_response(["a"], "v1", "up-1"))
    stream.receive_downstream(sotw_request(version="v1", nonce="up-1"))
    events = receive_upstream(stream, sotw_response(["a"], "v2", "up-2"))  # same resources
    assert not any(isinstance(e, SendUpstream | AckedHere) for e in events)
    assert [e.relayed for e in events if isinstance(e, SendDownstream)] == [True]


def _accepted(stream: SotwStream, names: list[str], version: str, nonce: str, type_url=CDS):
    receive_upstream(stream, sotw_response(names, version, nonce, type_url))
    subscribed = tuple(names) if type_url == EDS else ()
    stream.receive_downstream(sotw_request(type_url, subscribed, version, nonce))


def test_a_change_outside_the_view_is_acked_here_and_envoy_is_sent_nothing() -> None:
    stream = started(KeepPrefix("keep"))
    _accepted(stream, ["keep-a", "drop-b"], "v1", "up-1")
    events = receive_upstream(stream, sotw_response(["keep-a", "drop-c"], "v2", "up-2"))
    [ack] = events
    assert isinstance(ack, AckedHere) and ack.type_url == CDS
    sent = DiscoveryRequest.FromString(ack.payload)
    assert (sent.type_url, sent.version_info, sent.response_nonce) == (CDS, "v2", "up-2")
    assert not sent.HasField("error_detail") and list(sent.resource_names) == []
    status = stream.status()[CDS]
    assert (status.upstream_nonce, status.pushed_nonce, status.state) == ("up-2", "up-1", "SYNCED")
    # Envoy repeating its ACK of what it holds goes nowhere: Istiod has its answer.
    assert stream.receive_downstream(sotw_request(version="v1", nonce="up-1")) == []
    # A change inside the view is relayed as usual, under the newest upstream nonce.
    [down] = receive_upstream(stream, sotw_response(["keep-a", "keep-d"], "v3", "up-3"))
    assert isinstance(down, SendDownstream) and down.relayed
    assert DiscoveryResponse.FromString(down.payload).nonce == "up-3"
    ack = sotw_request(version="v3", nonce="up-3")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]


def test_an_unchanged_view_is_still_relayed_while_envoy_has_not_accepted_it() -> None:
    stream = started(KeepPrefix("keep"))
    receive_upstream(stream, sotw_response(["keep-a"], "v1", "up-1"))  # not ACKed yet
    [down] = receive_upstream(stream, sotw_response(["keep-a", "drop-c"], "v2", "up-2"))
    assert isinstance(down, SendDownstream) and down.relayed
    stream.receive_downstream(sotw_request(version="v1", nonce="up-2", error="bad"))  # NACK
    [again] = receive_upstream(stream, sotw_response(["keep-a", "drop-d"], "v3", "up-3"))
    assert isinstance(again, SendDownstream) and again.relayed


def test_subscription_change_answered_on_a_covering_nonce_goes_up_against_the_newest() -> None:
    stream = started(KeepPrefix("keep"))
    stream.receive_downstream(sotw_request(EDS, ("keep-a",)))
    _accepted(stream, ["keep-a"], "e1", "eds-1", EDS)
    [ack] = receive_upstream(stream, sotw_response(["keep-a", "drop-x"], "e2", "eds-2", EDS))
    assert list(DiscoveryRequest.FromString(ack.payload).resource_names) == ["keep-a"]
    [up] = stream.receive_downstream(sotw_request(EDS, ("keep-a", "keep-b"), "e1", "eds-1"))
    forwarded = DiscoveryRequest.FromString(up.payload)
    assert (forwarded.response_nonce, forwarded.version_info) == ("eds-2", "e2")
    assert list(forwarded.resource_names) == ["keep-a", "keep-b"]


def test_reconnect_request_with_version_is_relayed() -> None:
    stream = SotwStream()
    again = sotw_request(version="v7", with_node=True)
    assert stream.receive_downstream(again) == [SendUpstream(again)]


def test_wildcard_empty_response_is_relayed() -> None:
    stream = started()
    [down] = receive_upstream(stream, sotw_response([], "v1", "up-1"))
    assert isinstance(down, SendDownstream) and down.resource_count == 0


def test_unknown_type_passes_through() -> None:
    stream = started()
    url = "type.googleapis.com/istio.networking.nds.v1.NameTable"
    request = sotw_request(url)
    assert stream.receive_downstream(request) == [SendUpstream(request)]
    response = sotw_response(["x"], "v1", "nds-1", url)
    [down] = receive_upstream(stream, response)
    assert down.payload == response


def test_narrowing_view_keeps_nonce_and_exact_bytes() -> None:
    stream = started(KeepPrefix("keep"))
    response = sotw_response(["keep-a", "drop-b", "keep-c"], "v1", "up-1")
    [down] = receive_upstream(stream, response)
    sent = DiscoveryResponse.FromString(down.payload)
    original = DiscoveryResponse.FromString(response)
    assert sent.nonce == "up-1" and sent.version_info == "v1"
    assert list(sent.resources) == [original.resources[0], original.resources[2]]
    assert stream.pushed_names(CDS) == ("keep-a", "keep-c")
    status = stream.status()[CDS]
    assert (status.upstream_resources, status.pushed_resources) == (3, 2)
    ack = sotw_request(version="v1", nonce="up-1")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]


def test_widened_view_pushes_locally_and_its_ack_stays_local() -> None:
    view = KeepPrefix("keep")
    stream = started(view)
    receive_upstream(stream, sotw_response(["keep-a", "other-b"], "v1", "up-1"))
    stream.receive_downstream(sotw_request(version="v1", nonce="up-1"))
    assert stream.refresh() == []  # nothing changed, nothing pushed
    view.prefixes.append("other")
    [push] = stream.refresh()
    assert isinstance(push, SendDownstream) and not push.relayed
    sent = DiscoveryResponse.FromString(push.payload)
    assert sent.nonce.startswith("xdsproxy-") and sent.version_info.startswith("v1+")
    assert stream.pushed_names(CDS) == ("keep-a", "other-b")
    assert (
        stream.receive_downstream(sotw_request(version=sent.version_info, nonce=sent.nonce)) == []
    )
    assert stream.status()[CDS].state == "SYNCED"
    nack = sotw_request(version="v1", nonce=sent.nonce, error="bad")
    assert stream.receive_downstream(nack) == [Nacked(CDS, sent.nonce, "bad", False)]
    assert stream.local_nacks == 1


def test_subscription_change_on_a_local_nonce_goes_up_against_the_upstream_nonce() -> None:
    view = KeepPrefix("keep")
    stream = started(view)
    # Envoy watches both; the view lets through only keep-a until it widens.
    stream.receive_downstream(sotw_request(EDS, ("keep-a", "x")))
    receive_upstream(stream, sotw_response(["keep-a", "x"], "e1", "eds-1", EDS))
    view.prefixes.append("x")
    [push] = stream.refresh()
    local_nonce = DiscoveryResponse.FromString(push.payload).nonce
    [up] = stream.receive_downstream(sotw_request(EDS, ("keep-a", "keep-b"), "e1", local_nonce))
    forwarded = DiscoveryRequest.FromString(up.payload)
    assert forwarded.response_nonce == "eds-1" and forwarded.version_info == "e1"
    assert list(forwarded.resource_names) == ["keep-a", "keep-b"]


def test_dependent_type_is_pushed_before_the_relay_that_needs_it() -> None:
    view = KeepPrefix("keep", cds_follows_lds=True)
    stream = started(view)
    receive_upstream(stream, sotw_response(["keep-a", "tcp-svc"], "v1", "up-1"))
    assert stream.pushed_names(CDS) == ("keep-a",)
    stream.receive_downstream(sotw_request(typeurls.LISTENER))
    events = receive_upstream(
        stream, sotw_response(["needs:tcp-svc"], "l1", "lds-1", typeurls.LISTENER)
    )
    assert [(e.type_url, e.relayed) for e in events] == [
        (CDS, False),
        (typeurls.LISTENER, True),
    ]
    assert stream.pushed_names(CDS) == ("keep-a", "tcp-svc")


def test_local_type_is_answered_here_and_never_upstream() -> None:
    srds = typeurls.SCOPED_ROUTE
    view = KeepPrefix("keep", local={srds: [("ns-0/80", b"\x0a\x00")]})
    stream = started(view)
    [push] = stream.receive_downstream(sotw_request(srds))
    assert isinstance(push, SendDownstream) and not push.relayed and push.type_url == srds
    nonce = DiscoveryResponse.FromString(push.payload).nonce
    assert stream.receive_downstream(sotw_request(srds, nonce=nonce)) == []
    view.local_resources[srds].append(("ns-1/80", b"\x0a\x00"))
    [again] = stream.refresh()
    assert again.type_url == srds and again.resource_count == 2


def test_acks_repeating_the_names_are_read_without_them_and_changes_are_still_seen() -> None:
    stream = started()
    names = tuple(f"outbound|80||svc-{i}.ns.svc.cluster.local" for i in range(50))
    assert stream.receive_downstream(sotw_request(EDS, names)) != []
    receive_upstream(stream, sotw_response(list(names), "v1", "e-1", EDS))
    ack = sotw_request(EDS, names, version="v1", nonce="e-1")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]
    assert stream.status()[EDS].acked_nonce == "e-1"
    # Same length, one name different: a subscription change, forwarded as such.
    swapped = (*names[:-1], "outbound|80||svc-x.ns.svc.cluster.local")
    change = sotw_request(EDS, swapped, version="v1", nonce="e-1")
    assert stream.receive_downstream(change) == [SendUpstream(change)]
    receive_upstream(stream, sotw_response(list(swapped), "v2", "e-2", EDS))
    again = sotw_request(EDS, swapped, version="v2", nonce="e-2")
    assert stream.receive_downstream(again) == [SendUpstream(again)]
    assert stream.pushed_names(EDS) == swapped
    # A NACK repeating the names is still read in full.
    receive_upstream(stream, sotw_response(list(swapped), "v3", "e-3", EDS))
    nack = sotw_request(EDS, swapped, version="v2", nonce="e-3", error="bad endpoint")
    assert [type(e).__name__ for e in stream.receive_downstream(nack)] == [
        "Nacked",
        "SendUpstream",
    ]


def test_the_state_of_a_type_that_is_no_wildcard_merges_istiods_partial_responses() -> None:
    """docs/protocol.md R31. Istiod answers a SotW subscription change with the new resources
    only, and Envoy keeps the others: so does the stream, for what the view and the runtime read
    (here the route tables); what Envoy stops watching leaves it."""
    route = typeurls.ROUTE
    stream = started(KeepPrefix("keep"))
    stream.receive_downstream(sotw_request(route, ("keep-80",)))
    receive_upstream(stream, sotw_response(["keep-80"], "v1", "r1", route))
    stream.receive_downstream(sotw_request(route, ("keep-80",), "v1", "r1"))
    stream.receive_downstream(sotw_request(route, ("keep-80", "keep-90"), "v1", "r1"))
    events = stream.receive_upstream(sotw_response(["keep-90"], "v1", "r2", route))
    [applied] = [e for e in events if isinstance(e, UpstreamApplied)]
    assert applied.upstream.names == ("keep-80", "keep-90")
    assert stream.pushed_names(route) == ("keep-80", "keep-90")
    stream.receive_downstream(sotw_request(route, ("keep-90",), "v1", "r2"))
    assert stream.upstream(route).names == ("keep-90",)
    assert stream.pushed_names(route) == ("keep-90",)
