"""Faults around xdsproxy (issue 7, first part): an upstream that dies mid-response, a slow
upstream, one that refuses the stream, an oversized message, the egress down, TLS versions."""

import asyncio
import subprocess
import time

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf.any_pb2 import Any

from tests.helpers import get_json
from tests.xds_messages import sotw_request
from xdsproxy.harness.ads import AdsClient, RecordingUpstream
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import free_port, request_via_sidecar
from xdsproxy.harness.lazymesh import lazy_mesh, sidecar_identity
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import encode_sotw_response

pytestmark = pytest.mark.envoy


def _cds(request: bytes) -> list[bytes]:
    parsed = DiscoveryRequest.FromString(request)
    if parsed.type_url == typeurls.CLUSTER and not parsed.response_nonce:
        bodies = []
        for i in range(3):
            cluster = Cluster(name=f"outbound|80||s{i}.ns.svc.cluster.local", type=Cluster.STATIC)
            cluster.connect_timeout.seconds = 1
            packed = Any()
            packed.Pack(cluster)
            bodies.append(packed.SerializeToString())
        return [encode_sotw_response("v1", typeurls.CLUSTER, "c-1", bodies)]
    return []


async def test_upstream_dying_during_a_60mb_push_leaves_envoy_config_and_proxy_alive() -> None:
    huge = encode_sotw_response(
        "v2",
        typeurls.LISTENER,
        "l-1",
        [
            Any(type_url=typeurls.LISTENER, value=bytes(1 << 20)).SerializeToString()
            for _ in range(60)
        ],
    )
    upstream = RecordingUpstream(
        lambda request: (
            _cds(request)
            or (
                [huge] if typeurls.LISTENER in DiscoveryRequest.FromString(request).type_url else []
            )
        )
    )
    await upstream.start()
    async with running_proxy(upstream.port, debug_listen="127.0.0.1:0") as proxy:
        async with running_envoy(proxy.port) as envoy:
            await eventually(lambda: len(dynamic_config(envoy.config_dump())["clusters"]) == 3)
            # Envoy asks LDS once CDS is in; the 60 MB answer is cut by the upstream's death.
            await eventually(
                lambda: (
                    upstream.requests
                    and any(
                        typeurls.LISTENER in DiscoveryRequest.FromString(r).type_url
                        for r in upstream.requests
                    )
                ),
                timeout=10,
            )
            await upstream.stop()
            await eventually(lambda: len(proxy.proxy.sessions) == 0, timeout=10)
            assert len(dynamic_config(envoy.config_dump())["clusters"]) == 3
            assert envoy.process.poll() is None
            code, _ = await asyncio.to_thread(get_json, proxy.debug.port, "/healthz")
            assert code == 200


async def test_slow_upstream_delays_only_its_stream() -> None:
    class Slow(RecordingUpstream):
        async def _serve(self, _requests, context):
            while (data := await context.read()) is not grpc.aio.EOF:
                for response in _cds(data):
                    await asyncio.sleep(2.0)
                    await context.write(response)

    upstream = Slow(lambda request: [])
    await upstream.start()
    try:
        async with running_proxy(upstream.port, debug_listen="127.0.0.1:0") as proxy:
            client = AdsClient(proxy.port)
            await client.send(sotw_request(with_node=True))
            started = time.monotonic()
            code, _ = await asyncio.to_thread(get_json, proxy.debug.port, "/healthz")
            assert code == 200 and time.monotonic() - started < 2.0, "the loop was blocked"
            response = await client.recv(timeout=10)
            assert b"c-1" in response
            await client.close()
    finally:
        await upstream.stop()


async def test_refused_and_unreachable_upstreams_end_the_stream_with_their_status() -> None:
    class Refusing(RecordingUpstream):
        async def _serve(self, _requests, context):
            await context.read()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "token rejected")

    upstream = Refusing(lambda request: [])
    await upstream.start()
    try:
        async with running_proxy(upstream.port) as proxy:
            client = AdsClient(proxy.port)
            await client.send(sotw_request(with_node=True))
            assert await client.status() == (
                grpc.StatusCode.PERMISSION_DENIED,
                "upstream: token rejected",
            )
            await client.close()
    finally:
        await upstream.stop()
    async with running_proxy(free_port()) as proxy:  # nothing listens upstream
        client = AdsClient(proxy.port)
        await client.send(sotw_request(with_node=True))
        code, _ = await client.status(timeout=30)
        assert code == grpc.StatusCode.UNAVAILABLE
        await client.close()


async def test_oversized_message_is_refused_with_a_clear_error() -> None:
    big = encode_sotw_response(
        "v1",
        typeurls.CLUSTER,
        "c-1",
        [
            Any(type_url=typeurls.CLUSTER, value=bytes(1 << 20)).SerializeToString()
            for _ in range(3)
        ],
    )
    upstream = RecordingUpstream(lambda request: [big])
    await upstream.start()
    try:
        async with running_proxy(upstream.port, max_message_bytes=1 << 20) as proxy:
            client = AdsClient(proxy.port)
            await client.send(sotw_request(with_node=True))
            code, details = await client.status(timeout=30)
            assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            assert "larger than max" in details
            await client.close()
            healthy = AdsClient(proxy.port)  # the process carries on
            await healthy.send(sotw_request(with_node=True))
            await healthy.close()
    finally:
        await upstream.stop()


async def test_egress_down_fails_fast_with_503() -> None:
    async with lazy_mesh(delta=False) as mesh:
        identity = sidecar_identity("app-0", "127.0.0.2")
        await mesh.add_sidecar(identity, delta=False)
        await asyncio.to_thread(mesh.egress.stop)
        reply = await asyncio.to_thread(
            request_via_sidecar,
            identity.proxy_config["proxyListenPort"],
            ("10.96.0.13", mesh.port),
            "svc-3.ns-1.svc.cluster.local",
            "127.0.0.2",
        )  # bounded by the client's own 10 s timeout: a hang would raise
        assert reply.status == 503
        assert len(mesh.proxy.proxy.sessions) == 1  # the sidecar's stream is untouched


@pytest.mark.parametrize(("version", "accepted"), [("-tls1_1", False), ("-tls1_2", True)])
async def test_tls_below_1_2_is_refused(pki, version: str, accepted: bool) -> None:
    async with running_proxy(free_port(), cert=pki["cert"], key=pki["key"]) as proxy:
        result = await asyncio.to_thread(
            subprocess.run,
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{proxy.port}",
                version,
                "-alpn",
                "h2",
                "-servername",
                "xdsproxy.istio-system.svc",
            ],
            input=b"",
            capture_output=True,
            timeout=30,
        )
        output = result.stdout.decode("latin-1")
        handshake = "Cipher is (NONE)" not in output and result.returncode == 0
        assert handshake is accepted, output[-500:] + result.stderr.decode("latin-1")[-500:]
