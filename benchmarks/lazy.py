"""Lazy against full push against the ideal scope, with real Envoy 1.40; and learn latency.

Config size and memory (`--sizes`, default 100 1000 5000 10000; `--k`, default 5 20 100
dependencies):
- full: an Envoy fed the whole simulated mesh (through a passthrough xdsproxy, for byte counts);
- lazy: an Envoy of a workload whose scope holds k learned services (lazy xdsproxy);
- ideal: an Envoy fed a mesh of exactly those k services (what a hand-written Sidecar gives).
Per type, the bytes of the last response (SotW, so each is the type's full state), and Envoy's
allocated memory (admin /memory) and RSS once the config is applied.

Learn latency (`--learns`, default 50): time from sending a request to a service outside the
scope through the sidecar (it goes via the egress) until the sidecar holds that service's
cluster with its endpoints; and xdsproxy's own share, from the egress's log entry start time to
the re-push being queued. Both with real Envoys on loopback.

Run: `make bench-lazy` (writes benchmarks/results/lazy.json and updates benchmarks/RESULTS.md).
"""

import argparse
import asyncio
import json
import statistics
import time
from contextlib import AsyncExitStack

from benchmarks.report import load_json, save_json, update_section
from xdsproxy.harness.envoy import Envoy
from xdsproxy.harness.http import Backend, free_port
from xdsproxy.harness.lazymesh import (
    ALL_PROTOCOLS,
    EGRESS_HOST,
    egress_service,
    lazy_stack,
    learn_through_egress,
    pick_services,
    served_mesh,
    sidecar_identity,
)
from xdsproxy.harness.stack import (
    running_envoy,
    running_proxy,
    running_sim,
    session_of,
    settled,
)
from xdsproxy.istio.names import ServicePort
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.egress import EgressSettings
from xdsproxy.sim.mesh import Mesh, generate
from xdsproxy.wire import typeurls

TYPES = {
    "CDS": typeurls.CLUSTER,
    "EDS": typeurls.ENDPOINT,
    "LDS": typeurls.LISTENER,
    "RDS": typeurls.ROUTE,
}
EGRESS_PORT = 80


async def _measure(envoy: Envoy, proxy, pod: str = "app-0") -> dict:
    await settled(envoy, proxy, pod)
    session = session_of(proxy, pod)
    status = session.stream.status()
    row = {
        f"{label}_bytes": status[t].pushed_bytes if t in status else 0 for label, t in TYPES.items()
    }
    row["clusters"] = status[typeurls.CLUSTER].pushed_resources
    row["allocated_mb"] = (await asyncio.to_thread(envoy.allocated_bytes)) / 1e6
    row["rss_mb"] = envoy.rss_bytes() / 1e6
    return row


# Per point: Istio's full push, lazy with placeholders, lazy compact for TCP only (the default
# where the service ranges are known) and for TCP and sniffed ports (realistic profile only),
# and the ideal sidecar.
CASES = ("full", "lazy", "compact TCP", "compact", "ideal")


def mix(point: dict) -> str:
    """The protocol mix of a point's mesh, for tables and plots."""
    if point.get("profile") == "realistic":
        return "realistic"
    return f"1/{point['tcp_every']} TCP" if point["tcp_every"] else "no TCP"


