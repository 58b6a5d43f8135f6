"""No learn lost to timing: an access log entry for a service this replica does not know yet
(the egress routed it a moment before the service's config reached here) is held, bounded in
count and age, and applied when the service appears."""

import asyncio

import pytest

from xdsproxy.harness.als import send_access_log
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy, running_sim
from xdsproxy.istio.names import ServicePort
from xdsproxy.learn.attribution import AccessRecord
from xdsproxy.learn.pending import PendingEntries
from xdsproxy.sim.mesh import Endpoint, Port, Service, generate

A = ServicePort("a.ns.svc.cluster.local", 80)
B = ServicePort("b.ns.svc.cluster.local", 80)


def _record(n: int = 0) -> AccessRecord:
    return AccessRecord(remote_ip=f"10.0.0.{n}")


def test_held_entries_come_back_for_their_service_only() -> None:
    pending = PendingEntries()
    pending.hold(A, _record(1), 5.0, now=0.0)
    pending.hold(B, _record(2), 6.0, now=0.0)
    assert pending.take([], now=1.0) == []
    [held] = pending.take([A], now=1.0)
    assert held.record == _record(1) and held.started == 5.0
    assert pending.take([A], now=1.0) == [] and len(pending) == 1


def test_held_entries_are_bounded_in_age_and_count_and_each_loss_is_counted() -> None:
    pending = PendingEntries(limit=3, max_age=30.0)
    pending.hold(A, _record(1), 0.0, now=0.0)
    assert pending.take([A], now=30.5) == []
    assert pending.expired == 1
    for n in range(5):
        pending.hold(B, _record(n), 0.0, now=40.0)
    assert len(pending) == 3 and pending.expired == 3
    assert [h.record for h in pending.take([B], now=41.0)] == [_record(n) for n in (2, 3, 4)]


@pytest.mark.envoy
async def test_an_entry_that_arrives_before_the_services_cds_is_learned_when_it_arrives() -> None:
    mesh = generate(20)
    async with running_sim(mesh) as sim:
        sim.debounce_seconds = 0.0
        egress = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
        async with running_proxy(
            sim.port,
            mode="lazy",
            egress=egress,
            als_listen="127.0.0.1:0",
            als_allow=("127.0.0.0/8",),
        ) as proxy:
            runtime = proxy.runtime
            async with running_envoy(
                proxy.port, identity=sidecar_identity("app-0", "127.0.0.2")
            ) as envoy:
                await eventually(lambda: "8080" in dynamic_config(envoy.config_dump())["routes"])
                late = Service("late", "ns-1", (Port(8080, "HTTP"),), "10.97.0.1")
                cluster = f"outbound|8080||{late.fqdn}"
                # The egress already routed app's request to `late`; this replica has not
                # received late's CDS yet.
                await asyncio.to_thread(send_access_log, proxy.als_port, "127.0.0.2", cluster)
                await eventually(
                    lambda: runtime.metrics.value("xdsproxy_als_held_entries") == 1, timeout=10
                )
                assert runtime.metrics.value("xdsproxy_learns_total") == 0
                late = Service(
                    late.name,
                    late.namespace,
                    late.ports,
                    late.cluster_ip,
                    endpoints=(Endpoint("10.128.9.1", 8080),),
                )
                sim.mutate(lambda m: m.add(late))
                await eventually(
                    lambda: cluster in dynamic_config(envoy.config_dump())["clusters"], timeout=10
                )
                assert (
                    runtime.metrics.value("xdsproxy_learns_total") == 1
                    and runtime.metrics.value("xdsproxy_als_held_entries") == 0
                )
                assert proxy.metrics.value("xdsproxy_als_held_entries") == 0
