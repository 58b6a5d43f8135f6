"""The warm-wait bound (docs/protocol.md R13) runs from each hold's own start: the proxy's timer
follows the oldest hold of Istiod's config, and a hold that ended takes its timer with it.
Driven through the real `AdsProxy` apply path and `Session`, with a real `SotwStream`, on the
event loop's clock; the bound is shortened to 0.5 s so that the test is quick."""

import asyncio

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse

from tests.xds_messages import KeepPrefix, sotw_request, sotw_response
from xdsproxy.server import ads
from xdsproxy.server.ads import AdsProxy, Session
from xdsproxy.server.upstream import Upstream
from xdsproxy.wire import typeurls
from xdsproxy.xds.sotw import SotwStream

CDS, EDS, LDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER
BOUND = 0.5


class _Sidecar:
    """One stream through the proxy's apply path; what it queued for Envoy, by type and nonce."""

    def __init__(self) -> None:
        self.proxy = AdsProxy(Upstream("127.0.0.1:1"))  # never dialled
        self.stream = SotwStream(KeepPrefix("svc-", cds_follows_lds=True, narrows=frozenset({CDS})))
        self.session = Session(1, "SotW", "test", self.stream, self.proxy._apply)
        self.proxy.sessions[self.session.id] = self.session

    def feed(self, events) -> None:
        self.proxy._apply(self.session, events)

    def pushed(self) -> list[tuple[str, str]]:
        out = []
        while not self.session.outbox.empty():
            payload, _, _ = self.session.outbox.get_nowait()
            head = DiscoveryResponse.FromString(payload)
            out.append((head.type_url, head.nonce))
        while not self.session.upstream_outbox.empty():
            self.session.upstream_outbox.get_nowait()
        return out

    def ack(self, type_url: str, nonce: str, names=()) -> None:
        self.feed(self.stream.receive_downstream(sotw_request(type_url, names, "x", nonce)))

    def upstream(self, names: list[str], nonce: str, type_url: str = CDS) -> None:
        self.feed(self.stream.receive_upstream(sotw_response(names, "v", nonce, type_url)))

    def cds_nonce(self) -> str:
        return self.stream.status()[CDS].pushed_nonce


@pytest.fixture
def bound():
    before = ads.WARM_WAIT_SECONDS
    ads.WARM_WAIT_SECONDS = BOUND
    yield BOUND
    ads.WARM_WAIT_SECONDS = before


async def test_a_late_hold_waits_the_full_bound_from_its_own_start(bound: float) -> None:
    """N2: an earlier hold's timer must not release a hold that started just before it fires."""
    sidecar = _Sidecar()
    sidecar.feed(sidecar.stream.receive_downstream(sotw_request(CDS, with_node=True)))
    sidecar.feed(sidecar.stream.receive_downstream(sotw_request(LDS)))
    sidecar.upstream(["svc-1", "a", "b", "c"], "c1")
    sidecar.upstream(["needs:a"], "l1", LDS)
    sidecar.ack(CDS, sidecar.cds_nonce())
    sidecar.ack(LDS, "l1")
    sidecar.feed(sidecar.stream.receive_downstream(sotw_request(EDS, ("a",))))
    sidecar.upstream(["a"], "e1", EDS)
    sidecar.ack(EDS, "e1", ("a",))
    sidecar.pushed()

    # The listener moves to b (cold): held, and the timer armed for it.
    sidecar.upstream(["needs:b"], "l2", LDS)
    sidecar.ack(CDS, sidecar.cds_nonce())
    assert sidecar.session.release_timer is not None
    await asyncio.sleep(bound / 5)
    # b warms: the listener goes out, and its timer goes with the hold.
    sidecar.ack(EDS, "e1", ("a", "b"))
    sidecar.upstream(["a", "b"], "e2", EDS)
    sidecar.ack(EDS, "e2", ("a", "b"))
    assert (LDS, "l2") in sidecar.pushed()
    sidecar.ack(LDS, "l2")
    assert sidecar.session.release_timer is None

    # Just before the first hold's bound would have passed, the listener moves to c (cold).
    await asyncio.sleep(bound * 0.7)
    sidecar.upstream(["needs:c"], "l3", LDS)
    sidecar.ack(CDS, sidecar.cds_nonce())
    assert sidecar.stream.held_back()
    await asyncio.sleep(bound / 2)  # past the first hold's bound, not the second's
    assert (LDS, "l3") not in sidecar.pushed() and sidecar.stream.held_back()
    await asyncio.sleep(bound)  # past the second's: Istiod's config goes out cold
    assert (LDS, "l3") in sidecar.pushed() and not sidecar.stream.held_back()
    assert sidecar.session.release_timer is None