async def config_points(
    n: int, ks: list[int], tcp_every: int, profile: str = "named-ports"
) -> list[dict]:
    """One point per k; the full push does not depend on k, so it is measured once. On the
    realistic profile (sniffed, TCP and HTTP ports as Istio sends them) the k dependencies
    are of every protocol; on named ports they are HTTP services."""
    mesh = generate(n, tcp_every=tcp_every, profile=profile)
    mesh.add(egress_service(EGRESS_PORT, 15081))
    identity = sidecar_identity("app-0", "127.0.0.1", "ns-0", "app", istio_stats=True)
    async with running_sim(mesh) as sim, running_proxy(sim.port) as proxy:
        async with running_envoy(proxy.port, identity=identity) as envoy:
            full = await _measure(envoy, proxy)
    points = []
    for k in ks:
        # Fewer than k if the mesh has fewer such services.
        deps = pick_services(mesh, k, ALL_PROTOCOLS if profile == "realistic" else ("HTTP",))
        out: dict = {
            "services": n,
            "k": len(deps),
            "profile": profile,
            "tcp_every": tcp_every if profile == "named-ports" else None,
            "full": full,
        }
        out["lazy"] = await _lazy(mesh, deps, identity)
        if profile == "realistic":
            out["compact TCP"] = await _lazy(mesh, deps, identity, "compact", "placeholders")
            out["compact"] = await _lazy(mesh, deps, identity, "compact", "compact")
        ideal = Mesh(services={d.host: mesh.services[d.host] for d in deps}, profile=profile)
        ideal.add(egress_service(EGRESS_PORT, 15081))
        async with running_sim(ideal) as sim, running_proxy(sim.port) as proxy:
            async with running_envoy(proxy.port, identity=identity) as envoy:
                out["ideal"] = await _measure(envoy, proxy)
        for case in CASES:
            if row := out.get(case):
                row["cds_eds_rds_bytes"] = row["CDS_bytes"] + row["EDS_bytes"] + row["RDS_bytes"]
        lazy, full_row, ideal_row = out["lazy"], out["full"], out["ideal"]
        out["lazy_vs_full_bytes"] = lazy["cds_eds_rds_bytes"] / full_row["cds_eds_rds_bytes"]
        out["full_vs_lazy_allocated"] = full_row["allocated_mb"] / lazy["allocated_mb"]
        out["lazy_vs_ideal_allocated"] = lazy["allocated_mb"] / ideal_row["allocated_mb"]
        if compact := out.get("compact"):
            out["full_vs_compact_allocated"] = full_row["allocated_mb"] / compact["allocated_mb"]
            out["compact_vs_ideal_allocated"] = compact["allocated_mb"] / ideal_row["allocated_mb"]
            tcp_only = out["compact TCP"]["allocated_mb"]
            out["full_vs_compact_tcp_allocated"] = full_row["allocated_mb"] / tcp_only
        print(json.dumps(out), flush=True)
        points.append(out)
    return points


async def _lazy(
    mesh: Mesh,
    deps: list[ServicePort],
    identity,
    lazy_tcp: str = "placeholders",
    lazy_sniffed: str = "placeholders",
) -> dict:
    """A lazy sidecar whose workload has learned exactly `deps` (`lazy_tcp`, `lazy_sniffed`:
    xdsproxy's flags, compact mode's ranges derived from the VIPs)."""
    egress = ServicePort(EGRESS_HOST, EGRESS_PORT)
    async with (
        running_sim(mesh) as sim,
        running_proxy(
            sim.port,
            mode="lazy",
            egress=egress,
            als_listen="127.0.0.1:0",
            egress_settings=EgressSettings(als_host="127.0.0.1", als_port=0),
            lazy_tcp=lazy_tcp,
            lazy_sniffed=lazy_sniffed,
        ) as proxy,
    ):
        scope = proxy.runtime.scope(WorkloadKey("ns-0", "app"))
        for dep in deps:
            scope.learn(dep, time.time())
        async with running_envoy(proxy.port, identity=identity) as envoy:
            return await _measure(envoy, proxy)


async def learn_latency(n: int, learns: int) -> dict:
    """Median/p90/p99 of end-to-end learn latency and of xdsproxy's own share."""
    async with AsyncExitStack() as stack:
        backend = stack.enter_context(Backend("backend"))
        egress_port = free_port()
        mesh = served_mesh(n, backend.port, egress_port, EGRESS_PORT)
        _, proxy, _ = await stack.enter_async_context(lazy_stack(mesh, egress_port, EGRESS_PORT))
        identity = sidecar_identity("app-0", "127.0.0.2", "ns-0", "app")
        sidecar = await stack.enter_async_context(running_envoy(proxy.port, identity=identity))
        await settled(sidecar, proxy, "app-0")
        listen = identity.proxy_config["proxyListenPort"]
        targets = pick_services(mesh, learns)
        samples = [
            await learn_through_egress(sidecar, listen, mesh, target, "127.0.0.2")
            for target in targets
        ]
        inner = [s * 1000 for s in proxy.runtime.learner.learn_latencies]
    return {
        "services": n,
        "learns": len(samples),
        **_percentiles("end_to_end_ms", samples),
        **_percentiles("xdsproxy_ms", inner),
    }


def _percentiles(label: str, values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {}

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        f"{label}_p50": statistics.median(ordered),
        f"{label}_p90": pick(0.9),
        f"{label}_p99": pick(0.99),
        f"{label}_max": ordered[-1],
    }


def _key(point: dict) -> tuple:
    return (point.get("profile", "named-ports"), point["tcp_every"], point["services"], point["k"])


