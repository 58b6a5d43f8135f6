"""How long an operator's `xdsproxy scope add` and `forget`, made through one replica, take to
reach a real Envoy connected to the other replica (the issue's target: within a second).

Two xdsproxy processes share the Kubernetes store (the API server stand-in: no cluster runs
here), each with one real Envoy of the same workload, in front of the simulated Istiod. Each
run adds a service through replica a's admin endpoint and times until the Envoy on replica b
holds its cluster, then forgets it and times until that Envoy has dropped it. Medians over
`--runs`. Run: `python -m benchmarks.scope_writes` (writes results/scope_writes.json and a
section of RESULTS.md).
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import save_json, update_section
from xdsproxy.debug.status import fetch
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import free_port
from xdsproxy.harness.kubeapi import KubeApiStandIn, write_kubeconfig
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import eventually, running_envoy, running_sim
from xdsproxy.sim.mesh import generate


def _replica(name: str, sim_port: int, kubeconfig: Path) -> ProxyProcess:
    als = free_port()
    return ProxyProcess(
        *("--upstream", f"127.0.0.1:{sim_port}", "--upstream-plaintext", "--mode", "lazy"),
        *("--egress", "lazy-egress.istio-system.svc.cluster.local:80"),
        *("--store", "kubernetes://istio-system", "--admin-writes", "--log-level", "warning"),
        *("--als-listen", f"127.0.0.1:{als}", "--als-advertise", f"127.0.0.1:{als}"),
        env={"KUBECONFIG": str(kubeconfig), "POD_NAME": f"xdsproxy-{name}"},
    )


async def measure(runs: int, services: int) -> dict[str, list[float]]:
    mesh = generate(services, namespaces=2)
    # HTTP services of the mesh, one per run, none called before.
    targets = [
        (s.fqdn, s.ports[0].number)
        for s in mesh.services.values()
        if s.kind == "eds" and s.ports[0].protocol == "HTTP"
    ][:runs]
    add, forget = [], []
    with KubeApiStandIn() as api, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        write_kubeconfig(kubeconfig, api.url)
        async with running_sim(mesh) as sim:
            replicas = [_replica(name, sim.port, kubeconfig) for name in ("a", "b")]
            try:
                for proxy in replicas:
                    await asyncio.to_thread(proxy.start)
                writer = f"http://127.0.0.1:{replicas[0].admin_port}"
                async with (
                    running_envoy(
                        replicas[0].port, identity=sidecar_identity("app-0", "127.0.0.2")
                    ),
                    running_envoy(
                        replicas[1].port, identity=sidecar_identity("app-1", "127.0.0.3")
                    ) as watched,
                ):

                    def clusters() -> set[str]:
                        return set(dynamic_config(watched.config_dump())["clusters"])

                    await eventually(lambda: len(clusters()) > 2, timeout=60)
                    for host, port in targets:
                        cluster = f"outbound|{port}||{host}"
                        body = {"workload": "ns-0/app", "service": f"{host}:{port}"}
                        start = time.perf_counter()
                        await asyncio.to_thread(fetch, writer, "/admin/scope/add", "POST", body)
                        await eventually(lambda c=cluster: c in clusters(), 30, 0.005)
                        add.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        await asyncio.to_thread(fetch, writer, "/admin/scope/forget", "POST", body)
                        await eventually(lambda c=cluster: c not in clusters(), 30, 0.005)
                        forget.append(time.perf_counter() - start)
            finally:
                for proxy in replicas:
                    await asyncio.to_thread(proxy.stop)
    return {"add_s": add, "forget_s": forget}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--services", type=int, default=1000)
    args = parser.parse_args()
    result = {"services": args.services, **asyncio.run(measure(args.runs, args.services))}
    print(json.dumps(result))
    save_json("scope_writes", result)

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.0f} (max {max(values) * 1000:.0f})"

    update_section(
        [
            "## Operator scope writes across replicas (`python -m benchmarks.scope_writes`)",
            "",
            f"`scope add` and `scope forget` through replica a's admin endpoint; milliseconds "
            f"until the real Envoy on replica b holds (or has dropped) the service's cluster. "
            f"Two replicas sharing the Kubernetes store (API server stand-in), a simulated "
            f"Istiod of {args.services} services; medians of {len(result['add_s'])} runs.",
            "",
            "| add reaches the other replica's Envoy | forget reaches it |",
            "|---:|---:|",
            f"| {cell(result['add_s'])} | {cell(result['forget_s'])} |",
        ]
    )


if __name__ == "__main__":
    main()
