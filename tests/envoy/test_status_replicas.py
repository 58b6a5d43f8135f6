"""`xdsproxy status` across two replicas (child processes) with real Envoys: the replicas are
found from the Service's EndpointSlices (Kubernetes API stand-in) or given with --debug."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from xdsproxy.harness.kubeapi import KubeApiStandIn, write_kubeconfig
from xdsproxy.harness.lazymesh import sidecar_identity
from xdsproxy.harness.process import ProxyProcess
from xdsproxy.harness.stack import eventually, running_envoy, running_sim
from xdsproxy.sim.mesh import generate

pytestmark = pytest.mark.envoy


def _status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xdsproxy.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


async def test_one_row_per_sidecar_across_both_replicas(tmp_path) -> None:
    with KubeApiStandIn() as api:
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, api.url)
        async with running_sim(generate(20)) as sim:
            replicas = [
                ProxyProcess(
                    "--upstream",
                    f"127.0.0.1:{sim.port}",
                    "--upstream-plaintext",
                    env={"POD_NAME": f"xdsproxy-{name}"},
                )
                for name in ("a", "b")
            ]
            try:
                for proxy in replicas:
                    await asyncio.to_thread(proxy.start)
                for proxy, name in zip(replicas, ("a", "b"), strict=True):
                    api.add_endpoint_slice(
                        "istio-system",
                        "xdsproxy",
                        [("127.0.0.1", f"xdsproxy-{name}", True)],
                        {"grpc-xds": proxy.port, "http-admin": proxy.admin_port},
                    )
                api.add_endpoint_slice(  # not ready: not read
                    "istio-system", "xdsproxy", [("127.0.0.9", "xdsproxy-c", False)], {}
                )
                async with (
                    running_envoy(
                        replicas[0].port, identity=sidecar_identity("app-0", "127.0.0.2")
                    ),
                    running_envoy(
                        replicas[1].port, identity=sidecar_identity("app-1", "127.0.0.3")
                    ),
                ):
                    env = {"KUBECONFIG": str(kubeconfig)}

                    def both_synced() -> bool:
                        out = _status("--service", "istio-system/xdsproxy", "--json", env=env)
                        rows = json.loads(out.stdout) if out.returncode == 0 else []
                        return len(rows) == 2 and all(
                            t["state"] == "SYNCED" for r in rows for t in r["types"].values()
                        )

                    await eventually(both_synced, timeout=20)
                    out = _status("--service", "istio-system/xdsproxy", env=env)
                    assert out.returncode == 0, out.stderr
                    rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines()[1:3]}
                    assert set(rows) == {"app-0.ns-0", "app-1.ns-0"}
                    assert "xdsproxy-a" in rows["app-0.ns-0"] and "xdsproxy-b" in rows["app-1.ns-0"]
                    assert f"127.0.0.1:{sim.port}" in rows["app-1.ns-0"]

                    # --debug, repeatable, URL or HOST:PORT; lookup by pod name on either replica.
                    urls = ["--debug", f"127.0.0.1:{replicas[0].admin_port}"]
                    urls += ["--debug", f"http://127.0.0.1:{replicas[1].admin_port}"]
                    detail = _status(*urls, "app-1")
                    assert detail.returncode == 0, detail.stderr
                    assert "replica:   xdsproxy-b" in detail.stdout
                    assert _status(*urls, "app-1.ns-0").stdout == detail.stdout
                    missing = _status(*urls, "nobody")
                    assert missing.returncode == 1 and "no sidecar named 'nobody'" in missing.stderr

                    # One replica down: the other's rows, and a line saying which did not answer.
                    await asyncio.to_thread(replicas[1].stop)
                    out = _status(*urls)
                    assert out.returncode == 0 and "app-0.ns-0" in out.stdout
                    assert "app-1.ns-0" not in out.stdout and "not answering" in out.stdout
            finally:
                for proxy in replicas:
                    await asyncio.to_thread(proxy.stop)


def test_a_service_with_no_endpoint_slices_is_a_clear_error(tmp_path) -> None:
    with KubeApiStandIn() as api:
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, api.url)
        out = _status("--service", "istio-system/xdsproxy", env={"KUBECONFIG": str(kubeconfig)})
    assert out.returncode == 1 and "no ready endpoint" in out.stderr
    bad = _status("--service", "xdsproxy")
    assert bad.returncode == 1 and "NAMESPACE/NAME" in bad.stderr
