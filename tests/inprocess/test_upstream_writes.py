"""One writer per upstream call: gRPC allows one outstanding write per call, and two sources
write to Istiod on a lazy stream (Envoy's answers, xdsproxy's own ACKs). Many lazy streams,
ordinary pushes both inside and outside their scope: no stream may end."""

import asyncio

import pytest

from xdsproxy.harness.lazymesh import egress_service
from xdsproxy.harness.loadgen import Client, Stats
from xdsproxy.harness.stack import eventually, running_proxy, running_sim
from xdsproxy.istio.names import ServicePort
from xdsproxy.sim.mesh import Endpoint, Port, Service, generate

CLIENTS, ROUNDS = 40, 20


@pytest.mark.slow
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_concurrent_pushes_and_self_acks_end_no_lazy_stream(delta: bool) -> None:
    mesh = generate(60)
    mesh.add(egress_service(80, 15081))
    tcp = next(s for s in mesh.services.values() if s.ports[0].protocol == "TCP")
    async with running_sim(mesh) as sim:
        sim.debounce_seconds = 0.0
        egress = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
        async with running_proxy(
            sim.port, mode="lazy", egress=egress, als_listen="127.0.0.1:0"
        ) as proxy:
            stats = Stats()
            stats.clients = CLIENTS
            clients = [Client(f"127.0.0.1:{proxy.port}", i, delta, stats) for i in range(CLIENTS)]
            tasks = [asyncio.create_task(c.run(reconnect=True)) for c in clients]
            try:
                await eventually(lambda: stats.ready >= CLIENTS, timeout=60)
                for r in range(ROUNDS):
                    # Outside every scope (CDS, LDS, RDS ACKed by xdsproxy itself), and the
                    # endpoints of a TCP service every sidecar holds (relayed, Envoy ACKs).
                    extra = Service(f"extra-{r}", "ns-1", (Port(80, "HTTP"),), f"10.97.0.{r + 1}")
                    sim.mutate(lambda m, extra=extra: m.add(extra))
                    sim.set_endpoints(tcp.fqdn, [Endpoint(f"10.200.0.{r + 1}", 3306)])
                    await asyncio.sleep(0.3)
                await eventually(lambda: sum(_acked_here(proxy)) > 0, timeout=10)
                await asyncio.sleep(1.0)
                assert stats.reconnects == 0
                assert _opened(proxy) == CLIENTS
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


def _acked_here(proxy) -> list[float]:
    return [
        s.value
        for m in proxy.metrics.acked_here.collect()
        for s in m.samples
        if s.name.endswith("_total")
    ]


def _opened(proxy) -> float:
    return sum(
        s.value
        for m in proxy.metrics.streams_opened.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
