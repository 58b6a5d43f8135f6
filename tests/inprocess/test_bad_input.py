"""Bad input on the downstream side never kills xdsproxy nor touches other streams."""

import asyncio
import contextlib
import logging

import grpc
import pytest
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf.any_pb2 import Any

from tests.xds_messages import delta_request, sotw_request
from xdsproxy.harness.ads import AdsClient, RecordingUpstream
from xdsproxy.harness.stack import eventually, running_proxy, running_sim
from xdsproxy.sim.mesh import generate
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import decode_delta_response, decode_sotw_response, encode_sotw_response


async def _healthy_client(port: int) -> AdsClient:
    """A well-behaved SotW client that has received its CDS."""
    client = AdsClient(port)
    await client.send(sotw_request(with_node=True))
    response = decode_sotw_response(await client.recv())
    assert response.names
    await client.send(sotw_request(version=response.version, nonce=response.nonce))
    return client


async def _still_served(sim, client: AdsClient) -> None:
    sim.push()
    response = decode_sotw_response(await client.recv())
    assert response.type_url == typeurls.CLUSTER and response.names


async def test_garbage_bytes_get_invalid_argument_others_unaffected() -> None:
    async with running_sim(generate(20)) as sim, running_proxy(sim.port) as proxy:
        good = await _healthy_client(proxy.port)
        for delta in (False, True):
            bad = AdsClient(proxy.port, delta=delta)
            await bad.send(b"\xff\xfe\xfd garbage")
            code, details = await bad.status()
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in details
            await bad.close()
        await _still_served(sim, good)
        await good.close()


async def test_garbage_after_a_good_start_ends_only_that_stream() -> None:
    async with running_sim(generate(20)) as sim, running_proxy(sim.port) as proxy:
        good = await _healthy_client(proxy.port)
        bad = await _healthy_client(proxy.port)
        await bad.send(b"\x12\xff\xff")
        code, _ = await bad.status()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        await _still_served(sim, good)
        assert len(proxy.proxy.sessions) == 1
        await good.close()


async def test_missing_node_is_invalid_argument() -> None:
    async with running_sim(generate(5)) as sim, running_proxy(sim.port) as proxy:
        for delta, request in ((False, sotw_request()), (True, delta_request())):
            client = AdsClient(proxy.port, delta=delta)
            await client.send(request)
            code, details = await client.status()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "node" in details
            await client.close()


async def test_non_istio_node_id_is_judged_by_istiod_and_relayed() -> None:
    async with running_sim(generate(5)) as sim, running_proxy(sim.port) as proxy:
        request = DiscoveryRequest(type_url=typeurls.CLUSTER)
        request.node.id = "my-envoy"
        client = AdsClient(proxy.port)
        await client.send(request.SerializeToString())
        code, details = await client.status()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "my-envoy" in details and "TYPE~IP" in details
        await client.close()
        good = await _healthy_client(proxy.port)
        await good.close()


async def test_unknown_type_url_passes_both_ways() -> None:
    url = "type.googleapis.com/istio.networking.nds.v1.NameTable"
    opaque = Any(type_url=url, value=b"\x0a\x03abc\xff").SerializeToString()

    def respond(data: bytes) -> list[bytes]:
        request = DiscoveryRequest.FromString(data)
        if request.type_url == url and not request.response_nonce:
            return [encode_sotw_response("v1", url, "nds-1", [opaque])]
        return []

    upstream = RecordingUpstream(respond)
    await upstream.start()
    try:
        async with running_proxy(upstream.port) as proxy:
            client = AdsClient(proxy.port)
            first = sotw_request(url, with_node=True)
            await client.send(first)
            response = decode_sotw_response(await client.recv())
            assert response.bodies == (opaque,) and response.nonce == "nds-1"
            assert upstream.requests[0] == first
            await client.close()
    finally:
        await upstream.stop()


async def test_fifty_megabyte_response_passes() -> None:
    url = "type.googleapis.com/example.Blob"
    bodies = [
        Any(type_url=url, value=bytes([i]) * (1 << 20)).SerializeToString() for i in range(50)
    ]
    big = encode_sotw_response("v1", url, "big-1", bodies)
    assert len(big) > 50 * (1 << 20)
    upstream = RecordingUpstream(lambda data: [big] if b"example.Blob" in data else [])
    await upstream.start()
    try:
        async with running_proxy(upstream.port) as proxy:
            client = AdsClient(proxy.port)
            await client.send(sotw_request(url, with_node=True))
            assert await client.recv(timeout=60) == big
            await client.close()
    finally:
        await upstream.stop()


