"""Learns that timing and replicas used to lose, measured with real Envoy sidecars.

- held: an access log entry arrives before the service's CDS reaches xdsproxy; from the
  service's arrival (the simulator's push) to the cluster in the sidecar Envoy.
- cross-replica: two replicas sharing the Kubernetes store (API server stand-in); the entry
  lands on the replica the calling pod is not connected to; from the entry being sent to the
  cluster in that pod's Envoy on the other replica.

Medians over `--runs` (a new service each run). Run: `python -m benchmarks.learn_timing`
(writes results/learn_timing.json and a section of RESULTS.md).
"""

import argparse
import asyncio
import json
import statistics
import time

from kubernetes import client

from benchmarks.report import save_json, update_section
from xdsproxy.harness.als import send_access_log
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.kubeapi import KubeApiStandIn
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy, running_sim
from xdsproxy.istio.names import ServicePort
from xdsproxy.sim.mesh import Endpoint, Port, Service, generate

EGRESS = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
SETTINGS = {"mode": "lazy", "egress": EGRESS, "als_listen": "127.0.0.1:0"}


def _has(envoy, cluster: str) -> bool:
    return cluster in dynamic_config(envoy.config_dump(include_eds=False))["clusters"]


async def held(runs: int) -> list[float]:
    samples = []
    async with running_sim(generate(100)) as sim:
        sim.debounce_seconds = 0.0
        async with (
            running_proxy(sim.port, als_allow=("127.0.0.0/8",), **SETTINGS) as proxy,
            running_envoy(proxy.port, identity=sidecar_identity("app-0", "127.0.0.2")) as envoy,
        ):
            await eventually(lambda: "8080" in dynamic_config(envoy.config_dump())["routes"])
            for run in range(runs):
                late = Service(
                    f"late-{run}",
                    "ns-1",
                    (Port(8080, "HTTP"),),
                    f"10.97.2.{run + 1}",
                    endpoints=(Endpoint("10.128.9.1", 8080),),
                )
                cluster = f"outbound|8080||{late.fqdn}"
                await asyncio.to_thread(send_access_log, proxy.als_port, "127.0.0.2", cluster)
                await eventually(lambda: len(proxy.runtime.learner.pending) == 1, timeout=10)
                start = time.perf_counter()
                sim.mutate(lambda m, late=late: m.add(late))
                await eventually(lambda c=cluster: _has(envoy, c), timeout=10, interval=0.005)
                samples.append((time.perf_counter() - start) * 1000)
    return samples


def _pod(name: str, ip: str) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns-0",
            "generateName": "app-7d9f5c-",
            "labels": {"app": "app", "pod-template-hash": "7d9f5c"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "app-7d9f5c",
                    "controller": True,
                    "uid": "rs",
                }
            ],
        },
        "spec": {"serviceAccountName": "app"},
        "status": {"phase": "Running", "podIP": ip},
    }


async def cross_replica(runs: int) -> list[float]:
    samples = []
    mesh = generate(100, tcp_every=0)
    services = [s for s in mesh.services.values() if s.kind == "eds"][4 : 4 + runs]
    with KubeApiStandIn() as api:
        api.apply_pod(_pod("app-7d9f5c-aaaaa", "127.0.0.2"))
        api.apply_pod(_pod("app-7d9f5c-bbbbb", "127.0.0.3"))

        def kube() -> client.ApiClient:
            return client.ApiClient(client.Configuration(host=api.url))

        settings = {**SETTINGS, "store": "kubernetes://istio-system", "als_allow": ("127.0.0.0/8",)}
        async with (
            running_sim(mesh) as sim,
            running_proxy(sim.port, kube_client=kube(), **settings) as one,
            running_proxy(sim.port, kube_client=kube(), **settings) as two,
            running_envoy(one.port, identity=sidecar_identity("app-1", "127.0.0.3")) as e1,
            running_envoy(two.port, identity=sidecar_identity("app-0", "127.0.0.2")) as e0,
        ):
            for envoy in (e0, e1):
                await eventually(lambda e=envoy: dynamic_config(e.config_dump())["routes"])
            for service in services:
                port = service.ports[0].number
                cluster = f"outbound|{port}||{service.fqdn}"
                start = time.perf_counter()
                await asyncio.to_thread(send_access_log, one.als_port, "127.0.0.2", cluster)
                await eventually(lambda c=cluster: _has(e0, c), timeout=10, interval=0.005)
                samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    result = {
        "held_ms": asyncio.run(held(args.runs)),
        "cross_replica_ms": asyncio.run(cross_replica(args.runs)),
    }
    print(json.dumps(result))
    save_json("learn_timing", result)
    rows = []
    for name, key, what in (
        ("entry before the service's CDS", "held_ms", "service pushed → cluster in Envoy"),
        ("entry on the other replica", "cross_replica_ms", "entry sent → cluster in Envoy"),
    ):
        values = result[key]
        rows.append(
            f"| {name} | {what} | {statistics.median(values):.0f} | {max(values):.0f} | "
            f"{len(values)} |"
        )
    update_section(
        [
            "## Learns across timing and replicas (`python -m benchmarks.learn_timing`)",
            "",
            "Real Envoy sidecars, in-process xdsproxy and simulator; the cross-replica case has "
            "two replicas sharing the Kubernetes store (API server stand-in) and watching pods.",
            "",
            "| case | measured | median ms | max ms | runs |",
            "|---|---|---:|---:|---:|",
            *rows,
        ]
    )


if __name__ == "__main__":
    main()
