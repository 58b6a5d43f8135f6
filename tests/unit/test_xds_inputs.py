"""No push from inputs that have not arrived (docs/protocol.md, "inputs"), on the pure SotW and
Delta state machines: after a reconnect Istiod answers CDS before LDS, and a scoped view's
clusters depend on its listeners. Driven with bytes, asserting events."""

from collections import Counter

import pytest

from tests.xds_messages import (
    KeepPrefix,
    delta_request,
    delta_response,
    receive_upstream,
    sotw_request,
    sotw_response,
)
from xdsproxy.wire import lean, typeurls
from xdsproxy.wire.codec import decode_delta_response
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import SendDownstream, SendUpstream
from xdsproxy.xds.sotw import SotwStream

CDS, EDS, LDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER


def _view() -> KeepPrefix:
    """In-scope clusters start with `svc-`; a listener `needs:db` keeps cluster `db`."""
    return KeepPrefix("svc-", cds_follows_lds=True)


def _sotw_names(event: SendDownstream) -> list[str]:
    return [entry.value.name for entry in lean.SotwNames.FromString(event.payload).resources]


def test_sotw_cds_waits_for_the_requested_lds_then_relays_istiods_nonce() -> None:
    stream = SotwStream(_view())
    # Envoy reconnects: it re-requests CDS and LDS at once, with the versions it holds.
    stream.receive_downstream(sotw_request(CDS, version="v1", with_node=True))
    stream.receive_downstream(sotw_request(LDS, version="v1"))
    # Istiod answers CDS first: the clusters the listeners keep are not known yet.
    assert receive_upstream(stream, sotw_response(["svc-a", "db"], "v2", "up-c")) == []
    events = receive_upstream(stream, sotw_response(["needs:db"], "v2", "up-l", LDS))
    cds, lds = events
    assert isinstance(cds, SendDownstream) and cds.type_url == CDS and cds.relayed
    assert _sotw_names(cds) == ["svc-a", "db"]  # nothing Envoy holds was dropped
    assert lean.SotwResponse.FromString(cds.payload).nonce == "up-c"
    assert isinstance(lds, SendDownstream) and lds.type_url == LDS
    # Envoy's ACK of the held-back CDS is Istiod's to hear.
    ack = sotw_request(CDS, version="v2", nonce="up-c")
    assert stream.receive_downstream(ack) == [SendUpstream(ack)]


def test_sotw_cds_is_answered_at_once_when_no_input_was_requested() -> None:
    """A fresh Envoy asks LDS only after CDS is answered: waiting would never end."""
    stream = SotwStream(_view())
    stream.receive_downstream(sotw_request(CDS, with_node=True))
    [cds] = receive_upstream(stream, sotw_response(["svc-a", "db"], "v1", "up-c"))
    assert _sotw_names(cds) == ["svc-a"]


def test_sotw_a_local_push_waits_for_inputs_too() -> None:
    view = _view()
    stream = SotwStream(view)
    stream.receive_downstream(sotw_request(CDS, version="v1", with_node=True))
    stream.receive_downstream(sotw_request(LDS, version="v1"))
    receive_upstream(stream, sotw_response(["svc-a", "db", "x-1"], "v2", "up-c"))
    view.prefixes.append("x-")  # a learn, before LDS arrived
    assert stream.refresh() == []
    [cds, _] = receive_upstream(stream, sotw_response(["needs:db"], "v2", "up-l", LDS))
    assert _sotw_names(cds) == ["svc-a", "db", "x-1"]


def test_delta_cds_waits_for_lds_and_removes_nothing_envoy_keeps() -> None:
    stream = DeltaStream(_view())
    held = {"svc-a": "1", "db": "1"}
    stream.receive_downstream(delta_request(CDS, initial=held, with_node=True))
    stream.receive_downstream(delta_request(LDS, initial={"needs:db": "1"}))
    assert receive_upstream(stream, delta_response(["svc-a", "db"], "up-c")) == []
    cds, lds = receive_upstream(stream, delta_response(["needs:db"], "up-l", type_url=LDS))
    response = decode_delta_response(cds.payload)
    assert cds.relayed and response.nonce == "up-c"
    assert not response.removed and sorted(response.names) == ["db", "svc-a"]
    assert lds.type_url == LDS


def test_delta_before_the_fix_would_have_removed_the_tcp_cluster() -> None:
    """The control: with no LDS requested, the same CDS removes `db` (it is not kept by any
    listener), so the test above is what the inputs rule changes."""
    stream = DeltaStream(_view())
    stream.receive_downstream(delta_request(CDS, initial={"svc-a": "1", "db": "1"}, with_node=True))
    [cds] = receive_upstream(stream, delta_response(["svc-a", "db"], "up-c"))
    assert list(decode_delta_response(cds.payload).removed) == ["db"]


