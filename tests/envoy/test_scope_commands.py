"""`xdsproxy config` and `xdsproxy scope why|add|forget|export` against two lazy replicas
(child processes) sharing the Kubernetes store (API stand-in), each with a real Envoy: writes
made through one replica reach the Envoy on the other within a second or two."""

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import yaml

from xdsproxy.harness.als import send_access_log
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import free_port
from xdsproxy.harness.kubeapi import KubeApiStandIn, write_kubeconfig
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import eventually, running_envoy, running_sim
from xdsproxy.sim.mesh import generate

pytestmark = pytest.mark.envoy

SVC4 = "svc-4.ns-0.svc.cluster.local"
SVC7 = "svc-7.ns-1.svc.cluster.local"
LEARNED = f"outbound|8080||{SVC4}"
ADDED = f"outbound|8080||{SVC7}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xdsproxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
    )


def _ok(*args: str) -> str:
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout


@contextlib.asynccontextmanager
async def _two_replicas(tmp_path, sim_port: int, api_url: str) -> AsyncIterator[list]:
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, api_url)
    replicas = []
    for name in ("a", "b"):
        als = free_port()
        proxy = ProxyProcess(
            *("--upstream", f"127.0.0.1:{sim_port}", "--upstream-plaintext", "--mode", "lazy"),
            *("--egress", "lazy-egress.istio-system.svc.cluster.local:80"),
            *("--store", "kubernetes://istio-system", "--admin-writes"),
            *("--als-listen", f"127.0.0.1:{als}", "--als-allow", "127.0.0.0/8"),
            *("--als-advertise", f"127.0.0.1:{als}"),
            env={"KUBECONFIG": str(kubeconfig), "POD_NAME": f"xdsproxy-{name}"},
        )
        replicas.append((proxy, als))
    try:
        for proxy, _ in replicas:
            await asyncio.to_thread(proxy.start)
        yield replicas
    finally:
        for proxy, _ in replicas:
            await asyncio.to_thread(proxy.stop)


async def test_config_and_scope_commands_across_two_replicas(tmp_path) -> None:
    with KubeApiStandIn() as api:
        async with (
            running_sim(generate(40)) as sim,
            _two_replicas(tmp_path, sim.port, api.url) as replicas,
        ):
            (first, first_als), (second, _) = replicas
            labels = {"version": "v1", "pod-template-hash": "7d9f5c"}
            async with (
                running_envoy(
                    first.port, identity=sidecar_identity("app-1", "127.0.0.3", labels=labels)
                ) as on_first,
                running_envoy(
                    second.port, identity=sidecar_identity("app-0", "127.0.0.2", labels=labels)
                ) as on_second,
            ):
                envoys = (on_first, on_second)
                for envoy in envoys:
                    await eventually(
                        lambda e=envoy: "8080" in dynamic_config(e.config_dump())["routes"]
                    )
                debug = ["--debug", f"127.0.0.1:{first.admin_port}"]
                debug += ["--debug", f"127.0.0.1:{second.admin_port}"]

                def clusters(envoy) -> set[str]:
                    return set(dynamic_config(envoy.config_dump())["clusters"])

                # config: what was pushed, as a table; --diff names what was withheld.
                table = _ok("config", "clusters", "app-1", *debug)
                assert table.splitlines()[0].split()[:3] == ["SERVICE", "FQDN", "PORT"]
                assert "PassthroughCluster" in table.split()
                assert SVC4 not in table
                diff = _ok("config", "clusters", "app-1.ns-0", *debug, "--diff", "--fqdn", SVC4)
                assert f"withheld  {LEARNED}" in diff
                listeners = _ok("config", "listeners", "ns-0/app", *debug)
                assert "virtualOutbound" in listeners or "0.0.0.0" in listeners
                assert _ok("config", "endpoints", "app-0", *debug).startswith("no endpoints")

                # why, before: never seen.
                before = _ok("scope", "why", "app-0", f"{SVC4}:8080", *debug)
                assert "NOT IN SCOPE" in before and "no request from this workload" in before

                # A learn through replica a reaches the Envoy on replica b; why says by whom.
                await asyncio.to_thread(send_access_log, first_als, "127.0.0.3", LEARNED)
                await eventually(lambda: LEARNED in clusters(on_second), timeout=10)
                after = _ok("scope", "why", "ns-0/app", f"{SVC4}:8080", *debug)
                assert "IN SCOPE" in after and "learned by xdsproxy-a" in after
                assert f"cluster {LEARNED}: direct" in after
                assert "xdsproxy-a, xdsproxy-b" in after  # both replicas agree
                assert SVC4 in _ok("config", "clusters", "app-0", *debug, "--fqdn", SVC4)
                endpoints = _ok("config", "endpoints", "app-0", *debug, "--fqdn", SVC4)
                assert endpoints.split()[:3] == ["ENDPOINT", "STATUS", "CLUSTER"]
                assert LEARNED in endpoints

                # add through replica b (app-0's): both Envoys get it.
                said = _ok("scope", "add", "app-0", "svc-7.ns-1", *debug)  # every port
                assert "added 1" in said and "xdsproxy-b" in said
                for envoy in envoys:
                    await eventually(lambda e=envoy: ADDED in clusters(e), timeout=10)
                added = _ok("scope", "why", "ns-0/app", SVC7, *debug)
                assert "learned by operator via xdsproxy-b" in added

                # forget through replica a: the Envoy on replica b loses it too.
                said = _ok("scope", "forget", "ns-0/app", SVC4, *debug)
                assert "forgot 1" in said
                for envoy in envoys:
                    await eventually(lambda e=envoy: LEARNED not in clusters(e), timeout=10)
                gone = _ok("scope", "why", "ns-0/app", f"{SVC4}:8080", *debug)
                assert "NOT IN SCOPE" in gone and "forgotten at" in gone and "IN SCOPE:" not in gone
                assert ADDED in clusters(on_second)  # the forget took only what it named

                # export: a Sidecar per workload, its selector without generated labels.
                exported = list(yaml.safe_load_all(_ok("scope", "export", *debug)))
                sidecars = [d for d in exported if d]
                assert len(sidecars) == 1
                sidecar = sidecars[0]
                assert sidecar["apiVersion"] == "networking.istio.io/v1"
                assert sidecar["kind"] == "Sidecar"
                assert sidecar["metadata"] == {**sidecar["metadata"], "namespace": "ns-0"}
                assert sidecar["spec"]["workloadSelector"]["labels"] == {
                    "app": "app",
                    "version": "v1",
                }
                hosts = sidecar["spec"]["egress"][0]["hosts"]
                assert f"ns-1/{SVC7}" in hosts and f"ns-0/{SVC4}" not in hosts
