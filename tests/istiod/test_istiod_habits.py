"""How Istiod answers, checked on Istio's own Istiod, and the simulator held to the same
answers (`xdsproxy/sim`; docs/sim.md lists where they still differ). Raw requests over real
gRPC, as Envoy sends them."""

import asyncio
from contextlib import asynccontextmanager

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from tests.helpers import ISTIOD_MESH, istio_sidecar_node
from xdsproxy.harness.ads import AdsClient
from xdsproxy.harness.istiod import IstiodProcess
from xdsproxy.harness.stack import running_sim
from xdsproxy.sim.mesh import generate
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import decode_sotw_response
from xdsproxy.xds.ordering import is_eds_cluster

pytestmark = pytest.mark.istiod
CDS, EDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE


@asynccontextmanager
async def upstream(kind: str):
    """The ADS port of Istio's Istiod or of the simulator."""
    if kind == "istiod":
        process = await asyncio.to_thread(IstiodProcess(ISTIOD_MESH).start)
        try:
            yield process.ads_port
        finally:
            await asyncio.to_thread(process.stop)
    else:
        async with running_sim(generate(20)) as sim:
            yield sim.port


def _request(type_url: str, names=(), nonce: str = "", version: str = "", node=None) -> bytes:
    request = DiscoveryRequest(
        type_url=type_url, resource_names=names, response_nonce=nonce, version_info=version
    )
    if node is not None:
        request.node.CopyFrom(node)
    return request.SerializeToString()


class Reader:
    """Reads a stream without cancelling it: a timed-out read stays pending for the next
    (cancelling a read cancels a gRPC call)."""

    def __init__(self, client: AdsClient) -> None:
        self.client = client
        self.pending: asyncio.Future | None = None

    async def recv(self, timeout: float = 10.0):
        if self.pending is None:
            self.pending = asyncio.ensure_future(self.client.call.read())
        done, _ = await asyncio.wait({self.pending}, timeout=timeout)
        if not done:
            return None
        data, self.pending = self.pending.result(), None
        return decode_sotw_response(data)


@asynccontextmanager
async def sidecar_stream(port: int):
    """A SotW stream as a sidecar opens it: its CDS asked and answered."""
    client = AdsClient(port)
    reader = Reader(client)
    try:
        await client.send(_request(CDS, node=istio_sidecar_node("default", "app", "10.244.0.5")))
        yield client, reader, await reader.recv()
    finally:
        await client.close()


@pytest.fixture(params=["istiod", "sim"])
def kind(request) -> str:
    return request.param


async def test_a_sotw_eds_subscription_change_is_answered_with_the_new_assignments_only(
    kind: str,
) -> None:
    async with upstream(kind) as port, sidecar_stream(port) as (client, reader, clusters):
        eds = [n for n, b in zip(clusters.names, clusters.bodies, strict=True) if is_eds_cluster(b)]
        first, second = eds[0], eds[1]
        await client.send(_request(CDS, nonce=clusters.nonce, version=clusters.version))
        await client.send(_request(EDS, (first,)))
        answer = await reader.recv()
        assert answer.names == (first,)
        await client.send(_request(EDS, (first, second), answer.nonce, answer.version))
        answer = await reader.recv()
        assert answer.names == (second,)
        # A change that only removes names is not answered at all.
        await client.send(_request(EDS, (second,), answer.nonce, answer.version))
        assert await reader.recv(1.0) is None


async def test_a_sotw_request_naming_nothing_of_a_type_that_is_no_wildcard_is_never_answered(
    kind: str,
) -> None:
    async with upstream(kind) as port, sidecar_stream(port) as (client, reader, _):
        await client.send(_request(RDS, ()))
        assert await reader.recv(1.0) is None
        # The stream is alive: a request that names a table is answered.
        await client.send(_request(RDS, ("80",)))
        assert (await reader.recv()).names == ("80",)