async def test_metadata_is_forwarded_and_token_never_logged(caplog) -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.secret-token-value.sig"
    upstream = RecordingUpstream(lambda data: [])
    await upstream.start()
    caplog.set_level(logging.DEBUG)
    try:
        async with running_proxy(upstream.port) as proxy:
            client = AdsClient(
                proxy.port,
                metadata=(
                    ("authorization", f"Bearer {token}"),
                    ("clusterid", "Kubernetes"),
                    ("x-xds-header", "yes"),
                    ("cookie", "no"),
                ),
            )
            await client.send(sotw_request(with_node=True))
            await eventually(lambda: upstream.metadata, timeout=10)
            seen = upstream.metadata[0]
            assert seen["authorization"] == f"Bearer {token}"
            assert seen["clusterid"] == "Kubernetes"
            assert seen["x-xds-header"] == "yes"
            assert "cookie" not in seen
            await client.close()
    finally:
        await upstream.stop()
    assert token not in caplog.text
    assert "secret-token-value" not in caplog.text


@pytest.mark.parametrize("resumes", [True, False], ids=["resumes-reading", "never-reads"])
async def test_slow_reader_is_cut_off_with_resource_exhausted_others_unaffected(
    resumes: bool, caplog
) -> None:
    async with (
        running_sim(generate(1000)) as sim,
        # No backpressure here, so that responses pile up to the cap (see the next test).
        running_proxy(
            sim.port, max_pending_bytes=2 * 1024 * 1024, pause_upstream_bytes=1 << 40
        ) as proxy,
    ):
        proxy.proxy.limits.final_write_seconds = 30.0 if resumes else 1.0
        good = await _healthy_client(proxy.port)
        # A small receive window so that unread responses back up inside xdsproxy.
        stuck = AdsClient(
            proxy.port, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        )
        await stuck.send(sotw_request(with_node=True))
        await eventually(lambda: len(proxy.proxy.sessions) == 2, timeout=10)
        for _ in range(12):
            sim.push()
            await asyncio.sleep(0.05)
            response = decode_sotw_response(await good.recv())
            await good.send(sotw_request(version=response.version, nonce=response.nonce))
        await eventually(lambda: len(proxy.proxy.sessions) == 1, timeout=20)
        await _still_served(sim, good)
        if resumes:
            # The status waits behind the message gRPC is sending: a reader that resumes gets
            # that, then RESOURCE_EXHAUSTED with the reason.
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await asyncio.wait_for(stuck.call.read(), 20) is not grpc.aio.EOF:
                    pass
            code, details = await stuck.status()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "slow reader" in details
        else:
            # One that never reads cannot get a status; after the bound the stream is let go
            # quietly, with no error from gRPC's core in the log.
            await asyncio.sleep(proxy.proxy.limits.final_write_seconds + 1)
            await _still_served(sim, good)
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        await stuck.close()
        await good.close()


async def test_backpressure_holds_a_slow_readers_pushes_upstream_not_in_memory() -> None:
    async with running_sim(generate(1000)) as sim, running_proxy(sim.port) as proxy:
        good = await _healthy_client(proxy.port)
        stuck = AdsClient(
            proxy.port, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        )
        await stuck.send(sotw_request(with_node=True))
        await eventually(lambda: len(proxy.proxy.sessions) == 2, timeout=10)
        largest = 0
        for _ in range(12):
            sim.push()
            await asyncio.sleep(0.05)
            response = decode_sotw_response(await good.recv())
            await good.send(sotw_request(version=response.version, nonce=response.nonce))
            largest = max(largest, max(s.pending_bytes for s in proxy.proxy.sessions.values()))
        # Twelve full pushes went out; the stuck stream never held more than one response
        # beyond the pause threshold, and it is still served, not cut off.
        pause, one_cds_response = 1024 * 1024, 500 * 1024  # the default, and N = 1,000
        assert proxy.proxy.limits.pause_upstream_bytes == pause
        assert 0 < largest <= pause + one_cds_response
        assert len(proxy.proxy.sessions) == 2
        await _still_served(sim, good)
        # Once it reads again it catches up, to the newest version.
        versions = []
        while (data := await stuck.recv(timeout=20)) is not None:
            versions.append(decode_sotw_response(data).version)
            if versions[-1] == sim.snapshot.version:
                break
        assert versions[-1] == sim.snapshot.version
        await stuck.close()
        await good.close()


async def test_delta_subscription_round_trip_through_real_grpc() -> None:
    async with running_sim(generate(20)) as sim, running_proxy(sim.port) as proxy:
        client = AdsClient(proxy.port, delta=True)
        await client.send(delta_request(with_node=True))
        cds = decode_delta_response(await client.recv())
        assert "PassthroughCluster" in cds.names
        await client.send(delta_request(nonce=cds.nonce))
        name = next(n for n in cds.names if n.startswith("outbound|80||svc-0"))
        await client.send(delta_request(typeurls.ENDPOINT, subscribe=(name,)))
        eds = decode_delta_response(await client.recv())
        assert eds.names == (name,)
        await client.close()
