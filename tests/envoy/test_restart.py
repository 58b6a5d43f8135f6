"""Restart without churn: SIGKILL xdsproxy, start it again, and a learned cluster never leaves
the real Envoy, for SotW and Delta."""

import asyncio
import threading
import time
import urllib.parse

import pytest

from xdsproxy.harness.als import send_access_log
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import free_port
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import eventually, running_envoy, running_sim
from xdsproxy.sim.mesh import generate

pytestmark = pytest.mark.envoy

LEARNED = "svc-4.ns-0.svc.cluster.local"


class Sampler(threading.Thread):
    """Polls Envoy's admin for one cluster, as fast as it answers, until stopped."""

    def __init__(self, envoy, cluster: str) -> None:
        super().__init__(daemon=True)
        self.envoy, self.cluster = envoy, cluster
        self.samples: list[bool] = []
        self.failures = 0
        self.halt = threading.Event()

    def run(self) -> None:
        query = urllib.parse.urlencode(
            {"resource": "dynamic_active_clusters", "name_regex": self.cluster.replace("|", "\\|")}
        )
        while not self.halt.is_set():
            try:
                body = self.envoy.get(f"/config_dump?{query}", timeout=5)
                self.samples.append(self.cluster.encode() in body)
            except OSError:
                self.failures += 1
            time.sleep(0.01)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_sigkill_and_restart_keep_the_learned_cluster(delta: bool, tmp_path) -> None:
    mesh = generate(40)
    cluster = f"outbound|8080||{LEARNED}"
    async with running_sim(mesh) as sim:
        als_port = free_port()
        args = (
            "--upstream",
            f"127.0.0.1:{sim.port}",
            "--upstream-plaintext",
            "--mode",
            "lazy",
            "--egress",
            "lazy-egress.istio-system.svc.cluster.local:80",
            "--store",
            f"sqlite://{tmp_path}/edges.db",
            "--als-listen",
            f"127.0.0.1:{als_port}",
            "--als-allow",
            "127.0.0.0/8",
            "--als-advertise",
            f"127.0.0.1:{als_port}",
        )
        proxy = ProxyProcess(*args)
        await asyncio.to_thread(proxy.start)
        try:
            identity = sidecar_identity("app-0", "127.0.0.2")
            async with running_envoy(proxy.port, delta, identity) as envoy:
                await eventually(lambda: "8080" in dynamic_config(envoy.config_dump())["routes"])
                assert cluster not in dynamic_config(envoy.config_dump())["clusters"]
                await asyncio.to_thread(send_access_log, als_port, "127.0.0.2", cluster)
                await eventually(lambda: cluster in dynamic_config(envoy.config_dump())["clusters"])
                updates = envoy.stat("cluster_manager.cds.update_success")

                sampler = Sampler(envoy, cluster)
                sampler.start()
                await asyncio.sleep(0.5)
                await asyncio.to_thread(proxy.kill)
                await eventually(
                    lambda: envoy.stat("control_plane.connected_state") == 0, timeout=10
                )
                await asyncio.sleep(0.5)
                await asyncio.to_thread(proxy.start)
                await eventually(
                    lambda: envoy.stat("control_plane.connected_state") == 1, timeout=20
                )
                # The new process has pushed CDS (and Envoy applied it) after the restart.
                await eventually(
                    lambda: envoy.stat("cluster_manager.cds.update_success") > updates, timeout=20
                )
                await asyncio.sleep(1.0)
                sampler.halt.set()
                await asyncio.to_thread(sampler.join, 10)
                assert len(sampler.samples) > 20
                assert all(sampler.samples), "the learned cluster left Envoy during the restart"
                assert cluster in dynamic_config(envoy.config_dump())["clusters"]
        finally:
            await asyncio.to_thread(proxy.stop)
