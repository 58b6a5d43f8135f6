"""Two xdsproxy processes sharing state through the Kubernetes store (against the API server
stand-in): an edge learned through one reaches a real Envoy connected to the other."""

import asyncio
import json

import pytest

from tests.test_restart import _access_log
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import free_port
from xdsproxy.harness.kubeapi import KubeApiStandIn
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import eventually, running_envoy, running_sim
from xdsproxy.sim.mesh import generate

pytestmark = pytest.mark.envoy


def _kubeconfig(path, url: str) -> None:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "standin",
                "clusters": [{"name": "standin", "cluster": {"server": url}}],
                "users": [{"name": "standin", "user": {}}],
                "contexts": [
                    {"name": "standin", "context": {"cluster": "standin", "user": "standin"}}
                ],
            }
        )
    )


async def test_edge_learned_by_one_replica_reaches_envoy_on_the_other(tmp_path) -> None:
    cluster = "outbound|8080||svc-4.ns-0.svc.cluster.local"
    with KubeApiStandIn() as api:
        kubeconfig = tmp_path / "kubeconfig"
        _kubeconfig(kubeconfig, api.url)
        async with running_sim(generate(40)) as sim:
            replicas = []
            for _ in range(2):
                als = free_port()
                replicas.append(
                    (
                        ProxyProcess(
                            "--upstream",
                            f"127.0.0.1:{sim.port}",
                            "--upstream-plaintext",
                            "--mode",
                            "lazy",
                            "--egress",
                            "lazy-egress.istio-system.svc.cluster.local:80",
                            "--store",
                            "kubernetes://istio-system",
                            "--als-listen",
                            f"127.0.0.1:{als}",
                            "--als-allow",
                            "127.0.0.0/8",
                            "--als-advertise",
                            f"127.0.0.1:{als}",
                            env={"KUBECONFIG": str(kubeconfig)},
                        ),
                        als,
                    )
                )
            try:
                for proxy, _ in replicas:
                    await asyncio.to_thread(proxy.start)
                (first, first_als), (second, _) = replicas
                learner = sidecar_identity("app-1", "127.0.0.3")
                watcher = sidecar_identity("app-0", "127.0.0.2")
                async with (
                    running_envoy(first.port, identity=learner) as envoy_one,
                    running_envoy(second.port, identity=watcher) as envoy_two,
                ):
                    for envoy in (envoy_one, envoy_two):
                        await eventually(
                            lambda e=envoy: "8080" in dynamic_config(e.config_dump())["routes"]
                        )
                    assert cluster not in dynamic_config(envoy_two.config_dump())["clusters"]
                    # The egress of replica one saw app-1 reach svc-4.
                    await asyncio.to_thread(_access_log, first_als, "127.0.0.3", cluster)
                    await eventually(
                        lambda: cluster in dynamic_config(envoy_two.config_dump())["clusters"],
                        timeout=10,
                    )
                    assert ("istio-system", "ns-0.app") in api.state.objects
            finally:
                for proxy, _ in replicas:
                    await asyncio.to_thread(proxy.stop)