def write_results(points: list[dict], latency: dict | None) -> None:
    """Write what ran; what did not run this time (another size or profile, or --learns 0)
    keeps its last figures from results/lazy.json."""
    previous = load_json("lazy") or {}
    merged = {_key(p): p for p in previous.get("config", [])}
    merged.update({_key(p): p for p in points})
    points = sorted(merged.values(), key=lambda p: (p["services"], str(_key(p)[:2]), p["k"]))
    latency = latency or previous.get("learn_latency")
    save_json("lazy", {"config": points, "learn_latency": latency})
    lines = [
        "## Lazy against full against ideal (`make bench-lazy`)",
        "",
        "k dependencies; SotW; bytes are each type's full state as last pushed. The full "
        "push does not depend on k: one Envoy per mesh size and TCP share.",
        "",
        "| services | protocols | k | case | clusters | CDS | EDS | LDS | RDS | "
        "allocated MB | RSS MB |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        share = mix(p)
        for case in CASES:
            if (r := p.get(case)) is None:
                continue
            lines.append(
                f"| {p['services']} | {share} | {p['k']} | {case} | {r['clusters']} | "
                f"{r['CDS_bytes']:,} | "
                f"{r['EDS_bytes']:,} | {r['LDS_bytes']:,} | {r['RDS_bytes']:,} | "
                f"{r['allocated_mb']:.1f} | {r['rss_mb']:.1f} |"
            )
    lines += [
        "",
        "| services | protocols | k | lazy/full CDS+EDS+RDS bytes | full/lazy allocated | "
        "lazy/ideal allocated | full/compact TCP allocated | full/compact allocated | "
        "compact/ideal allocated |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        share = mix(p)
        compact = (
            f"{p['full_vs_compact_tcp_allocated']:.1f}x | {p['full_vs_compact_allocated']:.1f}x | "
            f"{p['compact_vs_ideal_allocated']:.2f}x"
            if "compact" in p
            else "- | - | -"
        )
        lines.append(
            f"| {p['services']} | {share} | {p['k']} | {p['lazy_vs_full_bytes']:.2%} | "
            f"{p['full_vs_lazy_allocated']:.1f}x | {p['lazy_vs_ideal_allocated']:.2f}x | "
            f"{compact} |"
        )
    lines += [
        "",
        "The ideal case is a sidecar given exactly its k dependencies (as a hand-written Sidecar "
        "resource would). Protocols: `realistic` is the simulator's Istio-realistic profile "
        "(6 in 10 ports protocol-sniffed, 3 TCP, 1 HTTP, as in the DeathStarBench dump; the k "
        "dependencies are of every protocol); `1/10 TCP` and `no TCP` have named ports only. "
        "A lazy sidecar (`--lazy-tcp placeholders`) keeps Istio's listeners for every TCP "
        "and sniffed service and a placeholder cluster for each out-of-scope one: what "
        "remains between lazy and ideal is those listeners and placeholders, per-resource "
        "costs in the `make bench-tunnel` section. `compact TCP` is `--lazy-tcp compact` "
        "alone (the default where the service ranges are known); `compact` adds "
        "`--lazy-sniffed compact`; both measured on the realistic profile, their mesh ranges "
        "derived from the VIPs. A compact sidecar holds neither listener nor cluster of an "
        "out-of-scope service of that kind (see docs/lazy.md).",
    ]
    if latency:
        lines += [
            "",
            f"Learn latency over {latency['learns']} learns, {latency['services']} services (ms):",
            "",
            "| measure | p50 | p90 | p99 | max |",
            "|---|---:|---:|---:|---:|",
        ]
        for label in ("end_to_end_ms", "xdsproxy_ms"):
            lines.append(
                f"| {label} | {latency[label + '_p50']:.1f} | {latency[label + '_p90']:.1f} "
                f"| {latency[label + '_p99']:.1f} | {latency[label + '_max']:.1f} |"
            )
    update_section(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 5000, 10000])
    parser.add_argument("--k", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--tcp-every", type=int, nargs="*", default=[10, 0])
    parser.add_argument(
        "--profile",
        nargs="+",
        choices=("named-ports", "realistic"),
        default=["named-ports", "realistic"],
        help="named-ports runs once per --tcp-every; realistic once",
    )
    parser.add_argument("--learns", type=int, default=50)
    parser.add_argument("--learn-services", type=int, default=1000)
    args = parser.parse_args()
    runs = [("named-ports", t) for t in args.tcp_every if "named-ports" in args.profile]
    runs += [("realistic", 0)] if "realistic" in args.profile else []
    points = [
        point
        for n in args.sizes
        for profile, t in runs
        for point in asyncio.run(config_points(n, args.k, t, profile))
    ]
    latency = asyncio.run(learn_latency(args.learn_services, args.learns)) if args.learns else None
    if latency:
        print(json.dumps(latency), flush=True)
    write_results(points, latency)


if __name__ == "__main__":
    main()