class _ReadsPrefixes(KeepPrefix):
    """CDS reads the prefixes as a named input besides the upstream; EDS reads the upstream
    only. Counts the selections it computes."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__(*prefixes, narrows=frozenset({CDS}))
        self.selected: Counter[str] = Counter()

    def depends_on(self, type_url):
        return frozenset({"prefixes"}) if type_url == CDS else frozenset()

    def select(self, type_url, upstream):
        self.selected[type_url] += 1
        return super().select(type_url, upstream)


def _synced(delta: bool) -> tuple[SotwStream | DeltaStream, _ReadsPrefixes]:
    """A stream whose Envoy holds and has ACKed `svc-a` (of `svc-a`, `x-b`) and their
    endpoints."""
    view = _ReadsPrefixes("svc-")
    if delta:
        stream = DeltaStream(view)
        stream.receive_downstream(delta_request(CDS, with_node=True))
        receive_upstream(stream, delta_response(["svc-a", "x-b"], "c1"))
        stream.receive_downstream(delta_request(CDS, nonce="c1"))
        stream.receive_downstream(delta_request(EDS, subscribe=("svc-a",)))
        receive_upstream(stream, delta_response(["svc-a"], "e1", type_url=EDS))
        stream.receive_downstream(delta_request(EDS, nonce="e1"))
    else:
        stream = SotwStream(view)
        stream.receive_downstream(sotw_request(CDS, with_node=True))
        receive_upstream(stream, sotw_response(["svc-a", "x-b"], "v1", "c1"))
        stream.receive_downstream(sotw_request(CDS, version="v1", nonce="c1"))
        stream.receive_downstream(sotw_request(EDS, ("svc-a",)))
        receive_upstream(stream, sotw_response(["svc-a"], "v1", "e1", EDS))
        stream.receive_downstream(sotw_request(EDS, ("svc-a",), "v1", "e1"))
    view.selected.clear()
    return stream, view


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_changed_input_recomputes_only_the_types_that_read_it(delta: bool) -> None:
    """docs/protocol.md R27: a learn widens a sidecar's CDS and RDS without recomputing its
    EDS; a namespace's new route table recomputes only the egress's scoped routes."""
    stream, view = _synced(delta)
    view.prefixes.append("x-")
    [cds] = stream.inputs_changed(frozenset({"prefixes"}))
    assert isinstance(cds, SendDownstream) and cds.type_url == CDS and not cds.relayed
    names = decode_delta_response(cds.payload).names if delta else _sotw_names(cds)
    assert set(names) == ({"x-b"} if delta else {"svc-a", "x-b"})
    assert view.selected == Counter({CDS: 1})
    assert stream.inputs_changed(frozenset({"something else"})) == []
    assert view.selected == Counter({CDS: 1})


def test_sotw_a_request_naming_nothing_istiod_never_answers_is_no_input() -> None:
    """N5. After losing its last route table, a reconnecting SotW Envoy asks RDS for nothing;
    Istiod never answers that (shouldUnsubscribe). CDS must not wait for it (R28)."""
    view = KeepPrefix("svc-", cds_follows_lds=True)
    view.depends_on = lambda t: frozenset({LDS, typeurls.ROUTE}) if t == CDS else frozenset()
    stream = SotwStream(view)
    stream.receive_downstream(sotw_request(CDS, version="v1", with_node=True))
    stream.receive_downstream(sotw_request(LDS, version="v1"))
    stream.receive_downstream(sotw_request(typeurls.ROUTE, (), version="v1"))
    receive_upstream(stream, sotw_response(["svc-1", "db"], "v2", "c1"))
    events = receive_upstream(stream, sotw_response(["needs:db"], "v2", "l1", LDS))
    pushed = [e.type_url for e in events if isinstance(e, SendDownstream)]
    assert pushed == [CDS, LDS] and not stream.held_back()


def test_delta_a_subscription_to_nothing_is_no_input() -> None:
    view = KeepPrefix("svc-", cds_follows_lds=True)
    stream = DeltaStream(view)
    stream.receive_downstream(delta_request(CDS, with_node=True))
    stream.receive_downstream(delta_request(LDS, subscribe=("x",)))
    stream.receive_downstream(delta_request(LDS, unsubscribe=("x",)))
    events = receive_upstream(stream, delta_response(["svc-1"], "c1"))
    assert [e.type_url for e in events if isinstance(e, SendDownstream)] == [CDS]
