"""The ADS server loop (`server.ads.AdsProxy`) against mock streams, after go-control-plane's
`mockStream`: Envoy's side is a servicer context and Istiod's a call, each a queue of messages
in and a list of messages out, with no socket. The loop's own rules are checked here; the
protocol decisions are the state machines' (tests/unit/test_xds_*.py)."""

import asyncio
from contextlib import asynccontextmanager

import grpc
import pytest

from tests.xds_messages import sotw_request, sotw_response
from xdsproxy.server.ads import AdsProxy
from xdsproxy.server.grpcio import SOTW_METHOD, method_path
from xdsproxy.server.upstream import Channels, Upstream
from xdsproxy.wire import typeurls

CDS = typeurls.CLUSTER


class _Aborted(Exception):
    """What `ServicerContext.abort` raises in gRPC: the handler ends there."""


class MockEnvoy:
    """The downstream side: a servicer context."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue = asyncio.Queue()
        self.received: list[bytes] = []
        self.status: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def invocation_metadata(self):
        return (("authorization", "Bearer token"), ("x-custom", "kept"), ("other", "dropped"))

    async def read(self):
        return await self.requests.get()

    async def write(self, message: bytes) -> None:
        self.received.append(message)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted(details)


class MockIstiod:
    """The upstream side: a stream-stream call whose writes take a moment, as a real one does
    while the message goes out; it counts writes in flight at once."""

    def __init__(self) -> None:
        self.responses: asyncio.Queue = asyncio.Queue()
        self.received: list[bytes] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.cancelled = False
        self.metadata: tuple = ()

    async def read(self):
        return await self.responses.get()

    async def write(self, message: bytes) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        self.received.append(message)

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class MockChannels(Channels):
    """Hands out one channel whose only stream is `istiod`."""

    def __init__(self, istiod: MockIstiod) -> None:
        super().__init__(Upstream("mock"))
        self.istiod = istiod
        self.paths: list[str] = []

    @asynccontextmanager
    async def lease(self):
        yield self

    def stream_stream(self, path: str):
        self.paths.append(path)

        def open_call(metadata):
            self.istiod.metadata = metadata
            return self.istiod

        return open_call


async def _until(check, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.005)


async def _serve() -> tuple[AdsProxy, MockEnvoy, MockIstiod, MockChannels, asyncio.Task]:
    istiod = MockIstiod()
    channels = MockChannels(istiod)
    proxy = AdsProxy(channels)
    envoy = MockEnvoy()
    task = asyncio.create_task(proxy.sotw(None, envoy))
    return proxy, envoy, istiod, channels, task


async def test_a_stream_relays_both_ways_byte_for_byte_and_ends_with_envoy() -> None:
    proxy, envoy, istiod, channels, task = await _serve()
    first = sotw_request(CDS, with_node=True)
    envoy.requests.put_nowait(first)
    await _until(lambda: istiod.received == [first])
    assert channels.paths == [method_path(SOTW_METHOD)]
    # The sidecar's credentials and x- headers go up; nothing else (docs/protocol.md R20).
    assert istiod.metadata == (("authorization", "Bearer token"), ("x-custom", "kept"))
    assert [s.node_id for s in proxy.sessions.values()] == [
        "sidecar~10.0.0.1~app-7d9f8c6b5d-abcde.ns-0~ns-0.svc.cluster.local"
    ]

    response = sotw_response(["a", "b"], "v1", "n1")
    istiod.responses.put_nowait(response)
    await _until(lambda: envoy.received == [response])
    ack = sotw_request(CDS, version="v1", nonce="n1")
    envoy.requests.put_nowait(ack)
    await _until(lambda: istiod.received == [first, ack])

    envoy.requests.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(task, 5)
    assert envoy.status is None  # ended OK: no abort
    assert istiod.cancelled and proxy.sessions == {}


async def test_one_writer_per_upstream_call_whatever_both_readers_send() -> None:
    """docs/protocol.md R19: Envoy's answers and xdsproxy's own messages for Istiod queue for
    one writer; a second write while one is in flight would end the stream in gRPC."""
    _, envoy, istiod, _, task = await _serve()
    envoy.requests.put_nowait(sotw_request(CDS, with_node=True))
    for n in range(20):
        envoy.requests.put_nowait(sotw_request(typeurls.LISTENER if n % 2 else CDS, ("x",)))
    await _until(lambda: len(istiod.received) == 21)
    assert istiod.most_in_flight == 1
    envoy.requests.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(task, 5)


async def test_a_first_request_without_a_node_is_refused_and_istiod_never_called() -> None:
    _, envoy, istiod, channels, task = await _serve()
    envoy.requests.put_nowait(sotw_request(CDS))
    with pytest.raises(_Aborted):
        await asyncio.wait_for(task, 5)
    assert envoy.status[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert channels.paths == [] and istiod.received == []


async def test_istiod_ending_the_stream_ends_envoys_with_unavailable() -> None:
    """Envoy keeps its config and reconnects, as when Istiod itself goes away."""
    proxy, envoy, istiod, _, task = await _serve()
    envoy.requests.put_nowait(sotw_request(CDS, with_node=True))
    await _until(lambda: istiod.received)
    istiod.responses.put_nowait(grpc.aio.EOF)
    with pytest.raises(_Aborted):
        await asyncio.wait_for(task, 5)
    assert envoy.status[0] == grpc.StatusCode.UNAVAILABLE
    assert proxy.sessions == {}


async def test_a_full_upstream_outbox_pauses_reading_envoy_and_loses_nothing() -> None:
    """docs/protocol.md R30: while more than `pause_requests_bytes` waits for Istiod, Envoy's
    requests are not read; once Istiod takes them, every one goes up, in order."""
    proxy, envoy, istiod, _, task = await _serve()
    proxy.limits.pause_requests_bytes = 2000
    gate = asyncio.Event()
    write = istiod.write

    async def slow_write(message: bytes) -> None:
        await gate.wait()  # Istiod is not reading
        await write(message)

    istiod.write = slow_write
    requests = [sotw_request(CDS, with_node=True)] + [
        sotw_request(typeurls.ENDPOINT, (f"outbound|80||svc-{n}.ns-0.svc.cluster.local",) * 10)
        for n in range(60)
    ]
    for request in requests:
        envoy.requests.put_nowait(request)
    await _until(lambda: proxy.metrics.value("xdsproxy_upstream_outbox_pauses_total") == 1)
    await asyncio.sleep(0.05)
    assert envoy.requests.qsize() > 0, "Envoy's requests are still read"
    queued = proxy.metrics.value("xdsproxy_upstream_outbox_bytes")
    assert 2000 < queued < 2000 + max(map(len, requests))
    gate.set()
    await _until(lambda: len(istiod.received) == len(requests))
    assert istiod.received == requests
    assert proxy.metrics.value("xdsproxy_upstream_outbox_bytes") == 0
    envoy.requests.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(task, 5)
