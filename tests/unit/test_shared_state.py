"""Streams in the same state share their maps: one copy however many sidecars."""

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.xds_messages import (
    delta_request,
    delta_response,
    receive_upstream,
    sotw_request,
    sotw_response,
)
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import decode_delta_response, encode_delta_response
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.shared import FrozenMap, Transitions
from xdsproxy.xds.sotw import SotwStream

CDS, EDS = typeurls.CLUSTER, typeurls.ENDPOINT


def test_the_same_change_to_the_same_base_is_computed_once() -> None:
    transitions = Transitions()
    base = FrozenMap({"a": 1})
    first = transitions.apply(base, ("add", "b"), lambda: FrozenMap({**base, "b": 2}))
    again = transitions.apply(base, ("add", "b"), lambda: FrozenMap({"wrong": 0}))
    assert again is first and transitions.computed == 1
    other = FrozenMap({"a": 1})  # equal content, another state: its own result
    assert transitions.apply(other, ("add", "b"), lambda: FrozenMap({"b": 2})) is not first
    fresh = [transitions.apply(base, None, lambda: FrozenMap()) for _ in range(2)]
    assert fresh[0] is not fresh[1]  # an unnamed change is never shared


def test_a_result_no_stream_holds_is_not_kept() -> None:
    transitions = Transitions()
    base = FrozenMap({"a": 1})
    transitions.apply(base, "change", lambda: FrozenMap({"x": 1}))
    gc.collect()
    result = transitions.apply(base, "change", lambda: FrozenMap({"y": 2}))
    assert result == {"y": 2} and transitions.computed == 2


def test_identical_resources_under_other_nonces_get_one_resources_id() -> None:
    one = decode_delta_response(delta_response(["a", "b"], "n-1"))
    two = decode_delta_response(delta_response(["a", "b"], "n-2"))
    other = decode_delta_response(delta_response(["a", "c"], "n-3"))
    assert one.resources_id == two.resources_id != 0
    assert other.resources_id not in (0, one.resources_id)
    assert two.names is one.names and two.anys is one.anys
    written_out_of_order = encode_delta_response("v", CDS, "n", [], ["x"])  # no resources
    assert decode_delta_response(written_out_of_order).names == ()


def _delta_sidecar(nonce_prefix: str, names: list[str]) -> DeltaStream:
    stream = DeltaStream()
    stream.receive_downstream(delta_request(with_node=True))
    receive_upstream(stream, delta_response(names, f"{nonce_prefix}-1"))
    stream.receive_downstream(delta_request(EDS, subscribe=tuple(names)))
    receive_upstream(stream, delta_response(names[:1], f"{nonce_prefix}-2", type_url=EDS))
    return stream


def test_delta_streams_in_step_share_every_map_and_part_when_they_diverge() -> None:
    names = [f"outbound|80||svc-{i}.ns.svc.cluster.local" for i in range(50)]
    a, b = _delta_sidecar("a", names), _delta_sidecar("b", names)
    for type_url in (CDS, EDS):
        sa, sb = a._types[type_url], b._types[type_url]
        assert sa.upstream is sb.upstream and sa.held is sb.held
        assert a.subscription(type_url).names is b.subscription(type_url).names
    assert a.held(CDS) == set(names)
    # b unsubscribes one cluster: its maps are its own now, a's are untouched.
    b.receive_downstream(delta_request(EDS, unsubscribe=(names[0],)))
    assert names[0] not in b.held(EDS) and names[0] in a.held(EDS)
    assert a.subscription(EDS).names is not b.subscription(EDS).names
    assert len(a.subscription(EDS).names) == 50 and len(b.subscription(EDS).names) == 49


def test_delta_stream_reconnecting_with_initial_versions_shares_them() -> None:
    initial = {"x": "", "y": ""}
    streams = [DeltaStream() for _ in range(2)]
    for stream in streams:
        stream.receive_downstream(delta_request(with_node=True, initial=initial))
    assert streams[0]._types[CDS].held is streams[1]._types[CDS].held
    assert streams[0].held(CDS) == {"x", "y"}


def test_sotw_streams_asking_for_the_same_names_share_them() -> None:
    names = tuple(f"outbound|80||svc-{i}.ns.svc.cluster.local" for i in range(50))
    streams = []
    for _ in range(2):
        stream = SotwStream()
        stream.receive_downstream(sotw_request(with_node=True))
        stream.receive_downstream(sotw_request(EDS, names))
        streams.append(stream)
    a, b = (s.subscription(EDS) for s in streams)
    assert a.names == names and a.names is b.names
    assert streams[0]._types[EDS].names_bytes is streams[1]._types[EDS].names_bytes
    stream = streams[0]
    receive_upstream(stream, sotw_response(list(names), "v1", "e-1", EDS))
    more = sotw_request(EDS, (*names, "outbound|80||new.ns.svc.cluster.local"), "v1", "e-1")
    assert len(stream.receive_downstream(more)) == 1  # a changed list is still seen
    assert len(stream.subscription(EDS).names) == 51 and b.names == names


