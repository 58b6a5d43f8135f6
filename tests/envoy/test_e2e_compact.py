"""Compact lazy sidecars with real Envoys on the realistic profile: a sidecar holds neither the
listeners nor the clusters of out-of-scope services; TCP (client-first and server-first) and
sniffed HTTP reach their service through the mesh-range tunnel to the egress and are learned;
a connection open through the tunnel survives the learn; non-mesh traffic still goes direct;
and no scope change updates a listener in place."""

import asyncio
import time

import pytest

from tests.helpers import (
    DRAIN_SECONDS,
    EGRESS_REQUESTS,
    dumped_clusters,
    greeting,
    is_placeholder,
    named_clusters,
    rejected,
    service_cluster,
)
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import EchoServer, connect_via_sidecar, echoes, request_via_sidecar
from xdsproxy.harness.lazymesh import realistic_lazy_mesh, runs_istio_cluster, sidecar_identity
from xdsproxy.harness.stack import eventually
from xdsproxy.istio.names import outbound_cluster

pytestmark = pytest.mark.envoy

IN_PLACE = "listener_manager.listener_in_place_updated"


def _listeners(envoy) -> set[str]:
    return set(dynamic_config(envoy.config_dump(include_eds=False))["listeners"])


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_compact_sidecar_tunnels_learns_and_keeps_what_is_open(delta: bool) -> None:
    async with realistic_lazy_mesh(delta, lazy="compact") as mesh:
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta, drain_seconds=DRAIN_SECONDS)
        listen = identity.proxy_config["proxyListenPort"]
        services = mesh.sim.mesh.services.values()
        in_place = sidecar.stat(IN_PLACE)

        vip_listeners = {
            f"{s.cluster_ip}_{p.number}": s
            for s in services
            if s.kind == "eds"
            for p in s.ports
            if p.protocol != "HTTP"
        }
        assert not set(vip_listeners) & _listeners(sidecar), "no out-of-scope VIP listener"
        clusters = dumped_clusters(sidecar)
        outbound = {n: c for n, c in clusters.items() if outbound_cluster(n)}
        assert not any(map(is_placeholder, outbound.values()))
        real = {n for n, c in outbound.items() if c.get("type") != "ORIGINAL_DST"}
        assert real == {mesh.proxy.runtime.egress_cluster}

        # Outside the mesh ranges: PassthroughCluster, direct, as Istio's.
        with EchoServer(host="127.0.0.60") as outside:
            before = mesh.egress.stat(EGRESS_REQUESTS)
            conn = await asyncio.to_thread(
                connect_via_sidecar, listen, (outside.host, outside.port), "127.0.0.2"
            )
            with conn:
                assert await asyncio.to_thread(echoes, conn)
            assert mesh.egress.stat(EGRESS_REQUESTS) == before

        service, _ = mesh.tcp["tcp"]
        vip = (service.cluster_ip, service.ports[0].number)
        name = service_cluster(service)
        tunnelled = mesh.egress.stat(EGRESS_REQUESTS)
        held = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
        try:
            assert await asyncio.to_thread(echoes, held)
            assert mesh.egress.stat(EGRESS_REQUESTS) == tunnelled + 1
            await eventually(lambda: runs_istio_cluster(sidecar, name), timeout=10)
            await eventually(lambda: f"{vip[0]}_{vip[1]}" in _listeners(sidecar), timeout=10)
            switched = time.monotonic()
            direct = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
            with direct:
                assert await asyncio.to_thread(echoes, direct)
            assert mesh.egress.stat(EGRESS_REQUESTS) == tunnelled + 1, "the next goes direct"
            while time.monotonic() - switched < 2 * DRAIN_SECONDS + 1:
                assert await asyncio.to_thread(echoes, held), "tunnel closed after the learn"
                await asyncio.sleep(0.1)
        finally:
            held.close()

        service, _ = mesh.tcp["server-first"]
        vip = (service.cluster_ip, service.ports[0].number)
        conn = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
        with conn:
            assert await asyncio.to_thread(greeting, conn) == b"220 ready\r\n"
        await eventually(lambda: runs_istio_cluster(sidecar, service_cluster(service)), timeout=10)

        # A sniffed port with no HTTP listener of its own port: first contact is tunnelled at
        # L4 (the HTTP request is payload), and learned; then it goes direct through Istio's
        # sniffed listener.
        service, _ = mesh.tcp["sniffed"]
        vip = (service.cluster_ip, service.ports[0].number)
        host = f"{service.name}.{service.namespace}"
        before = mesh.egress.stat(EGRESS_REQUESTS)
        reply = await asyncio.to_thread(request_via_sidecar, listen, vip, host, "127.0.0.2")
        assert reply.status == 200 and reply.json()["backend"] == "sniffed", reply.body
        assert mesh.egress.stat(EGRESS_REQUESTS) == before + 1
        await eventually(lambda: runs_istio_cluster(sidecar, service_cluster(service)), timeout=10)
        await eventually(lambda: f"{vip[0]}_{vip[1]}" in _listeners(sidecar), timeout=10)
        reply = await asyncio.to_thread(request_via_sidecar, listen, vip, host, "127.0.0.2")
        assert reply.status == 200 and reply.json()["backend"] == "sniffed"
        assert mesh.egress.stat(EGRESS_REQUESTS) == before + 1, "in scope: direct"

        # A sniffed service on a port that has a `0.0.0.0_PORT` HTTP listener: first-contact
        # HTTP keeps L7 there (the mesh-range copy of Istio's HTTP chain, then the catch-all).
        service, _ = mesh.tcp["sniffed-http-port"]
        vip = (service.cluster_ip, mesh.port)
        host = f"{service.name}.{service.namespace}"
        sidecar_http = f"http.outbound_0.0.0.0_{mesh.port}.downstream_rq_total"
        before, l7_before = mesh.egress.stat(EGRESS_REQUESTS), sidecar.stat(sidecar_http)
        reply = await asyncio.to_thread(request_via_sidecar, listen, vip, host, "127.0.0.2")
        assert reply.status == 200 and reply.json()["backend"] == "sniffed-http-port", reply.body
        assert sidecar.stat(sidecar_http) == l7_before + 1, "HTTP at L7 on the sidecar"
        assert mesh.egress.stat(EGRESS_REQUESTS) == before + 1
        await eventually(lambda: runs_istio_cluster(sidecar, service_cluster(service)), timeout=10)
        await eventually(lambda: f"{vip[0]}_{vip[1]}" in _listeners(sidecar), timeout=10)

        assert mesh.proxy.runtime.metrics.value("xdsproxy_learns_total") == 4
        assert sidecar.stat(IN_PLACE) == in_place, "a scope change updated a listener in place"
        for envoy in (sidecar, mesh.egress):
            assert rejected(envoy) == 0
            assert envoy.stat("cluster_manager.warming_clusters") == 0
            assert envoy.stat("listener_manager.total_listeners_warming") == 0
        listeners = dynamic_config(sidecar.config_dump(include_eds=False))["listeners"]
        named = set().union(*(named_clusters(body) for _, body in listeners.values()))
        assert named and named <= set(dumped_clusters(sidecar))
