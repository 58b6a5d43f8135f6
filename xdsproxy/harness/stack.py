"""Running the pieces in-process or as subprocesses, for tests, benchmarks and the demo.

The simulated Istiod and xdsproxy run in the caller's event loop; Envoys are subprocesses.
Everything binds to 127.0.0.1 with kernel-chosen ports; every context manager stops what it
started. Blocking calls on Envoy's admin API run in a thread so the in-process servers keep
serving.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from xdsproxy.harness.envoy import Envoy, SidecarIdentity
from xdsproxy.server.app import ProxyServer, ServeConfig
from xdsproxy.sim.mesh import Mesh, generate
from xdsproxy.sim.server import SimServer


@asynccontextmanager
async def running_sim(
    mesh: Mesh | None = None, listen: str = "127.0.0.1:0"
) -> AsyncIterator[SimServer]:
    sim = SimServer(mesh or generate(60))
    await sim.start(listen)
    try:
        yield sim
    finally:
        await sim.stop()


@asynccontextmanager
async def running_proxy(upstream_port: int, **config: Any) -> AsyncIterator[ProxyServer]:
    proxy = ProxyServer(
        ServeConfig(
            upstream=f"127.0.0.1:{upstream_port}",
            listen="127.0.0.1:0",
            shutdown_grace_seconds=1.0,
            **config,
        )
    )
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@asynccontextmanager
async def running_envoy(
    ads_port: int, delta: bool = False, identity: SidecarIdentity | None = None
) -> AsyncIterator[Envoy]:
    envoy = Envoy(ads_port, identity, delta)
    await asyncio.to_thread(envoy.start)
    try:
        yield envoy
    finally:
        await asyncio.to_thread(envoy.stop)


async def eventually(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Await until `check()` (run in a thread: it may call Envoy's admin) returns truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except OSError as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s; last: {last!r}")
