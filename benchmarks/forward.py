"""Forwarding cost of a CDS response through xdsproxy's hot path, against the upb floor.

Measured per response, median of repeated runs, on one core:
- floor: upb parses the envelope and reads every resource name (the least any proxy that
  knows what it forwards must do);
- relay: `SotwStream.receive_upstream`, passthrough mode (decode, bookkeeping, forward as is);
- narrowed: the same with a view that keeps 1% of clusters, so a new envelope is spliced;
- grpc: one response through a real xdsproxy over loopback gRPC, against the same response
  straight from the upstream (the added latency of the proxy hop).

Run: `make bench-forward` (writes benchmarks/results/forward.json and benchmarks/RESULTS.md).
"""

import argparse
import asyncio
import json
import statistics
import time

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf.any_pb2 import Any

from benchmarks.report import save_json, update_section
from xdsproxy.harness.ads import AdsClient, RecordingUpstream
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.server.app import ProxyServer, ServeConfig
from xdsproxy.sim import envoyconfig
from xdsproxy.sim.mesh import generate
from xdsproxy.wire import lean, typeurls
from xdsproxy.wire.codec import clear_decode_cache, encode_sotw_response
from xdsproxy.xds.sotw import SotwStream
from xdsproxy.xds.view import Selection

SIZES = (1000, 5000, 10000)


def cds_response(clusters: int) -> bytes:
    """A CDS response of the simulator's Istio-shaped clusters."""
    bodies = []
    for cluster in envoyconfig.build_clusters(generate(clusters))[:clusters]:
        packed = Any()
        packed.Pack(cluster)
        bodies.append(packed.SerializeToString())
    return encode_sotw_response("2026-11-22T10:00:00Z/1", typeurls.CLUSTER, "n-1", bodies)


def median_ms(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


class KeepOnePercent:
    """A view that keeps every hundredth resource, so the envelope is re-spliced."""

    transparent = False
    local_types: frozenset[str] = frozenset()

    def depends_on(self, type_url):
        return frozenset()

    def select(self, type_url, upstream):
        names, bodies = upstream[type_url]
        return Selection(names[::100], bodies[::100])


def hot_path(data: bytes, repeat: int) -> dict[str, float]:
    def floor() -> None:
        [entry.value.name for entry in lean.SotwNames.FromString(data).resources]

    def relay(view=None) -> None:
        stream = SotwStream(view) if view else SotwStream()
        stream.receive_upstream(data)

    def relay_first() -> None:
        clear_decode_cache()  # as for the first sidecar to get this response
        relay()

    def lazy() -> None:
        scope = Scope(WorkloadKey("ns-0", "app"))
        relay(SidecarView(scope, "outbound|80||lazy-egress.istio-system.svc.cluster.local"))

    return {
        "floor_ms": median_ms(floor, repeat),
        "relay_first_ms": median_ms(relay_first, repeat),
        "relay_ms": median_ms(relay, repeat),
        "narrowed_ms": median_ms(lambda: relay(KeepOnePercent()), repeat),
        "lazy_ms": median_ms(lazy, repeat),
    }


async def grpc_hop(data: bytes, repeat: int) -> dict[str, float]:
    """Latency of one response: client request -> full response, direct and through xdsproxy."""

    def respond(request: bytes) -> list[bytes]:
        return [data] if not DiscoveryRequest.FromString(request).response_nonce else []

    upstream = RecordingUpstream(respond)
    await upstream.start()
    proxy = ProxyServer(ServeConfig(upstream=f"127.0.0.1:{upstream.port}", listen="127.0.0.1:0"))
    await proxy.start()
    request = DiscoveryRequest(type_url=typeurls.CLUSTER)
    request.node.id = "sidecar~10.0.0.1~bench-0.ns~ns.svc.cluster.local"
    first = request.SerializeToString()
    out: dict[str, float] = {}
    try:
        for label, port in (("direct_ms", upstream.port), ("via_proxy_ms", proxy.port)):
            samples = []
            for _ in range(repeat):
                client = AdsClient(port)
                start = time.perf_counter()
                await client.send(first)
                await client.recv(timeout=60)
                samples.append((time.perf_counter() - start) * 1000)
                await client.close()
            out[label] = statistics.median(samples)
    finally:
        await proxy.stop()
        await upstream.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    rows = []
    for size in parser.parse_args().sizes:
        data = cds_response(size)
        repeat = 40 if size <= 5000 else 20
        row = {"clusters": size, "bytes": len(data), **hot_path(data, repeat)}
        row.update(asyncio.run(grpc_hop(data, 10)))
        row["relay_vs_floor"] = row["relay_first_ms"] / row["floor_ms"]
        row["relay_mb_per_s"] = len(data) / 1e6 / (row["relay_ms"] / 1000)
        row["narrowed_mb_per_s"] = len(data) / 1e6 / (row["narrowed_ms"] / 1000)
        row["added_hop_ms"] = row["via_proxy_ms"] - row["direct_ms"]
        rows.append(row)
        print(json.dumps(row))
    save_json("forward", rows)
    write_results_md(rows)


def write_results_md(rows: list[dict]) -> None:
    lines = [
        "## Forwarding a CDS response (`make bench-forward`)",
        "",
        "| clusters | bytes | upb floor ms | relay, first ms | first / floor | relay, seen ms | "
        "relay, seen MB/s | narrowed (1%) ms | lazy sidecar ms | gRPC direct ms | "
        "via xdsproxy ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clusters']} | {r['bytes']:,} | {r['floor_ms']:.2f} | "
            f"{r['relay_first_ms']:.2f} | {r['relay_vs_floor']:.2f}x | {r['relay_ms']:.2f} | "
            f"{r['relay_mb_per_s']:.0f} | {r['narrowed_ms']:.2f} | {r['lazy_ms']:.2f} | "
            f"{r['direct_ms']:.1f} | {r['via_proxy_ms']:.1f} |"
        )
    lines += [
        "",
        "Floor: upb parses the envelope and every resource name. Relay: xdsproxy's SotW state "
        "machine in passthrough mode (decode, bookkeeping, forward unchanged), first for a "
        "response not seen before (the first sidecar to get it), then for one whose resources "
        "were already decoded for another stream (every other sidecar: found by length and "
        "ends, confirmed with a byte compare). Narrowed: a view "
        "keeping 1% of clusters, so a new envelope is spliced from kept byte spans. Lazy sidecar: "
        "the real scoping of a CDS push for a workload with an empty learned scope (TCP services "
        "kept). gRPC: one "
        "response over loopback, straight from the upstream and through a real xdsproxy.",
        "",
    ]
    update_section(lines)


if __name__ == "__main__":
    main()
