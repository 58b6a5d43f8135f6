"""`xdsproxy demo`: what lazy loading saves, end to end on loopback, with real Envoys.

It starts the simulated Istiod (a stand-in for Istiod) with a mesh of `services` services on
the realistic profile (6 in 10 ports protocol-sniffed, 3 TCP, 1 HTTP, as Istio sends them),
xdsproxy in lazy mode, the lazy egress Envoy, backends, and two sidecar Envoys of the same
kind: one connected straight to the simulator (full push, today's Istio) and one through
xdsproxy (lazy, with the defaults of a cluster whose service ranges are known: out-of-scope TCP
services compact, sniffed ones as placeholders). The lazy sidecar's first calls, HTTP requests
and TCP connections, go through the egress and xdsproxy learns each; then the demo compares
the two sidecars and writes a PNG plot.
"""

import asyncio
import signal
import statistics
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from envoy.config.core.v3.base_pb2 import Node
from google.protobuf.json_format import ParseDict

from xdsproxy.harness.envoy import Envoy
from xdsproxy.harness.http import Backend, EchoServer, free_port
from xdsproxy.harness.lazymesh import (
    ALL_PROTOCOLS,
    egress_service,
    lazy_stack,
    learn_tcp_through_egress,
    learn_through_egress,
    pick_services,
    sidecar_identity,
)
from xdsproxy.harness.stack import eventually, running_envoy, session_of, settled
from xdsproxy.istio.names import ServicePort, outbound_cluster
from xdsproxy.istio.node import parse_node
from xdsproxy.scope.tunnel import placeholder_cluster
from xdsproxy.sim.mesh import Endpoint, generate
from xdsproxy.wire import typeurls

EGRESS_SERVICE_PORT = 80
TYPES = {
    "CDS": typeurls.CLUSTER,
    "EDS": typeurls.ENDPOINT,
    "LDS": typeurls.LISTENER,
    "RDS": typeurls.ROUTE,
}


@dataclass
class Side:
    clusters: int
    placeholders: int
    bytes_by_type: dict[str, int]
    allocated_mb: float
    rss_mb: float

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_type.values())


def _say(step: int, total: int, message: str) -> None:
    print(f"[{step}/{total}] {message}", flush=True)


async def _memory(envoy: Envoy) -> tuple[float, float]:
    return (await asyncio.to_thread(envoy.allocated_bytes)) / 1e6, envoy.rss_bytes() / 1e6


