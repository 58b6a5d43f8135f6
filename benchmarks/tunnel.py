"""Every protocol lazy, measured with real Envoy 1.40 on the realistic profile.

1. What each kind of resource costs a sidecar Envoy (`--per-kind N`, default 2000 services):
   a static ADS server (no xdsproxy) feeds one Envoy a base (Istio's non-service clusters and
   virtual listeners) plus every resource of one kind, and the per-resource cost is the rise of
   Envoy's allocated memory over the base divided by the count. Kinds: Istio's cluster with
   its endpoints (EDS), the placeholder that stands in for it, a pure-TCP `VIP_PORT` listener,
   a sniffed `VIP_PORT` listener with its per-service table (Istio's, and the lazy copy that
   holds only the catch-all to the egress).
2. TCP learn latency (`--learns`, default 50): from a client's connect through the sidecar to
   an out-of-scope TCP service (it goes through the egress tunnel) until the sidecar's
   cluster of that name is Istio's, warmed with its endpoints.
3. The tunnel's cost: connect latency (connect to first echoed byte) through the tunnel and
   direct, and bulk echo throughput on a connection through each.

Run: `make bench-tunnel` (writes benchmarks/results/tunnel.json and updates RESULTS.md).
"""

import argparse
import asyncio
import json
import socket
import time
from contextlib import AsyncExitStack

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf.json_format import ParseDict

from benchmarks.lazy import _percentiles
from benchmarks.report import load_json, save_json, update_section
from xdsproxy.harness.ads import RecordingUpstream
from xdsproxy.harness.http import EchoServer, connect_via_sidecar, free_port
from xdsproxy.harness.lazymesh import (
    egress_service,
    lazy_stack,
    runs_istio_service,
    sidecar_identity,
)
from xdsproxy.harness.stack import eventually, running_envoy, settled
from xdsproxy.istio.names import ServicePort, cluster_name, outbound_cluster
from xdsproxy.istio.node import IstioNode, parse_node
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.routes import kept_vhosts, parse_table, sidecar_table
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.tunnel import TUNNEL_LISTENER, placeholder_cluster, tunnel_listener
from xdsproxy.sim.istiod import Snapshot
from xdsproxy.sim.mesh import Endpoint, generate
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import encode_sotw_response

EGRESS_PORT = 80
EGRESS_CLUSTER = cluster_name(ServicePort("lazy-egress.istio-system.svc.cluster.local", 80))
MIB = 1024 * 1024


# -- 1. memory per kind --------------------------------------------------------------------


class StaticAds:
    """A stand-in control plane that answers each SotW request with a fixed resource set."""

    def __init__(self, resources: dict[str, dict[str, bytes]]) -> None:
        self.resources = resources
        self.acked: set[str] = set()
        self.upstream = RecordingUpstream(self._respond)

    def _respond(self, data: bytes) -> list[bytes]:
        request = DiscoveryRequest.FromString(data)
        type_url = request.type_url
        held = self.resources.get(type_url, {})
        names = list(request.resource_names) or list(held)
        version = "v-" + ",".join(sorted(names))[:40] + str(len(names))
        if request.response_nonce and request.version_info == version:
            self.acked.add(type_url)
            return []
        bodies = tuple(held[n] for n in names if n in held)
        return [encode_sotw_response(version, type_url, version, bodies)]


async def _allocated(resources: dict[str, dict[str, bytes]]) -> float:
    ads = StaticAds(resources)
    port = await ads.upstream.start()
    identity = sidecar_identity("bench-0", "127.0.0.1", istio_stats=True)
    try:
        async with running_envoy(port, identity=identity) as envoy:
            expected = len(resources.get(typeurls.CLUSTER, {})) + 1  # + xds-grpc

            def ready() -> bool:
                return (
                    envoy.stat("cluster_manager.active_clusters") == expected
                    and envoy.stat("cluster_manager.warming_clusters") == 0
                    and envoy.stat("listener_manager.total_listeners_warming") == 0
                    and typeurls.LISTENER in ads.acked
                )

            await eventually(ready, timeout=300, interval=0.5)
            await asyncio.sleep(1.0)
            return await asyncio.to_thread(envoy.allocated_bytes)
    finally:
        await ads.upstream.stop()


