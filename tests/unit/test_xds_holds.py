"""`xds.holds.decide`, row by row (the table in its module doc), and the record it reads."""

import json
from importlib import resources

import jsonschema
from envoy.config.cluster.v3.cluster_pb2 import Cluster

from tests.xds_messages import (
    KeepPrefix,
    cluster_any,
    receive_upstream,
    sotw_request,
    sotw_response,
)
from xdsproxy.debug.model import DebugModel
from xdsproxy.istio.envoyconfig import pack
from xdsproxy.server.ads import AdsProxy, Session
from xdsproxy.server.upstream import Upstream
from xdsproxy.wire import typeurls
from xdsproxy.xds.holds import NOT_STARTED, Action, Hold, Record, Warmth, Why, decide
from xdsproxy.xds.sotw import SotwStream
from xdsproxy.xds.view import Selection

EDS_BODY = cluster_any("eds")
STATIC_BODY = pack(Cluster(name="static", type=Cluster.STATIC))

WARM = Warmth(
    True,
    clusters=frozenset({"a", "b", "static"}),
    endpoints=frozenset({"a"}),
    upstream={"a": EDS_BODY, "b": EDS_BODY, "c": EDS_BODY, "static": STATIC_BODY},
)


def _decide(current=None, **kw):
    args = dict(
        upstream_nonce="",
        control_plane=b"",
        awaiting=frozenset(),
        newly_named=frozenset(),
        warmth=WARM,
        now=10.0,
        release_before=None,
    )
    args.update(kw)
    return decide(current, **args)


def test_send_when_nothing_new_is_named() -> None:
    decision = _decide(upstream_nonce="r1")
    assert decision.action is Action.SEND and decision.hold is None
    assert decision.upstream_nonce == "r1"


def test_send_when_every_named_cluster_is_warm() -> None:
    # `a` has endpoints; `static` is no EDS cluster and warms with CDS alone.
    assert _decide(newly_named=frozenset({"a", "static"})).action is Action.SEND


def test_a_cluster_without_endpoints_holds_until_it_has_them() -> None:
    decision = _decide(upstream_nonce="r1", newly_named=frozenset({"a", "b"}))
    assert decision.action is Action.HOLD
    assert decision.hold == Hold(Why.COLD, 10.0, "r1", b"", frozenset({"b"}))


def test_a_cluster_envoy_lacks_holds() -> None:
    decision = _decide(newly_named=frozenset({"c"}))
    assert decision.action is Action.HOLD and decision.hold.until == {"c"}


def test_a_cluster_istiod_does_not_send_is_never_waited_for() -> None:
    assert _decide(newly_named=frozenset({"nowhere"})).action is Action.SEND


def test_a_fresh_envoy_takes_istiods_order() -> None:
    """Before Envoy runs a CDS it ACKed on the stream, nothing waits for warming (R13)."""
    assert _decide(newly_named=frozenset({"c"}), warmth=NOT_STARTED).action is Action.SEND


def test_inputs_not_answered_hold_whatever_is_warm() -> None:
    decision = _decide(upstream_nonce="c1", awaiting=frozenset({"lds"}))
    assert decision.action is Action.HOLD
    assert decision.hold.why is Why.INPUTS and decision.hold.until == {"lds"}


def test_a_held_push_keeps_its_upstream_nonce_when_it_goes_out() -> None:
    held = Hold(Why.COLD, 1.0, "r1", b"cp", frozenset({"b"}))
    decision = _decide(held)
    assert decision.action is Action.SEND
    assert (decision.upstream_nonce, decision.control_plane) == ("r1", b"cp")


def test_a_held_push_of_our_own_goes_out_as_our_own() -> None:
    """N8: a learn's push that waited is xdsproxy's, not Istiod's (R3)."""
    held = Hold(Why.COLD, 1.0, "", b"", frozenset({"b"}))
    assert _decide(held).upstream_nonce == ""


def test_a_hold_keeps_its_start_while_it_keeps_waiting() -> None:
    held = Hold(Why.COLD, 1.0, "r1", b"", frozenset({"b"}))
    decision = _decide(held, upstream_nonce="r2", newly_named=frozenset({"b"}))
    assert decision.hold.since == 1.0 and decision.hold.upstream_nonce == "r2"


def test_istiods_config_waiting_where_only_ours_did_starts_its_own_clock() -> None:
    held = Hold(Why.COLD, 1.0, "", b"", frozenset({"b"}))
    decision = _decide(held, upstream_nonce="r2", newly_named=frozenset({"b"}))
    assert decision.hold.since == 10.0


