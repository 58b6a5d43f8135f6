"""`--upstream-connections N`: the sidecars' streams share N connections to Istiod, each still
a stream of its own with its own token and cluster id."""

import pytest

from tests.xds_messages import sotw_request
from xdsproxy.harness.ads import AdsClient, RecordingUpstream
from xdsproxy.harness.stack import eventually, running_proxy
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import decode_sotw_response, encode_sotw_response


def _answer(data: bytes) -> list[bytes]:
    return [encode_sotw_response("v1", typeurls.CLUSTER, "n1", [])]


@pytest.mark.parametrize(("connections", "expected"), [(0, 6), (2, 2)])
async def test_streams_stay_separate_over_shared_connections(
    connections: int, expected: int
) -> None:
    upstream = RecordingUpstream(_answer)
    await upstream.start()
    try:
        async with running_proxy(upstream.port, upstream_connections=connections) as proxy:
            clients = [
                AdsClient(proxy.port, metadata=(("authorization", f"Bearer token-{i}"),))
                for i in range(6)
            ]
            for client in clients:
                await client.send(sotw_request(with_node=True))
                assert decode_sotw_response(await client.recv()).version == "v1"
            assert len(upstream.metadata) == 6  # a stream per sidecar, whatever the pool
            assert sorted(m["authorization"] for m in upstream.metadata) == [
                f"Bearer token-{i}" for i in range(6)
            ]
            assert len(set(upstream.peers)) == expected
            for client in clients:
                await client.close()
            await eventually(lambda: not proxy.proxy.sessions, timeout=10)
    finally:
        await upstream.stop()
