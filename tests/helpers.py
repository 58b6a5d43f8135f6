"""Helpers several test modules share, so that no test module imports another. What the demo
and the benchmarks use too lives in `xdsproxy.harness`; the real dumps load through
`tests.istio_fixtures`."""

import functools
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import Node

from tests.istio_fixtures import dump_files, load_dump
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.istio.names import ServicePort, cluster_name, outbound_cluster
from xdsproxy.istio.node import IstioNode, parse_node
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.tunnel import placeholder_cluster
from xdsproxy.sim.istiod import Snapshot
from xdsproxy.sim.mesh import Mesh, generate
from xdsproxy.wire import typeurls
from xdsproxy.xds.sotw import SotwStream

CDS, LDS, RDS = typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE
EGRESS = "outbound|80||lazy-egress.istio-system.svc.cluster.local"
APP = WorkloadKey("ns-0", "app")
APP_IP = "10.1.0.5"

# -- HTTP ---------------------------------------------------------------------------------


def get_json(port: int, path: str) -> tuple[int, Any]:
    """GET from a loopback debug or admin endpoint: the status and the JSON (or text) body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            code, body = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        code, body = error.code, error.read().decode()
    try:
        return code, json.loads(body)
    except json.JSONDecodeError:
        return code, body


def server_credentials(pki: dict[str, Path]) -> grpc.ServerCredentials:
    """A TLS server's credentials from the `pki` fixture."""
    return grpc.ssl_server_credentials([(pki["key"].read_bytes(), pki["cert"].read_bytes())])


# -- what Istiod sends a sidecar (pure) ---------------------------------------------------


def istio_node(namespace: str) -> IstioNode:
    """A sidecar of workload `app` in `namespace`, as Istio names it."""
    from tests.xds_messages import node

    n = node(f"sidecar~10.0.0.1~app-0.{namespace}~{namespace}.svc.cluster.local")
    n.metadata.update({"NAMESPACE": namespace})
    return parse_node(n)


def upstream_of(mesh: Mesh) -> dict:
    """CDS, LDS and RDS as the simulator serves them to a sidecar in `ns-0`."""
    snapshot = Snapshot(mesh, "2026-11-22T10:00:00Z", None)
    resources = {t: snapshot.resources(t, istio_node("ns-0")) for t in (CDS, LDS, RDS)}
    return {t: tuple(zip(*r.items(), strict=True)) for t, r in resources.items()}


def upstream_from_dump(dump) -> dict:
    """CDS, LDS and RDS of a real sidecar's config dump, as (names, bodies) per type."""
    return {
        t: (
            tuple(n for n, _ in dump.resources.get(t, [])),
            tuple(b for _, b in dump.resources.get(t, [])),
        )
        for t in (CDS, LDS, RDS)
    }


@functools.cache
def sim_upstream() -> dict:
    """The simulator's 300-service mesh, named ports."""
    return upstream_of(generate(300))


@functools.cache
def upstreams() -> dict[str, dict]:
    """Every real dump, and the simulator on the realistic profile, by name."""
    return {path.name: upstream_from_dump(load_dump(path)) for path in dump_files()} | {
        "simulator, realistic profile": upstream_of(generate(200, profile="realistic"))
    }


def scope_of(services) -> Scope:
    """Workload `ns-0/app`'s scope, having learned `services`."""
    scope = Scope(WorkloadKey("ns-0", "app"))
    for service in services:
        scope.learn(service, 1.0)
    return scope


def is_placeholder_body(name: str, body: bytes) -> bool:
    parsed = outbound_cluster(name)
    return parsed is not None and body == placeholder_cluster(name, parsed[0])


class Directory:
    """Attribution's view of the mesh: workload `ns-0/app` at `APP_IP`, nothing else."""

    def workloads_at(self, ip: str) -> frozenset[WorkloadKey]:
        return frozenset({APP}) if ip == APP_IP else frozenset()

    def service_accounts(self, workload: WorkloadKey) -> frozenset[str]:
        return frozenset()


# -- a real Envoy's config dump and stats -------------------------------------------------

EGRESS_REQUESTS = "http.xdsproxy_lazy_egress.downstream_rq_total"
DRAIN_SECONDS = 2
_REJECTED = ("cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected")


def dumped_clusters(envoy) -> dict[str, dict]:
    clusters = dynamic_config(envoy.config_dump(include_eds=False))["clusters"]
    return {name: body for name, (_, body) in clusters.items()}


def is_placeholder(cluster: dict) -> bool:
    """A cluster as Envoy dumps it that goes to the internal tunnel listener."""
    endpoints = cluster.get("load_assignment", {}).get("endpoints", [])
    return any(
        "envoy_internal_address" in lb["endpoint"]["address"]
        for group in endpoints
        for lb in group.get("lb_endpoints", [])
    )


def service_cluster(service) -> str:
    """The outbound cluster of a simulated service's first port."""
    return cluster_name(ServicePort(service.fqdn, service.ports[0].number))


def greeting(conn: socket.socket) -> bytes:
    return conn.recv(64)


def named_clusters(node: object) -> set[str]:
    """Every `cluster` a piece of Envoy's config dump names (tcp_proxy, inline routes)."""
    if isinstance(node, dict):
        found = {node["cluster"]} if isinstance(node.get("cluster"), str) else set()
        return found.union(*(named_clusters(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(named_clusters(v) for v in node))
    return set()


def rejected(envoy) -> int:
    """CDS and LDS updates Envoy rejected."""
    return sum(envoy.stat(name) for name in _REJECTED)


class StandInSession:
    """Enough of a server session for the runtime: an id, a real SotW stream with its node,
    and what it was told changed (`refresh(inputs)` queues pushes on a real session)."""

    def __init__(self, node: Node) -> None:
        self.id = id(self)
        self.stream = SotwStream()
        self.stream.node = node
        self.refreshed: list[frozenset[str]] = []

    def refresh(self, inputs: frozenset[str]) -> None:
        self.refreshed.append(inputs)


def sidecar_node(ip: str, workload: str, labels: dict | None = None) -> Node:
    """A sidecar's node in `ns-0`, with the metadata the runtime reads."""
    node = Node(id=f"sidecar~{ip}~{workload}-0.ns-0~ns-0.svc.cluster.local")
    node.metadata.update(
        {"NAMESPACE": "ns-0", "WORKLOAD_NAME": workload, "INSTANCE_IPS": ip, "LABELS": labels or {}}
    )
    return node


def istio_sidecar_node(namespace: str, workload: str, ip: str) -> Node:
    """An Istio 1.28 sidecar as pilot-agent describes it to Istiod (no pod behind it)."""
    node = Node(id=f"sidecar~{ip}~{workload}-0.{namespace}~{namespace}.svc.cluster.local")
    node.metadata.update(
        {
            "NAMESPACE": namespace,
            "WORKLOAD_NAME": workload,
            "ISTIO_VERSION": "1.28.0",
            "CLUSTER_ID": "Kubernetes",
            "INSTANCE_IPS": ip,
            "LABELS": {"app": workload},
        }
    )
    return node


# The mesh the suite against Istio's own Istiod runs on (tests/istiod)
ISTIOD_MESH = (Path(__file__).parent / "istiod" / "mesh.yaml").read_text()
