"""Real Envoy accepts everything the simulator sends for a 5,000-service mesh."""

import pytest

from xdsproxy.harness.dump import counts
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy, running_sim
from xdsproxy.sim.mesh import generate

pytestmark = pytest.mark.envoy


def _rejections(envoy) -> dict[str, int]:
    text = envoy.get("/stats?filter=update_rejected").decode()
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines() if ": " in line)}


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_five_thousand_services_zero_rejected(delta: bool) -> None:
    mesh = generate(5000)
    # One cluster per service and subset, plus inbound, Passthrough, BlackHole, InboundPassthrough.
    clusters = sum(1 + len(s.subsets) for s in mesh.services.values()) + 4
    async with running_sim(mesh) as sim, running_proxy(sim.port) as proxy:
        async with running_envoy(proxy.port, delta) as envoy:

            def loaded() -> dict[str, int] | None:
                found = counts(envoy.config_dump(include_eds=False))
                return found if found["clusters"] == clusters and found["routes"] == 3 else None

            found = await eventually(loaded, timeout=120, interval=1.0)
            assert found["listeners"] == 2 + 3 + 500  # virtual, HTTP ports, TCP services
            await eventually(
                lambda: envoy.stat("cluster_manager.warming_clusters") == 0,
                timeout=60,
                interval=0.5,
            )
            rejections = _rejections(envoy)
            assert rejections, "Envoy reported no update_rejected stats at all"
            assert sum(rejections.values()) == 0, rejections
            assert envoy.stat("cluster_manager.cds.update_success") >= 1
            assert envoy.stat("listener_manager.lds.update_success") >= 1
