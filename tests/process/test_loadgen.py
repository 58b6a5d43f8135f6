"""The load generator used by the scale and storm benchmarks syncs through xdsproxy, and
re-syncs after the proxy restarts, so those benchmarks cannot rot unnoticed."""

import asyncio
import subprocess
import sys

import pytest

from xdsproxy.harness.stack import running_proxy, running_sim
from xdsproxy.sim.mesh import generate

# Runs xdsproxy, kubectl or Envoy as child processes: not in `make test-fast`.
pytestmark = pytest.mark.process


async def _line(process: subprocess.Popen[str], prefix: str) -> str:
    assert process.stdout is not None
    while True:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
        assert line, "the load generator ended"
        if line.startswith(prefix):
            return line


async def test_clients_sync_and_resync_after_a_proxy_restart() -> None:
    async with running_sim(generate(50)) as sim:
        proxy_context = running_proxy(sim.port)
        proxy = await proxy_context.__aenter__()
        port = proxy.port
        loadgen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xdsproxy.harness.loadgen",
                "--target",
                f"127.0.0.1:{port}",
                "--clients",
                "5",
                "--reconnect",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert (await _line(loadgen, "ready")).split()[1] == "5"
            await proxy_context.__aexit__(None, None, None)
            async with running_proxy(sim.port, listen=f"127.0.0.1:{port}") as again:
                await _line(loadgen, "ready")  # all five in sync again
                assert len(again.proxy.sessions) == 5
        finally:
            loadgen.kill()
            loadgen.wait(10)
