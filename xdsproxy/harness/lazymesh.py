"""A whole lazy mesh on loopback: simulator, lazy xdsproxy, sidecar and egress Envoys, backends."""

import asyncio
import dataclasses
import json
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.envoy import Envoy, SidecarIdentity
from xdsproxy.harness.http import (
    Backend,
    EchoServer,
    answers,
    connect_via_sidecar,
    free_port,
    request_via_sidecar,
)
from xdsproxy.harness.pki import Authority
from xdsproxy.harness.sds import SdsServer
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.scope.contract import EGRESS_ROLE, EGRESS_ROLE_LABEL
from xdsproxy.scope.egress import EgressSettings
from xdsproxy.server.app import ProxyServer
from xdsproxy.sim.mesh import Endpoint, Mesh, Port, Service, generate
from xdsproxy.sim.server import SimServer

EGRESS_HOST = "lazy-egress.istio-system.svc.cluster.local"


def sidecar_identity(
    pod: str,
    ip: str,
    namespace: str = "ns-0",
    workload: str = "app",
    labels: dict[str, str] | None = None,
    istio_stats: bool = False,
) -> SidecarIdentity:
    return SidecarIdentity(
        pod=pod,
        namespace=namespace,
        workload=workload,
        ip=ip,
        labels=labels or {},
        proxy_config={"proxyListenPort": free_port(), "proxyInboundListenPort": free_port()},
        istio_stats=istio_stats,
    )


@dataclass
class LazyMesh:
    sim: SimServer
    proxy: ProxyServer
    egress: Envoy
    port: int  # the mesh's HTTP port
    backends: dict[str, Backend]
    stack: AsyncExitStack
    mesh_ca: "MeshCa | None" = None
    sidecars: list[Envoy] = field(default_factory=list)
    # TCP and sniffed services with a live backend (realistic profile), by role.
    tcp: dict[str, tuple[Service, EchoServer]] = field(default_factory=dict)

    async def add_sidecar(
        self, identity: SidecarIdentity, delta: bool, drain_seconds: int | None = None
    ) -> Envoy:
        sds_port = None
        if self.mesh_ca is not None:
            sds_port = await asyncio.to_thread(self.mesh_ca.enrol, identity)
        envoy = await self.stack.enter_async_context(
            running_envoy(self.proxy.port, delta, identity, sds_port, drain_seconds)
        )
        self.sidecars.append(envoy)
        await eventually(lambda: str(self.port) in dynamic_config(envoy.config_dump())["routes"])
        return envoy


class MeshCa:
    """Istio's CA and each proxy's agent, as stand-ins: a root, and an SDS server that hands
    every enrolled Envoy its own SPIFFE certificate."""

    def __init__(self) -> None:
        self.authority = Authority(Path(tempfile.mkdtemp(prefix="xdsproxy-pki-")))
        self.sds = SdsServer(self.authority.cert.read_bytes(), {})

    def enrol(self, identity: SidecarIdentity) -> int:
        account = str(identity.node()["metadata"]["SERVICE_ACCOUNT"])
        issued = self.authority.workload(identity.namespace, account)
        self.sds.workloads[identity.node_id] = issued
        return self.sds.port


def build_mesh(
    port: int, backends: dict[str, Backend], egress_port: int, mtls: bool = False
) -> Mesh:
    mesh = generate(12, namespaces=2, http_ports=(port,))
    mesh.auto_mtls = mtls
    a, b = "svc-3.ns-1.svc.cluster.local", "svc-4.ns-0.svc.cluster.local"
    # svc-3 has subsets v1/v2; all traffic to v2, so only the weighted route can reach backend b.
    service_a = mesh.services[a]
    mesh.services[a] = Service(
        service_a.name,
        service_a.namespace,
        service_a.ports,
        service_a.cluster_ip,
        subsets=(("v1", 0), ("v2", 100)),
        endpoints=(
            Endpoint("127.0.0.1", backends["a"].port, "v1"),
            Endpoint("127.0.0.1", backends["b"].port, "v2"),
        ),
    )
    mesh.set_endpoints(b, [Endpoint("127.0.0.1", backends["c"].port)])
    mesh.add(egress_service(port, egress_port, mtls))
    return mesh


def served_mesh(n: int, backend_port: int, egress_port: int, egress_service_port: int) -> Mesh:
    """A mesh of `n` services whose every EDS endpoint (subsets included) is one loopback
    backend, and the egress: first requests through it reach a real server."""
    mesh = generate(n)
    for service in list(mesh.services.values()):
        if service.kind == "eds":
            subsets = [name for name, _ in service.subsets] or [""]
            mesh.set_endpoints(
                service.fqdn, [Endpoint("127.0.0.1", backend_port, s) for s in subsets]
            )
    mesh.add(egress_service(egress_service_port, egress_port))
    return mesh


def egress_service(port: int, endpoint_port: int, mtls: bool = False) -> Service:
    """The egress as Istiod knows it: a mesh service whose endpoint is the egress listener."""
    return Service(
        "lazy-egress",
        "istio-system",
        (Port(port, "HTTP"),),
        "10.96.250.1",
        endpoints=(Endpoint("127.0.0.1", endpoint_port, istio_mtls=mtls),),
    )


