"""Lazy mode end to end with real Envoys: first request via the egress, learn, then direct."""

import asyncio

import pytest

from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import request_via_sidecar
from xdsproxy.harness.lazymesh import lazy_mesh, sidecar_identity
from xdsproxy.harness.stack import eventually
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.scope.contract import LAZY_HEADERS
from xdsproxy.sim.mesh import Endpoint, Port, Service
from xdsproxy.wire.typeurls import CLUSTER as CDS

pytestmark = pytest.mark.envoy

A = "svc-3.ns-1.svc.cluster.local"
A_V2 = "outbound|{port}|v2|" + A


def _clusters(envoy) -> set[str]:
    return set(dynamic_config(envoy.config_dump(include_eds=False))["clusters"])


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_first_request_learn_then_direct(delta: bool) -> None:
    async with lazy_mesh(delta) as mesh:
        port = mesh.port
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta)
        listen = identity.proxy_config["proxyListenPort"]
        a_v2 = A_V2.format(port=port)
        assert a_v2 not in _clusters(sidecar), "A must not be in scope before any use"

        egress_before = mesh.egress.stat("http.xdsproxy_lazy_egress.downstream_rq_total")
        reply = await asyncio.to_thread(
            request_via_sidecar,
            listen,
            ("10.96.0.13", port),
            A,
            "127.0.0.2",
            {"x-xdsproxy-source-workload": "forged"},
        )
        assert reply.status == 200, reply.body
        # Weighted 0/100 to v2: backend b proves the caller's routing applied on the egress.
        assert reply.json()["backend"] == "b"
        assert (
            mesh.egress.stat("http.xdsproxy_lazy_egress.downstream_rq_total") == egress_before + 1
        )
        for header in LAZY_HEADERS:
            assert header not in mesh.backends["b"].requests[-1]

        await eventually(lambda: a_v2 in _clusters(sidecar), timeout=10)
        await eventually(
            lambda: sidecar.stat(f"cluster.{a_v2}.membership_healthy") >= 1, timeout=10
        )
        reply = await asyncio.to_thread(
            request_via_sidecar, listen, ("10.96.0.13", port), A, "127.0.0.2"
        )
        assert reply.status == 200 and reply.json()["backend"] == "b"
        assert sidecar.stat(f"cluster.{a_v2}.upstream_rq_total") == 1
        assert (
            mesh.egress.stat("http.xdsproxy_lazy_egress.downstream_rq_total") == egress_before + 1
        )

        # The direct request is evidence of use: the sidecar's sampled logger (100% here,
        # flushed every second) refreshes A's last seen without adding anything.
        runtime = mesh.proxy.runtime
        key = next(k for k in runtime.scopes if k.workload == "app")
        learned_at = runtime.scope(key).learned[ServicePort(A, port)].last_seen
        await eventually(
            lambda: runtime.scope(key).learned[ServicePort(A, port)].last_seen > learned_at,
            timeout=15,
        )
        assert (
            runtime.metrics.value("xdsproxy_als_rejections_total", {"reason": "peer_not_allowed"})
            == 0
        )

        # A second replica of the same workload holds A from its first push.
        second = await mesh.add_sidecar(sidecar_identity("app-1", "127.0.0.3"), delta)
        assert a_v2 in _clusters(second)

        # A host outside the mesh passes through the egress to its original destination.
        outside = mesh.backends["outside"]
        reply = await asyncio.to_thread(
            request_via_sidecar, listen, (outside.host, port), "example.com", "127.0.0.2"
        )
        assert reply.status == 200 and reply.json()["backend"] == "outside"
        for header in LAZY_HEADERS:
            assert header not in outside.requests[-1]

        # With REGISTRY_ONLY the same request is blocked.
        mesh.sim.mutate(lambda m: setattr(m, "registry_only", True))

        def blocked() -> bool:
            reply = request_via_sidecar(listen, (outside.host, port), "example.com", "127.0.0.2")
            return reply.status == 502

        await eventually(blocked, timeout=15, interval=0.3)
        assert runtime.metrics.value("xdsproxy_learns_total") == 1
        # The app's forged header was overwritten by its own sidecar before the egress saw it.
        assert (
            runtime.metrics.value("xdsproxy_als_rejections_total", {"reason": "forged_claim"}) == 0
        )


def _config_updates(envoy) -> int:
    """Every xDS update Envoy has attempted, of any type."""
    text = envoy.get("/stats?filter=update_attempt$").decode()
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.strip())


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_change_outside_the_scope_is_acked_to_istiod_and_costs_the_sidecar_nothing(
    delta: bool,
) -> None:
    async with lazy_mesh(delta) as mesh:
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta)
        [connection] = mesh.sim.connections(identity.node_id)
        await eventually(connection.synced, timeout=10)
        await asyncio.sleep(1)  # let any update in flight land before counting
        updates = _config_updates(sidecar)
        cds_nonce = connection.watches[CDS].nonce
        fqdn = "late.ns-1.svc.cluster.local"
        added = Service(
            "late",
            "ns-1",
            (Port(mesh.port, "HTTP"),),
            "10.96.7.7",
            endpoints=(Endpoint("127.0.0.1", 9),),
        )
        mesh.sim.mutate(lambda m: m.add(added))
        # The egress holds the whole mesh: the push reached xdsproxy.
        await eventually(
            lambda: cluster_name(ServicePort(fqdn, mesh.port)) in _clusters(mesh.egress), 10
        )
        # Istiod saw every type of the sidecar's stream ACKed at the push's nonces...
        await eventually(
            lambda: connection.watches[CDS].nonce != cds_nonce and connection.synced(), 10
        )
        await asyncio.sleep(1)
        # ...while Envoy was sent nothing at all.
        assert _config_updates(sidecar) == updates
        assert cluster_name(ServicePort(fqdn, mesh.port)) not in _clusters(sidecar)
        assert mesh.proxy.metrics.value("xdsproxy_acked_here_total", {"type": "CDS"}) >= 1
