"""Real Envoy 1.40 on Istio's own Istiod, through xdsproxy: every type Istiod sends is accepted
(with Istio's two filters that only istio-proxy has turned off: `FOR_STOCK_ENVOY`), in
passthrough and in lazy mode, and a learn makes Envoy run Istio's own cluster and route."""

import asyncio

import pytest

from tests.helpers import ISTIOD_MESH
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.envoy import SidecarIdentity
from xdsproxy.harness.istiod import FOR_STOCK_ENVOY, IstiodProcess
from xdsproxy.harness.lazymesh import MeshCa
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.model import WorkloadKey
from xdsproxy.wire import typeurls

pytestmark = [pytest.mark.istiod, pytest.mark.envoy]
EGRESS = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
REVIEWS = ServicePort("reviews.shop.svc.cluster.local", 9080)
MYSQL = ServicePort("mysql.shop.svc.cluster.local", 3306)
APP = WorkloadKey("default", "app")
IDENTITY = SidecarIdentity(
    pod="app-0",
    namespace="default",
    workload="app",
    ip="127.0.0.5",
    labels={"app": "app"},
    istio_version="1.28.0",
)


def _synced(proxy) -> bool:
    """Envoy ACKed the newest response of every type it was sent, and NACKed none."""
    sessions = list(proxy.proxy.sessions.values())
    if not sessions:
        return False
    status = sessions[0].stream.status()
    if any(s.nack_count for s in status.values()):
        raise AssertionError({t: s.last_nack for t, s in status.items() if s.nack_count})
    kinds = {typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE}
    return kinds <= set(status) and all(status[t].state == "SYNCED" for t in kinds)


def _rejected(envoy) -> int:
    return envoy.stat("cluster_manager.cds.update_rejected") + envoy.stat(
        "listener_manager.lds.update_rejected"
    )


@pytest.mark.parametrize("mode", ["passthrough", "lazy"])
async def test_envoy_accepts_what_istiod_sends_through_xdsproxy(delta: bool, mode: str) -> None:
    istiod = await asyncio.to_thread(IstiodProcess(ISTIOD_MESH, env=FOR_STOCK_ENVOY).start)
    ca = MeshCa()
    config = {"mode": mode, "egress": EGRESS, "als_listen": "127.0.0.1:0"} if mode == "lazy" else {}
    try:
        async with (
            ca.sds,
            running_proxy(istiod.ads_port, **config) as proxy,
            running_envoy(proxy.port, delta, IDENTITY, ca.enrol(IDENTITY)) as envoy,
        ):
            await eventually(lambda: _synced(proxy), timeout=30)
            clusters = dynamic_config(await asyncio.to_thread(envoy.config_dump))["clusters"]
            assert (cluster_name(REVIEWS) in clusters) == (mode == "passthrough")
            if mode == "lazy":
                await proxy.runtime.learner.add_dependencies(APP, [REVIEWS, MYSQL])

                def learned() -> bool:
                    dump = dynamic_config(envoy.config_dump())
                    route = dump["routes"].get("9080", (None, {}))[1]
                    vhosts = {v["name"] for v in route.get("virtual_hosts", [])}
                    return (
                        cluster_name(REVIEWS) in dump["clusters"]
                        and f"{REVIEWS.host}:{REVIEWS.port}" in vhosts
                        and envoy.stat("cluster_manager.warming_clusters") == 0
                    )

                await eventually(learned, timeout=30)
                await eventually(lambda: _synced(proxy), timeout=30)
            assert _rejected(envoy) == 0
    finally:
        await asyncio.to_thread(istiod.stop)
