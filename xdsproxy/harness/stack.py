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
from xdsproxy.wire import typeurls


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
    config = {"listen": "127.0.0.1:0", "shutdown_grace_seconds": 1.0, **config}
    proxy = ProxyServer(ServeConfig(upstream=f"127.0.0.1:{upstream_port}", **config))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@asynccontextmanager
async def running_envoy(
    ads_port: int,
    delta: bool = False,
    identity: SidecarIdentity | None = None,
    sds_port: int | None = None,
    drain_seconds: int | None = None,
) -> AsyncIterator[Envoy]:
    envoy = Envoy(ads_port, identity, delta, sds_port, drain_seconds)
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


def session_of(proxy: ProxyServer, pod: str):
    """The stream of the node whose pod is `pod`, if connected."""
    for session in proxy.proxy.sessions.values():
        if f"~{pod}." in session.node_id:
            return session
    return None


async def settled(envoy: Envoy, proxy: ProxyServer, pod: str, timeout: float = 180.0) -> None:
    """Wait until the Envoy of `pod` holds every cluster xdsproxy pushed it, none warming,
    and has acknowledged its route tables; then a moment for memory to settle."""

    def ready() -> bool:
        session = session_of(proxy, pod)
        if session is None:
            return False
        status = session.stream.status()
        routes = status.get(typeurls.ROUTE)
        if routes is None or not routes.pushed_nonce or routes.acked_nonce != routes.pushed_nonce:
            return False
        expected = status[typeurls.CLUSTER].pushed_resources + 1  # + the static xds cluster
        return (
            envoy.stat("cluster_manager.active_clusters") == expected
            and envoy.stat("cluster_manager.warming_clusters") == 0
            and envoy.stat("listener_manager.total_listeners_warming") == 0
        )

    await eventually(ready, timeout=timeout, interval=0.5)
    await asyncio.sleep(2.0)
