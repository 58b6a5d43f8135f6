"""Make before break on the pure SotW and Delta machines (docs/protocol.md): a listener that
starts naming a cluster waits until Envoy has warmed it (CDS and its EDS ACKed), and the
cluster it stops naming leaves CDS only after Envoy ACKed the listener without it. Driven with
bytes through a retarget (`needs:a` becomes `needs:b`), the shape of a VirtualService moving a
route to another service."""

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse

from tests.xds_messages import (
    KeepPrefix,
    delta_request,
    delta_response,
    receive_upstream,
    sotw_request,
    sotw_response,
)
from xdsproxy.wire import lean, typeurls
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import SendDownstream, SendUpstream
from xdsproxy.xds.sotw import SotwStream

CDS, EDS, LDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER


def _pushed(events) -> dict[str, SendDownstream]:
    return {e.type_url: e for e in events if isinstance(e, SendDownstream)}


def _sotw(event: SendDownstream) -> tuple[str, list[str]]:
    head = lean.SotwResponse.FromString(event.payload)
    return head.nonce, [r.value.name for r in lean.SotwNames.FromString(event.payload).resources]


def test_sotw_retarget_adds_first_moves_when_warm_removes_last() -> None:
    stream = SotwStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
    stream.receive_downstream(sotw_request(CDS, with_node=True))
    stream.receive_downstream(sotw_request(LDS))
    receive_upstream(stream, sotw_response(["svc-1", "a", "b"], "v1", "c1"))
    pushed = _pushed(receive_upstream(stream, sotw_response(["needs:a"], "v1", "l1", LDS)))
    assert _sotw(pushed[CDS])[1] == ["svc-1", "a"]
    stream.receive_downstream(sotw_request(CDS, version="v1", nonce="c1"))
    stream.receive_downstream(sotw_request(LDS, version="v1", nonce="l1"))
    stream.receive_downstream(sotw_request(EDS, ("a",)))
    receive_upstream(stream, sotw_response(["a"], "v1", "e1", EDS))
    stream.receive_downstream(sotw_request(EDS, ("a",), version="v1", nonce="e1"))

    # The listener moves to b: b is added, a kept, the listener waits for b to warm.
    pushed = _pushed(receive_upstream(stream, sotw_response(["needs:b"], "v2", "l2", LDS)))
    assert list(pushed) == [CDS]
    cds_nonce, names = _sotw(pushed[CDS])
    assert sorted(names) == ["a", "b", "svc-1"]
    assert not _pushed(stream.receive_downstream(sotw_request(CDS, version="x", nonce=cds_nonce)))
    stream.receive_downstream(sotw_request(EDS, ("a", "b"), version="v1", nonce="e1"))
    receive_upstream(stream, sotw_response(["a", "b"], "v2", "e2", EDS))
    # b's endpoints ACKed: the listener goes out, relayed with Istiod's nonce.
    events = stream.receive_downstream(sotw_request(EDS, ("a", "b"), version="v2", nonce="e2"))
    pushed = _pushed(events)
    assert list(pushed) == [LDS] and _sotw(pushed[LDS]) == ("l2", ["needs:b"])
    # Envoy ACKs the listener: now, and only now, a leaves CDS.
    events = stream.receive_downstream(sotw_request(LDS, version="v2", nonce="l2"))
    assert SendUpstream(sotw_request(LDS, version="v2", nonce="l2")) in events
    assert sorted(_sotw(_pushed(events)[CDS])[1]) == ["b", "svc-1"]


def _delta(event: SendDownstream) -> DeltaDiscoveryResponse:
    return DeltaDiscoveryResponse.FromString(event.payload)


def test_delta_retarget_adds_first_moves_when_warm_removes_last() -> None:
    stream = DeltaStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
    stream.receive_downstream(delta_request(CDS, with_node=True))
    stream.receive_downstream(delta_request(LDS))
    receive_upstream(stream, delta_response(["svc-1", "a", "b"], "c1"))
    receive_upstream(stream, delta_response(["needs:a"], "l1", type_url=LDS))
    stream.receive_downstream(delta_request(CDS, nonce="c1"))
    stream.receive_downstream(delta_request(LDS, nonce="l1"))
    stream.receive_downstream(delta_request(EDS, subscribe=("a",)))
    receive_upstream(stream, delta_response(["a"], "e1", type_url=EDS))
    stream.receive_downstream(delta_request(EDS, nonce="e1"))

    retarget = delta_response(["needs:b"], "l2", removed=("needs:a",), type_url=LDS)
    pushed = _pushed(receive_upstream(stream, retarget))
    assert list(pushed) == [CDS]
    cds = _delta(pushed[CDS])
    assert [r.name for r in cds.resources] == ["b"] and not cds.removed_resources
    assert not _pushed(stream.receive_downstream(delta_request(CDS, nonce=cds.nonce)))
    stream.receive_downstream(delta_request(EDS, subscribe=("b",)))
    receive_upstream(stream, delta_response(["b"], "e2", type_url=EDS))
    pushed = _pushed(stream.receive_downstream(delta_request(EDS, nonce="e2")))
    assert list(pushed) == [LDS] and _delta(pushed[LDS]).nonce == "l2"
    pushed = _pushed(stream.receive_downstream(delta_request(LDS, nonce="l2")))
    assert list(_delta(pushed[CDS]).removed_resources) == ["a"]


def test_a_cluster_that_never_warms_is_released_by_the_caller() -> None:
    """The shell calls `release` after a bounded wait: an EDS answer that never comes must
    not hold the listener back for ever."""
    stream = SotwStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
    stream.receive_downstream(sotw_request(CDS, with_node=True))
    stream.receive_downstream(sotw_request(LDS))
    receive_upstream(stream, sotw_response(["svc-1", "a", "b"], "v1", "c1"))
    receive_upstream(stream, sotw_response(["needs:a"], "v1", "l1", LDS))
    stream.receive_downstream(sotw_request(CDS, version="v1", nonce="c1"))
    stream.receive_downstream(sotw_request(LDS, version="v1", nonce="l1"))
    receive_upstream(stream, sotw_response(["needs:b"], "v2", "l2", LDS))
    assert stream.held_back()
    pushed = _pushed(stream.release())
    assert _sotw(pushed[LDS]) == ("l2", ["needs:b"])
    assert not stream.held_back()
