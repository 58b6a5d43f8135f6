"""Fail-open (`--fail-open auto`), with real Envoys: while the lazy egress has no ready
endpoint (as Istiod reports it), a scoped sidecar gets Istio's full config and reaches a
service it never learned directly; once the egress is ready again for the hold-down, the
sidecar is scoped again, and a connection it holds to an in-scope service stays open."""

import asyncio
import socket

import pytest

from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import request_via_sidecar
from xdsproxy.harness.lazymesh import EGRESS_HOST, lazy_mesh, sidecar_identity
from xdsproxy.harness.stack import eventually
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.scope.failopen import FailOpen, ready_endpoints

pytestmark = pytest.mark.envoy

A = "svc-3.ns-1.svc.cluster.local"  # learned first: in scope
B = "svc-4.ns-0.svc.cluster.local"  # never learned


class KeepAlive:
    """One HTTP/1.1 connection through the sidecar, used for several requests."""

    def __init__(self, listen: int, target: tuple[str, int], host: str) -> None:
        self.host = host
        self.conn = socket.create_connection(("127.0.0.1", listen), timeout=10)
        proxy_line = f"PROXY TCP4 127.0.0.2 {target[0]} 40000 {target[1]}\r\n"
        self.conn.sendall(proxy_line.encode())
        self.reader = self.conn.makefile("rb")

    def get(self) -> int:
        self.conn.sendall(f"GET / HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        status = int(self.reader.readline().split(b" ", 2)[1])
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        self.reader.read(length)
        return status

    def close(self) -> None:
        self.reader.close()
        self.conn.close()


def test_fail_open_opens_at_once_and_closes_after_the_hold_down() -> None:
    state = FailOpen("auto", hold_down=5.0)
    assert not state.observe(1, now=0.0) and not state.active
    assert state.observe(0, now=1.0) and state.active
    assert not state.observe(1, now=2.0)  # ready again: the hold-down starts
    assert not state.observe(0, now=3.0) and state.active  # flapped: it starts over
    assert not state.observe(1, now=4.0) and not state.tick(8.9)
    assert state.tick(9.0) and not state.active
    never = FailOpen("never")
    assert not never.observe(0, now=0.0) and not never.active
    assert ready_endpoints(b"garbage") == 0


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_sidecar_gets_full_config_while_the_egress_is_down(delta: bool) -> None:
    async with lazy_mesh(delta) as mesh:
        runtime = mesh.proxy.runtime
        runtime.fail_open.mode, runtime.fail_open.hold_down = "auto", 2.0
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta)
        listen = identity.proxy_config["proxyListenPort"]
        services = mesh.sim.mesh.services
        a, b = services[A], services[B]
        clusters = lambda: set(dynamic_config(sidecar.config_dump())["clusters"])  # noqa: E731
        # A is learned through the egress; a connection to it stays open throughout.
        first = await asyncio.to_thread(
            request_via_sidecar, listen, (a.cluster_ip, mesh.port), A, "127.0.0.2"
        )
        assert first.status == 200
        a_cluster = f"outbound|{mesh.port}|v2|{A}"
        await eventually(lambda: a_cluster in clusters())
        held = await asyncio.to_thread(KeepAlive, listen, (a.cluster_ip, mesh.port), A)
        assert await asyncio.to_thread(held.get) == 200
        b_cluster = cluster_name(ServicePort(B, mesh.port))
        assert b_cluster not in clusters()

        # The egress loses its endpoint: every scoped sidecar gets the full config.
        endpoints = services[EGRESS_HOST].endpoints
        mesh.sim.set_endpoints(EGRESS_HOST, [])
        await eventually(lambda: b_cluster in clusters(), timeout=20)
        assert proxy_metric(mesh, "xdsproxy_fail_open") == 1
        await eventually(
            lambda: sidecar.stat(f"cluster.{b_cluster}.membership_healthy") > 0, timeout=20
        )
        reply = await asyncio.to_thread(
            request_via_sidecar, listen, (b.cluster_ip, mesh.port), B, "127.0.0.2"
        )
        assert reply.status == 200 and sidecar.stat(f"cluster.{b_cluster}.upstream_rq_total") == 1

        # The egress is back: after the hold-down the sidecar is scoped again.
        mesh.sim.set_endpoints(EGRESS_HOST, endpoints)
        await eventually(lambda: b_cluster not in clusters(), timeout=20)
        assert proxy_metric(mesh, "xdsproxy_fail_open") == 0
        assert a_cluster in clusters()
        assert await asyncio.to_thread(held.get) == 200, "the open connection was dropped"
        await asyncio.to_thread(held.close)


def proxy_metric(mesh, name: str) -> float:
    return mesh.proxy.metrics.value(name)