async def _demo(services: int, calls: int, output: Path, keep_running: bool = False) -> int:
    steps = 7
    async with AsyncExitStack() as stack:
        backend = stack.enter_context(Backend("backend"))
        # A server-first TCP service (it greets before the client writes), as databases do.
        database = stack.enter_context(EchoServer(greeting=b"220 ready\r\n"))
        mesh = generate(services, profile="realistic", http_ports=(EGRESS_SERVICE_PORT,))
        # The workload calls services of each protocol: a third HTTP, sniffed and TCP each.
        targets = [
            target
            for n, kind in enumerate(ALL_PROTOCOLS)
            for target in pick_services(mesh, (calls + 2 - n) // 3, (kind,))
        ]
        # One more HTTP service with a backend, left for the user to call first (--keep-running).
        spare = next(s for s in pick_services(mesh, calls + 3) if s not in targets)
        protocols = {t: mesh.services[t.host].ports[0].protocol for t in [*targets, spare]}
        for target in [*targets, spare]:
            service = mesh.services[target.host]
            subsets = [name for name, _ in service.subsets] or [""]
            port = database.port if protocols[target] == "TCP" else backend.port
            mesh.set_endpoints(target.host, [Endpoint("127.0.0.1", port, s) for s in subsets])
        egress_port = free_port()
        mesh.add(egress_service(EGRESS_SERVICE_PORT, egress_port))
        _say(
            1,
            steps,
            f"simulated Istiod: {services} services in {len(mesh.namespaces())} namespaces",
        )
        sim, proxy, egress = await stack.enter_async_context(
            # As xdsproxy runs in a cluster whose service ranges it knows: TCP services compact,
            # sniffed ones with placeholders (the defaults of `--lazy-tcp auto`).
            lazy_stack(
                mesh,
                egress_port,
                EGRESS_SERVICE_PORT,
                lazy_tcp="compact",
                admin_writes=keep_running,
            )
        )
        _say(
            2,
            steps,
            f"xdsproxy (lazy) on 127.0.0.1:{proxy.port}; lazy egress Envoy ready "
            f"with {egress.stat('cluster_manager.active_clusters')} clusters",
        )

        full_id = sidecar_identity("full-0", "127.0.0.3", "ns-0", "full", istio_stats=True)
        full = await stack.enter_async_context(running_envoy(sim.port, identity=full_id))
        await eventually(
            lambda: (
                full.stat("cluster_manager.warming_clusters") == 0
                and full.stat("cluster_manager.active_clusters") > services
            ),
            timeout=300,
            interval=0.5,
        )
        _say(
            3,
            steps,
            f"full sidecar (straight to Istiod): "
            f"{full.stat('cluster_manager.active_clusters') - 1} clusters",
        )

        lazy_id = sidecar_identity("app-0", "127.0.0.2", "ns-0", "app", istio_stats=True)
        lazy = await stack.enter_async_context(running_envoy(proxy.port, identity=lazy_id))
        await settled(lazy, proxy, "app-0")
        _say(
            4,
            steps,
            f"lazy sidecar (through xdsproxy): "
            f"{lazy.stat('cluster_manager.active_clusters') - 1} clusters",
        )

        listen = lazy_id.proxy_config["proxyListenPort"]
        latencies = []
        for target in targets:
            learn = learn_tcp_through_egress if protocols[target] == "TCP" else learn_through_egress
            latencies.append(await learn(lazy, listen, mesh, target, "127.0.0.2"))
            print(
                f"      {protocols[target]:>7} {target}: learned in {latencies[-1]:.0f} ms",
                flush=True,
            )
        mix = ", ".join(
            f"{sum(protocols[t] == kind for t in targets)} {kind}" for kind in ALL_PROTOCOLS
        )
        _say(
            5,
            steps,
            f"{len(targets)} first calls ({mix}) went through the egress; xdsproxy learned "
            f"each (median {statistics.median(latencies):.0f} ms from the call to Istio's "
            "cluster on the sidecar)",
        )

        await settled(lazy, proxy, "app-0")
        status = session_of(proxy, "app-0").stream.status()
        # What Istiod serves the full sidecar: every resource of each type for its node.
        node = parse_node(ParseDict(full_id.node(), Node()))
        full_bytes = {
            k: sum(map(len, sim.snapshot.resources(t, node).values())) for k, t in TYPES.items()
        }
        lazy_bytes = {k: status[t].pushed_bytes for k, t in TYPES.items() if t in status}
        pushed = session_of(proxy, "app-0").stream.pushed(typeurls.CLUSTER)
        placeholders = sum(
            body == placeholder_cluster(name, parsed.service)
            for name, body in zip(*pushed, strict=True)
            if (parsed := outbound_cluster(name))
        )
        before = Side(
            full.stat("cluster_manager.active_clusters") - 1,
            0,
            full_bytes,
            *(await _memory(full)),
        )
        after = Side(
            lazy.stat("cluster_manager.active_clusters") - 1 - placeholders,
            placeholders,
            lazy_bytes,
            *(await _memory(lazy)),
        )
        _say(6, steps, "measured both sidecars")
        _print_table(before, after, latencies)
        path = _plot(before, after, services, output)
        _say(7, steps, f"plot written to {path}")
        if keep_running:
            vip = (mesh.services[spare.host].cluster_ip, spare.port)
            print(_try_these(proxy.admin.port, targets[0], spare, vip, listen), flush=True)
            return 128 + await _stopped()  # the stack stops everything on the way out
    return 0


async def _stopped() -> int:
    """Wait for Ctrl-C or SIGTERM; the signal's number. Handled here rather than by
    asyncio.run's KeyboardInterrupt, which a shell's background job (SIGINT ignored) never
    gets."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[int] = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda s=signum: got.done() or got.set_result(s))
    try:
        return await got
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _try_these(
    admin: int, learned: ServicePort, spare: ServicePort, vip: tuple[str, int], listen: int
) -> str:
    """The commands to try against the running demo (`--keep-running`)."""
    debug = f"--debug 127.0.0.1:{admin}"
    request = (
        f"PROXY TCP4 127.0.0.2 {vip[0]} 40000 {vip[1]}\\r\\nGET / HTTP/1.1\\r\\n"
        f"Host: {spare.host}\\r\\nConnection: close\\r\\n\\r\\n"
    )
    return "\n".join(
        [
            "",
            "Everything stays up. Try, from another shell:",
            f"  xdsproxy status {debug}",
            f"  xdsproxy config clusters app-0 {debug} --diff",
            f"  xdsproxy scope why ns-0/app {learned} {debug}",
            f"  xdsproxy scope why ns-0/app {spare} {debug}",
            # The sidecar reads the original destination from a PROXY header, as iptables
            # would have set it: curl cannot set one, so printf and nc.
            f"  printf '{request}' | nc 127.0.0.1 {listen}    # first request to {spare.host}",
            f"  xdsproxy scope why ns-0/app {spare} {debug}",
            f"  xdsproxy scope forget ns-0/app {spare} {debug}",
            f"  xdsproxy scope add ns-0/app {spare} {debug}",
            f"  xdsproxy scope export {debug}",
            "Ctrl-C stops everything.",
        ]
    )


def _print_table(before: Side, after: Side, latencies: list[float]) -> None:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x less" if b else "-"

    rows = [
        (
            "clusters",
            f"{before.clusters}",
            f"{after.clusters}",
            ratio(before.clusters, after.clusters),
        ),
        (
            "placeholder clusters (sniffed ports)",
            f"{before.placeholders}",
            f"{after.placeholders}",
            "",
        ),
        (
            "config bytes (CDS+EDS+LDS+RDS)",
            f"{before.total_bytes:,}",
            f"{after.total_bytes:,}",
            ratio(before.total_bytes, after.total_bytes),
        ),
        (
            "Envoy allocated memory (MB)",
            f"{before.allocated_mb:.1f}",
            f"{after.allocated_mb:.1f}",
            ratio(before.allocated_mb, after.allocated_mb),
        ),
        (
            "Envoy RSS (MB)",
            f"{before.rss_mb:.1f}",
            f"{after.rss_mb:.1f}",
            ratio(before.rss_mb, after.rss_mb),
        ),
    ]
    print()
    print(f"{'':34}{'full push':>14}{'lazy':>14}{'':>14}")
    for label, full, lazy, change in rows:
        print(f"{label:34}{full:>14}{lazy:>14}{change:>14}")
    print(f"{'learn latency, median (ms)':34}{'':>14}{statistics.median(latencies):>14.0f}")
    print(f"{'learn latency, max (ms)':34}{'':>14}{max(latencies):>14.0f}")
    print()


def _plot(before: Side, after: Side, services: int, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    figure, (config, memory) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = list(TYPES)
    positions = range(len(kinds))
    config.bar(
        [p - 0.2 for p in positions],
        [before.bytes_by_type.get(k, 0) / 1e3 for k in kinds],
        0.4,
        label="full push",
    )
    config.bar(
        [p + 0.2 for p in positions],
        [after.bytes_by_type.get(k, 0) / 1e3 for k in kinds],
        0.4,
        label="lazy",
    )
    config.set_xticks(list(positions), kinds)
    config.set_ylabel("kB pushed to the sidecar")
    config.set_title("Config per xDS type")
    config.legend()
    memory.bar(
        ["full push", "lazy"],
        [before.allocated_mb, after.allocated_mb],
        color=["tab:blue", "tab:orange"],
    )
    memory.set_ylabel("Envoy allocated memory (MB)")
    memory.set_title("Real Envoy 1.40 memory")
    figure.suptitle(f"xdsproxy: one sidecar in a {services}-service mesh")
    figure.tight_layout()
    path = output / "xdsproxy-demo.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.resolve()


def run_demo(
    services: int = 2000,
    calls: int = 6,
    output: Path = Path("demo-output"),
    keep_running: bool = False,
) -> int:
    try:
        return asyncio.run(_demo(services, calls, output, keep_running))
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