def test_istiods_config_past_the_bound_goes_out_cold() -> None:
    held = Hold(Why.COLD, 1.0, "r1", b"", frozenset({"b"}))
    decision = _decide(held, newly_named=frozenset({"b"}), release_before=5.0)
    assert decision.action is Action.SEND_COLD and decision.upstream_nonce == "r1"


def test_a_hold_started_after_the_bound_keeps_waiting() -> None:
    """N2: the bound runs from each hold's own start."""
    held = Hold(Why.COLD, 6.0, "r1", b"", frozenset({"b"}))
    decision = _decide(held, newly_named=frozenset({"b"}), release_before=5.0)
    assert decision.action is Action.HOLD


def test_our_own_push_is_never_sent_cold() -> None:
    """A learn waits for its cluster: the catch-all to the egress serves meanwhile."""
    held = Hold(Why.COLD, 1.0, "", b"", frozenset({"b"}))
    decision = _decide(held, newly_named=frozenset({"b"}), release_before=5.0)
    assert decision.action is Action.HOLD


def test_inputs_are_never_released_by_time() -> None:
    held = Hold(Why.INPUTS, 1.0, "c1", b"", frozenset({"lds"}))
    decision = _decide(held, awaiting=frozenset({"lds"}), release_before=5.0)
    assert decision.action is Action.HOLD


def test_a_record_counts_what_a_nacked_response_may_have_left_applied() -> None:
    """N9: Envoy applies the valid parts of a NACKed CDS or LDS response."""

    def refs(_type_url, selection):
        return frozenset(b.decode() for b in selection.bodies)

    record = Record(pushed=Selection(("l1",), (b"a",)), acked=Selection(("l1",), (b"a",)))
    record.note_nack(Selection(("l2",), (b"b",)))
    assert record.named(refs, "lds") == {"a", "b"}
    record.pushed = Selection(("l1",), (b"a",))
    record.note_ack()
    assert record.named(refs, "lds") == {"a"}


def test_what_envoy_was_pushed_says_whether_a_cluster_needs_endpoints() -> None:
    """A placeholder (no EDS) in the place of Istio's EDS cluster is warm once CDS is ACKed: a
    fresh lazy sidecar's first listeners, which name it, go out at once."""
    warmth = Warmth(
        True,
        clusters=frozenset({"tcp"}),
        upstream={"tcp": EDS_BODY},
        pushed={"tcp": STATIC_BODY},
    )
    assert _decide(newly_named=frozenset({"tcp"}), warmth=warmth).action is Action.SEND
    pushed_eds = Warmth(True, clusters=frozenset({"tcp"}), upstream={}, pushed={"tcp": EDS_BODY})
    assert _decide(newly_named=frozenset({"tcp"}), warmth=pushed_eds).action is Action.HOLD


async def test_the_debug_row_says_what_is_held_back_why_and_for_how_long() -> None:
    """An operator sees a push waiting for a cluster (`/debug/nodes`), checked against the
    endpoint's published schema."""
    cds, lds = typeurls.CLUSTER, typeurls.LISTENER
    stream = SotwStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({cds})))
    stream.receive_downstream(sotw_request(cds, with_node=True))
    stream.receive_downstream(sotw_request(lds))
    receive_upstream(stream, sotw_response(["svc-1", "a", "b"], "v1", "c1"))
    receive_upstream(stream, sotw_response(["needs:a"], "v1", "l1", lds))
    stream.receive_downstream(sotw_request(cds, version="v1", nonce="c1"))
    stream.receive_downstream(sotw_request(lds, version="v1", nonce="l1"))
    receive_upstream(stream, sotw_response(["needs:b"], "v2", "l2", lds))  # b is cold
    proxy = AdsProxy(Upstream("127.0.0.1:1"))
    row = DebugModel(proxy, None).node_row(Session(1, "SotW", "test", stream, proxy._apply))
    held = row["types"]["LDS"]["held_back"]
    assert held["why"] == "cold" and held["istiods"] and held["until"] == ["b"]
    assert row["types"]["CDS"]["held_back"] is None
    schemas = json.loads(resources.files("xdsproxy.debug").joinpath("schemas.json").read_text())
    jsonschema.validate(row, {**schemas["node"], "counts": schemas["counts"]})


def test_nacks_in_a_row_of_the_same_config_do_not_pile_up() -> None:
    """Envoy rejecting every push of a bad config must not grow what the record keeps."""
    record = Record()
    rejected = Selection(("l1", "l2"), (b"a", b"b"))
    for _ in range(5):
        record.note_nack(rejected)
    assert record.maybe == rejected
    record.note_nack(Selection(("l1",), (b"c",)))  # a new body of l1: Envoy may hold either
    assert record.maybe == Selection(("l1", "l2", "l1"), (b"a", b"b", b"c"))