def test_a_shared_map_refuses_to_change() -> None:
    shared = FrozenMap({"a": b"1"})
    for change in (
        lambda: shared.__setitem__("b", b"2"),
        lambda: shared.update(b=b"2"),
        lambda: shared.pop("a"),
        lambda: shared.setdefault("c", b"3"),
        lambda: shared.clear(),
    ):
        with pytest.raises(TypeError, match="shared"):
            change()
    assert shared == {"a": b"1"}


_NAMES = st.sampled_from([f"outbound|80||s{i}.ns.svc.cluster.local" for i in range(6)])
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("subscribe"), st.lists(_NAMES, max_size=3)),
        st.tuples(st.just("unsubscribe"), st.lists(_NAMES, max_size=3)),
        st.tuples(st.just("response"), st.lists(_NAMES, max_size=4), st.lists(_NAMES, max_size=2)),
    ),
    max_size=12,
)


def _anys(names: list[str]) -> dict[str, bytes]:
    response = decode_delta_response(delta_response(names, "model", type_url=EDS))
    return dict(zip(response.names, response.anys, strict=True))


def _model(ops: list) -> tuple[set[str], dict[str, bytes]]:
    """What a stream must hold after `ops`, by plain set and dict arithmetic."""
    subscribed: set[str] = set()
    held: dict[str, bytes] = {}
    for op in ops:
        if op[0] == "subscribe":
            subscribed |= set(op[1])
        elif op[0] == "unsubscribe":
            subscribed -= set(op[1])
            for name in op[1]:
                held.pop(name, None)
        else:
            held.update(_anys(list(dict.fromkeys(op[1]))))
            for name in op[2]:
                held.pop(name, None)
    return subscribed, held


def _drive(stream: DeltaStream, ops: list, nonce_prefix: str) -> None:
    for index, op in enumerate(ops):
        if op[0] == "subscribe":
            stream.receive_downstream(delta_request(EDS, subscribe=tuple(op[1])))
        elif op[0] == "unsubscribe":
            stream.receive_downstream(delta_request(EDS, unsubscribe=tuple(op[1])))
        else:
            names = list(dict.fromkeys(op[1]))
            nonce = f"{nonce_prefix}-{index}"
            receive_upstream(stream, delta_response(names, nonce, tuple(op[2]), EDS))


def _check(stream: DeltaStream, ops: list) -> None:
    subscribed, held = _model(ops)
    assert stream.subscription(EDS)[1] == subscribed
    assert stream.held(EDS) == set(held)
    assert dict(zip(*stream.pushed(EDS), strict=True)) == held
    assert dict(zip(*stream.upstream(EDS), strict=True)) == held


@settings(max_examples=150, deadline=None)
@given(common=_OPS, mine=_OPS, theirs=_OPS)
def test_streams_sharing_state_each_hold_exactly_what_their_own_history_says(
    common: list, mine: list, theirs: list
) -> None:
    """Two streams share a history (the same resources under other nonces: the shared path),
    then diverge: no change of one may leak into the other's state."""
    a, b = DeltaStream(), DeltaStream()
    for stream, prefix in ((a, "a"), (b, "b")):
        stream.receive_downstream(delta_request(EDS, with_node=True))
        _drive(stream, common, prefix)
        _check(stream, common)
    _drive(a, mine, "a2")
    _drive(b, theirs, "b2")
    _check(a, common + mine)
    _check(b, common + theirs)


def test_the_same_resources_with_other_removals_are_another_change() -> None:
    names = ["outbound|80||a.ns.svc.cluster.local", "outbound|80||b.ns.svc.cluster.local"]
    a, b = DeltaStream(), DeltaStream()
    for stream, prefix in ((a, "a"), (b, "b")):
        stream.receive_downstream(delta_request(EDS, with_node=True, subscribe=tuple(names)))
        receive_upstream(stream, delta_response(names, f"{prefix}-1", type_url=EDS))
    assert a._types[EDS].held is b._types[EDS].held
    receive_upstream(a, delta_response([], "a-2", removed=(names[0],), type_url=EDS))
    receive_upstream(b, delta_response([], "b-2", removed=(names[1],), type_url=EDS))
    assert a.held(EDS) == {names[1]} and b.held(EDS) == {names[0]}