async def per_kind(services: int) -> dict:
    mesh = generate(services, profile="realistic")
    snapshot = Snapshot(mesh, "bench", None)
    node = parse_node_for("ns-0")
    cds = snapshot.resources(typeurls.CLUSTER, node)
    eds = snapshot.resources(typeurls.ENDPOINT, node)
    lds = snapshot.resources(typeurls.LISTENER, node)
    rds = snapshot.resources(typeurls.ROUTE, node)
    tcp = {n: b for n, b in lds.items() if n[0].isdigit() and n.endswith("_3306")}
    sniffed = {n: b for n, b in lds.items() if n[0].isdigit() and n not in tcp}
    per_service_tables = {n: b for n, b in rds.items() if ":" in n}
    tcp_clusters = [n for n in cds if (p := outbound_cluster(n)) and p[0].port == 3306 and not p[1]]
    base = {
        typeurls.CLUSTER: {n: b for n, b in cds.items() if not outbound_cluster(n)},
        typeurls.LISTENER: {n: b for n, b in lds.items() if n.startswith("virtual")},
    }
    # A scope that covers nothing: every service's vhost gives way to the egress catch-all.
    nothing_in_scope = Scope(WorkloadKey("ns-0", "app"))
    lazy_tables = {
        n: sidecar_table(
            b, kept_vhosts(parse_table(b), nothing_in_scope), EGRESS_CLUSTER, "ns-0", "app"
        )
        for n, b in per_service_tables.items()
    }

    def plus(**extra: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
        out = {t: dict(v) for t, v in base.items()}
        for key, resources in extra.items():
            out.setdefault(getattr(typeurls, key), {}).update(resources)
        return out

    tunnel = {TUNNEL_LISTENER: tunnel_listener(EGRESS_CLUSTER, "ns-0", "app")}
    cases = {
        "base": (plus(LISTENER=tunnel), 1),
        "Istio cluster with endpoints (EDS)": (
            plus(
                LISTENER=tunnel,
                CLUSTER={n: cds[n] for n in tcp_clusters},
                ENDPOINT={n: eds[n] for n in tcp_clusters if n in eds},
            ),
            len(tcp_clusters),
        ),
        "placeholder cluster": (
            plus(
                LISTENER=tunnel,
                CLUSTER={n: placeholder_cluster(n, outbound_cluster(n)[0]) for n in tcp_clusters},
            ),
            len(tcp_clusters),
        ),
        "TCP VIP_PORT listener": (plus(LISTENER=tunnel | tcp), len(tcp)),
        "sniffed VIP_PORT listener + Istio's table": (
            plus(LISTENER=tunnel | sniffed, ROUTE=per_service_tables),
            len(sniffed),
        ),
        "sniffed VIP_PORT listener + lazy catch-all table": (
            plus(LISTENER=tunnel | sniffed, ROUTE=lazy_tables),
            len(sniffed),
        ),
    }
    measured = {}
    for label, (resources, count) in cases.items():
        allocated = await _allocated(resources)
        measured[label] = (allocated, count)
        print(json.dumps({"case": label, "allocated": allocated, "count": count}), flush=True)
    base_bytes = measured.pop("base")[0]
    return {
        "services": services,
        "base_mb": base_bytes / 1e6,
        "kinds": {
            label: {"count": count, "bytes_each": (allocated - base_bytes) / count}
            for label, (allocated, count) in measured.items()
        },
    }


def parse_node_for(namespace: str) -> IstioNode:
    identity = sidecar_identity("bench-0", "127.0.0.1", namespace)
    return parse_node(ParseDict(identity.node(), Node()))


# -- 2 and 3. learn latency and the tunnel's cost -------------------------------------------


def _echo_once(conn: socket.socket) -> None:
    conn.sendall(b"x")
    if conn.recv(1) != b"x":
        raise RuntimeError("no echo")


def _timed_connect(listen: int, vip: tuple[str, int]) -> tuple[socket.socket, float]:
    start = time.perf_counter()
    conn = connect_via_sidecar(listen, vip, "127.0.0.2")
    _echo_once(conn)
    return conn, (time.perf_counter() - start) * 1000


def _round_trips(conn: socket.socket, count: int = 200) -> list[float]:
    """Milliseconds per one-byte echo on an open connection."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        _echo_once(conn)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _throughput(conn: socket.socket, total: int) -> float:
    """MiB/s of `total` bytes echoed back over `conn` (written and read concurrently)."""
    import threading

    chunk = b"\0" * 65536
    conn.settimeout(60)

    def write() -> None:
        sent = 0
        while sent < total:
            conn.sendall(chunk)
            sent += len(chunk)

    start = time.perf_counter()
    writer = threading.Thread(target=write)
    writer.start()
    received = 0
    while received < total:
        data = conn.recv(1 << 20)
        if not data:
            raise RuntimeError("connection closed mid-transfer")
        received += len(data)
    writer.join()
    return total / MIB / (time.perf_counter() - start)


async def tcp_learns(
    services: int, learns: int, transfer_mib: int, lazy_tcp: str = "placeholders"
) -> dict:
    async with AsyncExitStack() as stack:
        echo = stack.enter_context(EchoServer())
        egress_port = free_port()
        mesh = generate(services, profile="realistic", http_ports=(EGRESS_PORT,))
        targets = [
            s for s in mesh.services.values() if s.kind == "eds" and s.ports[0].protocol == "TCP"
        ][:learns]
        for service in targets:
            mesh.set_endpoints(service.fqdn, [Endpoint("127.0.0.1", echo.port)])
        mesh.add(egress_service(EGRESS_PORT, egress_port))
        _, proxy, _ = await stack.enter_async_context(
            lazy_stack(mesh, egress_port, EGRESS_PORT, lazy_tcp=lazy_tcp, lazy_sniffed=lazy_tcp)
        )
        identity = sidecar_identity("app-0", "127.0.0.2", "ns-0", "app")
        sidecar = await stack.enter_async_context(running_envoy(proxy.port, identity=identity))
        await settled(sidecar, proxy, "app-0")
        listen = identity.proxy_config["proxyListenPort"]
        learn_ms, tunnel_ms, direct_ms = [], [], []
        held = None
        for service in targets:
            vip = (service.cluster_ip, service.ports[0].number)
            name = cluster_name(ServicePort(service.fqdn, service.ports[0].number))
            start = time.perf_counter()
            conn, connect_ms = await asyncio.to_thread(_timed_connect, listen, vip)
            tunnel_ms.append(connect_ms)
            await eventually(
                lambda name=name, vip=vip: runs_istio_service(sidecar, name, vip),
                timeout=30,
                interval=0.002,
            )
            learn_ms.append((time.perf_counter() - start) * 1000)
            if held is None:
                held = conn  # stays on the tunnel it was opened on
            else:
                conn.close()
            direct, connect_ms = await asyncio.to_thread(_timed_connect, listen, vip)
            direct_ms.append(connect_ms)
            if service is targets[0]:
                direct_held = direct
            else:
                direct.close()
        tunnel_rtt = await asyncio.to_thread(_round_trips, held)
        direct_rtt = await asyncio.to_thread(_round_trips, direct_held)
        total = transfer_mib * MIB
        tunnel_mibs = await asyncio.to_thread(_throughput, held, total)
        direct_mibs = await asyncio.to_thread(_throughput, direct_held, total)
        held.close()
        direct_held.close()
    return {
        "lazy_tcp": lazy_tcp,
        "services": services,
        "learns": len(learn_ms),
        **_percentiles("learn_ms", learn_ms),
        **_percentiles("tunnel_connect_ms", tunnel_ms),
        **_percentiles("direct_connect_ms", direct_ms),
        **_percentiles("tunnel_rtt_ms", tunnel_rtt),
        **_percentiles("direct_rtt_ms", direct_rtt),
        "transfer_mib": transfer_mib,
        "tunnel_mib_s": tunnel_mibs,
        "direct_mib_s": direct_mibs,
    }


# -- report ---------------------------------------------------------------------------------


def write_results(kinds: dict | None, learnings: list[dict]) -> None:
    previous = load_json("tunnel") or {}
    kinds = kinds or previous.get("per_kind")
    learnings = learnings or [
        r for r in previous.get("tcp_learns") or [] if isinstance(r, dict) and "lazy_tcp" in r
    ]
    save_json("tunnel", {"per_kind": kinds, "tcp_learns": learnings})
    lines = [
        "## Every protocol lazy: per-resource memory, TCP learns, the tunnel (`make bench-tunnel`)",
        "",
    ]
    if kinds:
        lines += [
            f"Envoy allocated memory per resource, realistic profile with {kinds['services']} "
            f"services (base {kinds['base_mb']:.1f} MB: Istio's non-service clusters, the virtual "
            "listeners and the tunnel listener; static ADS server, no xdsproxy):",
            "",
            "| resource | count | bytes each |",
            "|---|---:|---:|",
        ]
        for label, row in kinds["kinds"].items():
            lines.append(f"| {label} | {row['count']} | {row['bytes_each']:,.0f} |")
        lines.append("")
    for learning in learnings or []:
        lines += [
            f"TCP through the egress tunnel, `--lazy-tcp {learning['lazy_tcp']}`, "
            f"{learning['learns']} services learned one after another, realistic profile with "
            f"{learning['services']} services (ms):",
            "",
            "| measure | p50 | p90 | p99 | max |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, text in (
            ("learn_ms", "learn: connect until the sidecar runs Istio's cluster (and listener)"),
            (
                "tunnel_connect_ms",
                "first contact through the tunnel, connect to first echo (the learn's push "
                "runs at the same time on the two cores)",
            ),
            ("direct_connect_ms", "connect to first echo, direct after learning"),
            ("tunnel_rtt_ms", "one-byte round trip on an open connection, through the tunnel"),
            ("direct_rtt_ms", "one-byte round trip on an open connection, direct"),
        ):
            lines.append(
                f"| {text} | {learning[label + '_p50']:.2f} | {learning[label + '_p90']:.2f} "
                f"| {learning[label + '_p99']:.2f} | {learning[label + '_max']:.2f} |"
            )
        lines += [
            "",
            f"Echo throughput over one connection, {learning['transfer_mib']} MiB each way: "
            f"through the tunnel {learning['tunnel_mib_s']:.0f} MiB/s, direct "
            f"{learning['direct_mib_s']:.0f} MiB/s.",
            "",
        ]
    update_section(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-kind", type=int, default=2000, help="services; 0 skips")
    parser.add_argument("--learns", type=int, default=50, help="0 skips")
    parser.add_argument("--learn-services", type=int, default=1000)
    parser.add_argument("--transfer-mib", type=int, default=256)
    parser.add_argument(
        "--lazy-tcp",
        nargs="+",
        choices=("placeholders", "compact"),
        default=["placeholders", "compact"],
    )
    args = parser.parse_args()
    kinds = asyncio.run(per_kind(args.per_kind)) if args.per_kind else None
    learnings = []
    for mode in args.lazy_tcp if args.learns else ():
        learnings.append(
            asyncio.run(tcp_learns(args.learn_services, args.learns, args.transfer_mib, mode))
        )
        print(json.dumps(learnings[-1]), flush=True)
    write_results(kinds, learnings)


if __name__ == "__main__":
    main()
