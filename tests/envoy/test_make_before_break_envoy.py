"""Make before break with real Envoy and a loaded Istiod (the simulator answers EDS requests
300 ms late): a client calls a service continuously while its workload learns it (the switch
from the egress to direct) and while the dependency ages out (the switch back). No request may
fail with 503 "no cluster" (or anything else) in either switch, SotW and Delta."""

import asyncio
import socket
import threading

import pytest

from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.lazymesh import lazy_mesh, sidecar_identity
from xdsproxy.harness.stack import eventually
from xdsproxy.istio.names import ServicePort, cluster_name

pytestmark = pytest.mark.envoy

B = "svc-4.ns-0.svc.cluster.local"


def _status(listen: int, target: tuple[str, int], host: str) -> int:
    """One request's status line (a local 503 would be held open by Envoy for a second)."""
    with socket.create_connection(("127.0.0.1", listen), timeout=5) as conn:
        proxy_line = f"PROXY TCP4 127.0.0.2 {target[0]} 40000 {target[1]}\r\n"
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        conn.sendall(proxy_line.encode() + request.encode())
        head = b""
        while b"\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return 0
            head += chunk
    return int(head.split(b" ", 2)[1])


class Caller(threading.Thread):
    """Calls the service back to back, recording every status, until stopped."""

    def __init__(self, listen: int, target: tuple[str, int], host: str) -> None:
        super().__init__(daemon=True)
        self.args = (listen, target, host)
        self.statuses: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.statuses.append(_status(*self.args))
            except OSError:
                self.statuses.append(-1)

    def stop(self) -> list[int]:
        self.halt.set()
        self.join(10)
        return self.statuses


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_no_request_fails_across_a_learn_and_an_ageing(delta: bool) -> None:
    async with lazy_mesh(delta) as mesh:
        mesh.sim.eds_delay_seconds = 0.3
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta)
        listen = identity.proxy_config["proxyListenPort"]
        service = mesh.sim.mesh.services[B]
        target = ServicePort(B, mesh.port)
        cluster = cluster_name(target)
        caller = Caller(listen, (service.cluster_ip, mesh.port), B)
        caller.start()
        try:
            # The first calls go through the egress, which teaches xdsproxy; the sidecar then
            # goes direct once the cluster is warm.
            await eventually(
                lambda: sidecar.stat(f"cluster.{cluster}.upstream_rq_total") > 20, timeout=20
            )
            learned = len(caller.statuses)
            # Age the dependency out: the route goes back to the egress, then the cluster goes.
            # Learning is paused first, or the calls through the egress would teach the
            # dependency again at once and the cluster would (rightly) never leave.
            runtime = mesh.proxy.runtime

            async def paused(record, started):
                return None

            runtime.learner.observe = paused
            key = next(k for k in runtime.scopes if k.workload == "app")
            runtime.learner.ttl = 1.0
            runtime.scope(key).learned[target].evidence -= 10.0
            await runtime.learner.age()
            await eventually(
                lambda: cluster not in dynamic_config(sidecar.config_dump())["clusters"],
                timeout=20,
            )
            await asyncio.sleep(0.5)
        finally:
            statuses = await asyncio.to_thread(caller.stop)
        assert learned > 0 and len(statuses) > learned + 5
        failures = [s for s in statuses if s != 200]
        assert failures == [], f"{len(failures)} of {len(statuses)} calls failed: {failures[:5]}"
        assert sidecar.stat("cluster_manager.cluster_removed") >= 1  # the ageing did happen
