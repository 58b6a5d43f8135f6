"""Two xdsproxy processes sharing state through the Kubernetes store (against the API server
stand-in): an edge learned through one reaches a real Envoy connected to the other."""

import asyncio

import pytest

from xdsproxy.harness.als import send_access_log
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import free_port
from xdsproxy.harness.kubeapi import KubeApiStandIn, write_kubeconfig
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import eventually, running_envoy, running_sim
from xdsproxy.model import WorkloadKey
from xdsproxy.sim.mesh import generate

pytestmark = pytest.mark.envoy


async def test_edge_learned_by_one_replica_reaches_envoy_on_the_other(tmp_path) -> None:
    cluster = "outbound|8080||svc-4.ns-0.svc.cluster.local"
    with KubeApiStandIn() as api:
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, api.url)
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
                    await asyncio.to_thread(send_access_log, first_als, "127.0.0.3", cluster)
                    await eventually(
                        lambda: cluster in dynamic_config(envoy_two.config_dump())["clusters"],
                        timeout=10,
                    )
                    assert ("istio-system", "ns-0.app") in api.state.objects
            finally:
                for proxy, _ in replicas:
                    await asyncio.to_thread(proxy.stop)


def _pod(name: str, ip: str, workload: str = "app", account: str = "app") -> dict:
    """A pod as a Deployment creates it: generated name, owned by a ReplicaSet."""
    pod_hash = "7d9f5c"
    return {
        "metadata": {
            "name": name,
            "namespace": "ns-0",
            "generateName": f"{workload}-{pod_hash}-",
            "labels": {"app": workload, "pod-template-hash": pod_hash},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{workload}-{pod_hash}",
                    "controller": True,
                    "uid": "rs",
                }
            ],
        },
        "spec": {"serviceAccountName": account},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


async def test_an_entry_on_the_replica_without_the_sidecar_is_learned(tmp_path) -> None:
    """The egress's access logs land on replica one; the calling pod (app-0) is connected to
    replica two. Replica one holds another pod of the same workload (app-1), so it knows the
    mesh's services but not app-0's IP: only the pods watched from the API tell it."""
    from kubernetes import client

    from xdsproxy.harness.stack import running_proxy
    from xdsproxy.istio.names import ServicePort

    cluster = "outbound|8080||svc-4.ns-0.svc.cluster.local"
    service = ServicePort("svc-4.ns-0.svc.cluster.local", 8080)
    egress = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
    with KubeApiStandIn() as api:
        api.apply_pod(_pod("app-7d9f5c-aaaaa", "127.0.0.2"))
        api.apply_pod(_pod("app-7d9f5c-bbbbb", "127.0.0.3"))
        api.apply_pod(_pod("other-7d9f5c-ccccc", "127.0.0.4", workload="other", account="other"))

        def kube() -> client.ApiClient:
            return client.ApiClient(client.Configuration(host=api.url))

        async with running_sim(generate(40)) as sim:
            settings = {
                "mode": "lazy",
                "egress": egress,
                "store": "kubernetes://istio-system",
                "als_listen": "127.0.0.1:0",
                "als_allow": ("127.0.0.0/8",),
            }
            async with (
                running_proxy(sim.port, kube_client=kube(), **settings) as one,
                running_proxy(sim.port, kube_client=kube(), **settings) as two,
                running_envoy(one.port, identity=sidecar_identity("app-1", "127.0.0.3")) as e1,
                running_envoy(two.port, identity=sidecar_identity("app-0", "127.0.0.2")) as e0,
            ):
                for envoy in (e0, e1):
                    await eventually(
                        lambda e=envoy: "8080" in dynamic_config(e.config_dump())["routes"]
                    )
                assert cluster not in dynamic_config(e0.config_dump())["clusters"]
                # A forged claim (an IP of no pod claiming app) is still rejected.
                await asyncio.to_thread(send_access_log, one.als_port, "127.0.0.50", cluster)
                await eventually(
                    lambda: (
                        one.runtime.metrics.value(
                            "xdsproxy_als_rejections_total", {"reason": "forged_source"}
                        )
                        == 1
                    )
                )
                # The other workload's pod claiming app: the claim is ignored, not learned for app.
                await asyncio.to_thread(send_access_log, one.als_port, "127.0.0.4", cluster)
                await eventually(
                    lambda: (
                        one.runtime.metrics.value(
                            "xdsproxy_als_rejections_total", {"reason": "forged_claim"}
                        )
                        == 1
                    )
                )
                app = one.runtime.scope(WorkloadKey("ns-0", "app"))
                assert service not in app.learned
                # app-0's request, logged by the replica app-0 is not connected to.
                await asyncio.to_thread(send_access_log, one.als_port, "127.0.0.2", cluster)
                await eventually(
                    lambda: cluster in dynamic_config(e0.config_dump())["clusters"], timeout=10
                )
                assert service in app.learned