@asynccontextmanager
async def lazy_stack(
    mesh: Mesh,
    egress_port: int,
    egress_service_port: int,
    delta: bool = False,
    usage_sample_percent: float = 0.0,
    mesh_ca: MeshCa | None = None,
    lazy_tcp: str = "placeholders",
    lazy_sniffed: str = "placeholders",
    admin_writes: bool = False,
    store: str = "memory://",
) -> AsyncIterator[tuple[SimServer, ProxyServer, Envoy]]:
    """The simulator (with PROXY-protocol interception), a lazy xdsproxy and a ready egress.

    With `mesh_ca`, the egress's lazy listener requires Istio mTLS, as in a cluster;
    `lazy_tcp` and `lazy_sniffed` are xdsproxy's flags (compact mode's mesh ranges derived from
    the VIPs)."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(running_sim_with(mesh))
        proxy = await stack.enter_async_context(
            running_proxy(
                sim.port,
                mode="lazy",
                egress=ServicePort(EGRESS_HOST, egress_service_port),
                egress_settings=EgressSettings(
                    port=egress_port,
                    bind_address="127.0.0.1",
                    als_host="127.0.0.1",
                    als_port=0,
                    mtls=mesh_ca is not None,
                ),
                als_listen="127.0.0.1:0",
                usage_sample_percent=usage_sample_percent,
                usage_flush_seconds=1,
                debug_listen="127.0.0.1:0",
                admin_listen="127.0.0.1:0",
                admin_writes=admin_writes,
                lazy_tcp=lazy_tcp,
                lazy_sniffed=lazy_sniffed,
                store=store,
            )
        )
        identity = sidecar_identity(
            "lazy-egress-0",
            "127.0.0.1",
            "istio-system",
            "lazy-egress",
            {EGRESS_ROLE_LABEL: EGRESS_ROLE},
        )
        sds_port = None
        if mesh_ca is not None:
            sds_port = await asyncio.to_thread(mesh_ca.enrol, identity)
        egress = await stack.enter_async_context(
            running_envoy(proxy.port, delta, identity, sds_port)
        )

        def ready() -> bool:
            listeners = dynamic_config(egress.config_dump(include_eds=False))["listeners"]
            return (
                "xdsproxy_lazy_egress" in listeners
                and egress.stat("cluster_manager.warming_clusters") == 0
                and egress.stat("listener_manager.total_listeners_warming") == 0
            )

        await eventually(ready, timeout=180, interval=0.3)
        yield sim, proxy, egress


@asynccontextmanager
async def lazy_mesh(delta: bool, mtls: bool = False) -> AsyncIterator[LazyMesh]:
    """With `mtls`, Istio's auto mTLS on loopback: sidecars reach the egress with their SPIFFE
    certificates from an SDS stand-in, and the egress's lazy listener requires one."""
    async with AsyncExitStack() as stack:
        mesh_ca = None
        if mtls:
            mesh_ca = await asyncio.to_thread(MeshCa)
            await stack.enter_async_context(mesh_ca.sds)
        backends = {name: stack.enter_context(Backend(name)) for name in ("a", "b", "c")}
        # A host outside the mesh; its port becomes the mesh's HTTP port so that traffic to it
        # goes through an HTTP listener and the catch-all, as it would in Istio.
        backends["outside"] = stack.enter_context(Backend("outside", host="127.0.0.50"))
        port = backends["outside"].port
        egress_port = free_port()
        mesh = build_mesh(port, backends, egress_port, mtls)
        sim, proxy, egress = await stack.enter_async_context(
            lazy_stack(mesh, egress_port, port, delta, 100.0, mesh_ca)
        )
        yield LazyMesh(sim, proxy, egress, port, backends, stack, mesh_ca)


# Roles of the realistic mesh's services with a live backend: (service index, greeting).
# `generate` gives index % 10 < 6 a sniffed port, 6..8 a TCP port; namespaces alternate.
REALISTIC_ROLES = {
    "tcp": (7, b""),  # client-first TCP, ns-1
    "server-first": (8, b"220 ready\r\n"),  # TCP, ns-0: the server greets first
    "sniffed": (5, b""),  # a sniffed port called with HTTP and raw TCP, ns-1
    # A sniffed service on the mesh's HTTP port, which has a `0.0.0.0_PORT` HTTP listener, ns-1.
    "sniffed-http-port": (11, b""),
}


