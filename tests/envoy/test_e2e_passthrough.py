"""Real Envoy, SotW and Delta: one Envoy straight to the simulator, one through xdsproxy.

Their dynamic config (clusters, listeners, route tables with vhosts and domains, endpoints)
must be identical, stay identical through a runtime mutation, survive the simulator's death,
and come back when it restarts.
"""

import asyncio

import pytest
from envoy.config.core.v3.base_pb2 import Node
from google.protobuf.json_format import ParseDict

from xdsproxy.harness.dump import counts, dynamic_config
from xdsproxy.harness.envoy import SidecarIdentity
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy, running_sim
from xdsproxy.istio.node import parse_node
from xdsproxy.sim.mesh import Endpoint, Port, Service, cluster_name, generate
from xdsproxy.wire import typeurls

pytestmark = pytest.mark.envoy


def _expected(sim) -> dict[str, int]:
    """Resource counts the simulator serves this node. Envoy's endpoint dump lists every
    dynamic cluster's load assignment, not only the EDS ones, so it matches the cluster count."""
    node = parse_node(ParseDict(SidecarIdentity().node(), Node()))
    clusters = len(sim.snapshot.resources(typeurls.CLUSTER, node))
    return {
        "clusters": clusters,
        "listeners": len(sim.snapshot.resources(typeurls.LISTENER, node)),
        "routes": len(sim.snapshot.resources(typeurls.ROUTE, node)),
        "endpoints": clusters,
    }


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_proxied_envoy_matches_direct_envoy(delta: bool) -> None:
    async with running_sim(generate(60)) as sim, running_proxy(sim.port) as proxy:
        async with (
            running_envoy(sim.port, delta) as direct,
            running_envoy(proxy.port, delta) as via,
        ):
            expected = _expected(sim)
            for envoy in (direct, via):
                await eventually(lambda e=envoy: counts(e.config_dump()) == expected)
            assert dynamic_config(direct.config_dump()) == dynamic_config(via.config_dump())
            for envoy in (direct, via):
                assert envoy.stat("cluster_manager.cds.update_rejected") == 0
                assert envoy.stat("listener_manager.lds.update_rejected") == 0

            # A runtime mutation reaches both: a new service and changed endpoints.
            new = Service(
                "late",
                "ns-1",
                (Port(8080, "HTTP"),),
                "10.96.200.1",
                endpoints=(Endpoint("10.200.0.1", 8080),),
            )
            sim.mutate(lambda mesh: mesh.add(new))
            sim.mutate(
                lambda mesh: mesh.set_endpoints(
                    "svc-0.ns-0.svc.cluster.local", [Endpoint("10.77.0.1", 80)]
                )
            )
            name = cluster_name(8080, new.fqdn)
            target = "svc-0.ns-0.svc.cluster.local"

            def mutated(envoy) -> bool:
                config = dynamic_config(envoy.config_dump())
                endpoints = config["endpoints"].get(cluster_name(80, target), (None, {}))[1]
                addresses = [
                    lb["endpoint"]["address"]["socket_address"]["address"]
                    for group in endpoints.get("endpoints", [])
                    for lb in group.get("lb_endpoints", [])
                ]
                return name in config["clusters"] and addresses == ["10.77.0.1"]

            for envoy in (direct, via):
                await eventually(lambda e=envoy: mutated(e))
            assert dynamic_config(direct.config_dump()) == dynamic_config(via.config_dump())
            assert len(proxy.proxy.sessions) == 1


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_simulator_death_keeps_config_and_restart_reconnects(delta: bool) -> None:
    mesh = generate(30)
    async with running_sim(mesh) as sim, running_proxy(sim.port) as proxy:
        port = sim.port
        async with running_envoy(port, delta) as direct, running_envoy(proxy.port, delta) as via:
            expected = _expected(sim)
            for envoy in (direct, via):
                await eventually(lambda e=envoy: counts(e.config_dump()) == expected)
            before = dynamic_config(via.config_dump())

            await sim.stop()
            await eventually(lambda: len(proxy.proxy.sessions) == 0, timeout=10)
            await asyncio.sleep(1.0)
            for envoy in (direct, via):
                assert counts(await asyncio.to_thread(envoy.config_dump)) == expected
            assert via.process.poll() is None

            async with running_sim(mesh, f"127.0.0.1:{port}") as again:
                await eventually(lambda: again.connected == 2, timeout=30)
                await eventually(lambda: len(proxy.proxy.sessions) == 1, timeout=10)
                for envoy in (direct, via):
                    await eventually(
                        lambda e=envoy: e.stat("control_plane.connected_state") == 1, timeout=10
                    )
                assert dynamic_config(via.config_dump()).keys() == before.keys()
                assert counts(via.config_dump()) == expected
