"""Lazy mode end to end with real Envoys: first request via the egress, learn, then direct."""

import asyncio

import pytest

from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import request_via_sidecar
from xdsproxy.harness.lazymesh import lazy_mesh, sidecar_identity
from xdsproxy.harness.stack import eventually
from xdsproxy.istio.names import ServicePort
from xdsproxy.scope.routes import LAZY_HEADERS

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
        assert runtime.rejections["peer_not_allowed"] == 0

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
        assert runtime.learns == 1
        # The app's forged header was overwritten by its own sidecar before the egress saw it.
        assert runtime.rejections["forged_claim"] == 0