@asynccontextmanager
async def realistic_lazy_mesh(
    delta: bool, mtls: bool = False, lazy: str = "placeholders"
) -> AsyncIterator[LazyMesh]:
    """A lazy mesh on the simulator's realistic profile (sniffed, TCP and HTTP ports, as Istio
    sends them), with live backends for the services in `REALISTIC_ROLES`; `mtls` as for
    `lazy_mesh`; `lazy` is both `lazy_tcp` and `lazy_sniffed` of `lazy_stack`."""
    async with AsyncExitStack() as stack:
        mesh_ca = None
        if mtls:
            mesh_ca = await asyncio.to_thread(MeshCa)
            await stack.enter_async_context(mesh_ca.sds)
        backends = {"outside": stack.enter_context(Backend("outside", host="127.0.0.50"))}
        port = backends["outside"].port
        egress_port = free_port()
        mesh = generate(20, namespaces=2, http_ports=(port,), profile="realistic")
        mesh.auto_mtls = mtls
        tcp: dict[str, tuple[Service, EchoServer]] = {}
        for role, (index, greeting) in REALISTIC_ROLES.items():
            server = stack.enter_context(EchoServer(greeting=greeting, name=role))
            fqdn = next(f for f, s in mesh.services.items() if s.name == f"svc-{index}")
            mesh.set_endpoints(fqdn, [Endpoint("127.0.0.1", server.port)])
            if role == "sniffed-http-port":
                mesh.add(dataclasses.replace(mesh.services[fqdn], ports=(Port(port, "SNIFFED"),)))
            tcp[role] = (mesh.services[fqdn], server)
        mesh.add(egress_service(port, egress_port, mtls))
        sim, proxy, egress = await stack.enter_async_context(
            lazy_stack(
                mesh, egress_port, port, delta, mesh_ca=mesh_ca, lazy_tcp=lazy, lazy_sniffed=lazy
            )
        )
        yield LazyMesh(sim, proxy, egress, port, backends, stack, mesh_ca, tcp=tcp)


@asynccontextmanager
async def running_sim_with(mesh: Mesh) -> AsyncIterator[SimServer]:
    sim = SimServer(mesh, bind_address="127.0.0.1", proxy_protocol=True)
    await sim.start("127.0.0.1:0")
    try:
        yield sim
    finally:
        await sim.stop()


ALL_PROTOCOLS = ("HTTP", "SNIFFED", "TCP")


def pick_services(mesh: Mesh, k: int, protocols: tuple[str, ...] = ("HTTP",)) -> list[ServicePort]:
    """k services whose port is of one of `protocols`, spread over the mesh's namespaces
    (the egress's own excluded)."""
    candidates = [
        s
        for s in mesh.services.values()
        if s.kind == "eds" and s.ports[0].protocol in protocols and s.namespace != "istio-system"
    ]
    step = max(1, len(candidates) // k)
    return [ServicePort(s.fqdn, s.ports[0].number) for s in candidates[::step][:k]]


async def learn_through_egress(
    sidecar: Envoy, listen: int, mesh: Mesh, target: ServicePort, source: str
) -> float:
    """Send a first request to `target` through the sidecar (it goes via the egress) and wait
    until the sidecar holds the target's cluster with endpoints. Milliseconds taken."""
    service = mesh.services[target.host]
    start = time.perf_counter()
    reply = await asyncio.to_thread(
        request_via_sidecar, listen, (service.cluster_ip, target.port), target.host, source
    )
    if reply.status != 200:
        raise RuntimeError(f"request to {target} failed: {reply.status} {reply.body[:200]!r}")
    name = cluster_name(target)
    await eventually(lambda: runs_istio_cluster(sidecar, name), timeout=10, interval=0.002)
    return (time.perf_counter() - start) * 1000


def runs_istio_cluster(sidecar: Envoy, name: str) -> bool:
    """The sidecar runs Istio's cluster `name`, warmed (active), and not the placeholder of that
    name. Read from the config dump, not from cluster stats, which Istio's default stats
    matcher does not create."""
    cluster = sidecar.active_cluster(name)
    return cluster is not None and "envoy_internal_address" not in json.dumps(cluster)


def runs_istio_service(sidecar: Envoy, cluster: str, vip: tuple[str, int]) -> bool:
    """The sidecar runs Istio's cluster and its `VIP_PORT` listener for a TCP or sniffed
    service: new connections go direct (a compact sidecar gets the listener on learning)."""
    return runs_istio_cluster(sidecar, cluster) and (
        sidecar.active_listener(f"{vip[0]}_{vip[1]}") is not None
    )


async def learn_tcp_through_egress(
    sidecar: Envoy, listen: int, mesh: Mesh, target: ServicePort, source: str
) -> float:
    """Open a first connection to the TCP service `target` through the sidecar (it goes
    through the egress tunnel), check the service answers (a greeting or an echo), and wait
    until the sidecar runs the service's own cluster and listener. Milliseconds from connect."""
    service = mesh.services[target.host]
    vip = (service.cluster_ip, target.port)
    start = time.perf_counter()
    conn = await asyncio.to_thread(connect_via_sidecar, listen, vip, source)
    with conn:
        if not await asyncio.to_thread(answers, conn):
            raise RuntimeError(f"no answer from {target} through the tunnel")
    name = cluster_name(target)
    await eventually(lambda: runs_istio_service(sidecar, name, vip), timeout=10, interval=0.002)
    return (time.perf_counter() - start) * 1000
