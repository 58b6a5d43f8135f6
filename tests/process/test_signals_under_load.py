"""SIGTERM and SIGKILL of a real `xdsproxy serve` while it carries load: SotW and Delta clients
from the load generator, endpoint churn pushed by the simulator, and bare ADS streams whose end
status is checked."""

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.xds_messages import sotw_request
from xdsproxy.harness.ads import AdsClient
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import running_sim
from xdsproxy.sim.mesh import Endpoint, generate
from xdsproxy.sim.server import SimServer

# Runs xdsproxy, kubectl or Envoy as child processes: not in `make test-fast`.
pytestmark = pytest.mark.process

CLIENTS = 30  # per load generator; one SotW, one Delta


async def _churn(sim: SimServer, rate: float = 5.0) -> None:
    fqdns = [s.fqdn for s in sim.mesh.services.values() if s.kind == "eds"]
    n = 0
    while True:
        n += 1
        fqdn, address = random.choice(fqdns), f"10.201.{n // 250 % 250}.{n % 250 + 1}"
        sim.mutate(lambda m, f=fqdn, a=address: m.set_endpoints(f, [Endpoint(a, 80)]))
        await asyncio.sleep(1 / rate)


def _loadgen(port: int, delta: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "xdsproxy.harness.loadgen", "--target", f"127.0.0.1:{port}",
            "--clients", str(CLIENTS), "--reconnect", *(["--delta"] if delta else []),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip


async def _ready(loadgen: subprocess.Popen[str], timeout: float = 90) -> None:
    """Until the load generator says every one of its clients is in sync (again)."""
    assert loadgen.stdout is not None

    async def scan() -> None:
        while line := await asyncio.to_thread(loadgen.stdout.readline):
            if line.startswith("ready"):
                return
        raise AssertionError("the load generator ended")

    await asyncio.wait_for(scan(), timeout)


async def _ended(client: AdsClient) -> tuple[grpc.StatusCode, str]:
    """Read (so flow control never holds the status back) until the stream ends."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await asyncio.wait_for(client.call.read(), 60) is not grpc.aio.EOF:
            pass
    return await client.status()


@contextlib.asynccontextmanager
async def _loaded_proxy() -> AsyncIterator[tuple[SimServer, ProxyProcess, list]]:
    async with running_sim(generate(50)) as sim:
        proxy = ProxyProcess("--upstream", f"127.0.0.1:{sim.port}", "--upstream-plaintext")
        await asyncio.to_thread(proxy.start)
        loadgens = [_loadgen(proxy.port, delta) for delta in (False, True)]
        churn = asyncio.create_task(_churn(sim))
        try:
            for loadgen in loadgens:
                await _ready(loadgen)
            yield sim, proxy, loadgens
        finally:
            churn.cancel()
            for loadgen in loadgens:
                loadgen.kill()
                loadgen.wait(10)
            proxy.stop()


async def test_sigterm_under_load_ends_every_stream_unavailable_and_exits_cleanly() -> None:
    async with _loaded_proxy() as (_, proxy, _):
        clients = [AdsClient(proxy.port) for _ in range(10)]
        for client in clients:
            await client.send(sotw_request(with_node=True))
            await client.recv()
        ends = [asyncio.create_task(_ended(client)) for client in clients]
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        for code, details in await asyncio.gather(*ends):
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        assert await asyncio.to_thread(proxy.process.wait, 20) == 0
        assert "Traceback" not in proxy.log.read_text()
        for client in clients:
            await client.close()


async def test_sigkill_under_load_then_restart_resyncs_every_client() -> None:
    async with _loaded_proxy() as (sim, proxy, loadgens):
        served = sim.connections_served
        await asyncio.to_thread(proxy.kill)
        await asyncio.to_thread(proxy.start)
        for loadgen in loadgens:
            await _ready(loadgen)  # all SotW and all Delta clients in sync again
        # Each client's reconnection opened a new upstream stream of its own.
        assert sim.connections_served >= served + 2 * CLIENTS
        assert "Traceback" not in proxy.log.read_text()
