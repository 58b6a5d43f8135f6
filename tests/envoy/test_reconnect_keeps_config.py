"""Never remove what Envoy should keep: on a fresh upstream stream (xdsproxy restarted, Istiod
restarted) Istiod sends CDS before LDS, and a scoped sidecar's clusters depend on its
listeners (TCP services: their placeholders, or Istio's clusters on a sidecar that cannot
tunnel). Real Envoy, both protocols: no cluster or listener is removed across either restart,
and a TCP connection open through the sidecar stays open."""

import asyncio

import pytest

from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import EchoServer, connect_via_sidecar, echoes, free_port
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import eventually, running_envoy
from xdsproxy.sim.mesh import Endpoint, Port, Service, generate
from xdsproxy.sim.server import SimServer

pytestmark = pytest.mark.envoy


def _tcp_services(echo: EchoServer) -> list[Service]:
    return [
        Service(
            f"db-{i}",
            "ns-1",
            (Port(3306, "TCP"),),
            f"10.97.1.{i + 1}",
            endpoints=(Endpoint(echo.host, echo.port),),
        )
        for i in range(3)
    ]


async def _start_sim(mesh, port: int = 0) -> SimServer:
    sim = SimServer(mesh, bind_address="127.0.0.1", proxy_protocol=True)
    await sim.start(f"127.0.0.1:{port}")
    return sim


@pytest.mark.parametrize("tunnel", [True, False], ids=["placeholders", "istio-1.9"])
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_restarts_of_xdsproxy_and_istiod_remove_no_cluster(
    delta: bool, tunnel: bool, tmp_path
) -> None:
    """With placeholders (no egress runs here) the check is that nothing is removed; on a
    sidecar that cannot tunnel, also that a connection to its TCP service stays open."""
    with EchoServer() as echo:
        mesh = generate(20, tcp_every=0)
        tcp = _tcp_services(echo)
        for service in tcp:
            mesh.add(service)
        clusters = [f"outbound|3306||{s.fqdn}" for s in tcp]
        sim = await _start_sim(mesh)
        sim_port = sim.port
        als = free_port()
        proxy = ProxyProcess(
            "--upstream", f"127.0.0.1:{sim_port}", "--upstream-plaintext",
            "--mode", "lazy", "--egress", "lazy-egress.istio-system.svc.cluster.local:80",
            "--store", f"sqlite://{tmp_path}/edges.db",
            "--als-listen", f"127.0.0.1:{als}", "--als-advertise", f"127.0.0.1:{als}",
        )  # fmt: skip
        await asyncio.to_thread(proxy.start)
        identity = sidecar_identity("app-0", "127.0.0.2")
        if not tunnel:
            identity.istio_version, identity.internal_listener = "1.9.1", False
        listen = identity.proxy_config["proxyListenPort"]
        conn = None
        try:
            async with running_envoy(proxy.port, delta, identity) as envoy:
                await eventually(
                    lambda: set(clusters) <= set(dynamic_config(envoy.config_dump())["clusters"])
                )
                if not tunnel:
                    await eventually(
                        lambda: envoy.stat(f"cluster.{clusters[0]}.membership_healthy") > 0
                    )
                    # Envoy adds listeners after the clusters they name: wait for both the
                    # service's listener and virtualOutbound, which hands it the connection.
                    for listener in ("10.97.1.1_3306", "virtualOutbound"):
                        await eventually(lambda n=listener: envoy.active_listener(n) is not None)
                    conn = await asyncio.to_thread(connect_via_sidecar, listen, ("10.97.1.1", 3306))
                    assert await asyncio.to_thread(echoes, conn)

                def still_open() -> bool:
                    return conn is None or echoes(conn)

                removed = envoy.stat("cluster_manager.cluster_removed")
                listeners_removed = envoy.stat("listener_manager.listener_removed")

                async def reconnected(restart) -> None:
                    updates = envoy.stat("cluster_manager.cds.update_attempt")
                    await restart()
                    await eventually(
                        lambda: envoy.stat("control_plane.connected_state") == 1, timeout=20
                    )
                    # The fresh stream has answered CDS and LDS, and Envoy applied them.
                    await eventually(
                        lambda: envoy.stat("cluster_manager.cds.update_attempt") > updates,
                        timeout=20,
                    )
                    await asyncio.sleep(1.0)

                async def restart_xdsproxy() -> None:
                    await asyncio.to_thread(proxy.kill)
                    await eventually(
                        lambda: envoy.stat("control_plane.connected_state") == 0, timeout=10
                    )
                    await asyncio.to_thread(proxy.start)

                async def restart_istiod() -> None:
                    nonlocal sim
                    await sim.stop()
                    await eventually(
                        lambda: envoy.stat("control_plane.connected_state") == 0, timeout=10
                    )
                    sim = await _start_sim(mesh, sim_port)

                for restart in (restart_xdsproxy, restart_istiod):
                    await reconnected(restart)
                    assert envoy.stat("cluster_manager.cluster_removed") == removed
                    assert envoy.stat("listener_manager.listener_removed") == listeners_removed
                    assert await asyncio.to_thread(still_open)
                assert set(clusters) <= set(dynamic_config(envoy.config_dump())["clusters"])
        finally:
            if conn is not None:
                conn.close()
            await asyncio.to_thread(proxy.stop)
            await sim.stop()
