"""Endpoint churn: the push latency xdsproxy adds, and its CPU, while endpoints keep changing.

The simulated Istiod runs in this process and changes `--rate` services' endpoints a second;
like Istiod, it debounces them (100 ms) into incremental EDS pushes of just the changed load
assignments. M load-generator clients (SotW or Delta) subscribe to every cluster's endpoints, first
straight to the simulator, then through `xdsproxy serve` (passthrough, a child process). The
first `--trace` clients report when each EDS push arrives; latency is arrival minus the time
the simulator issued that push. The added latency is via xdsproxy minus direct, per quantile.

Run: `python -m benchmarks.churn --services 5000 --runs sotw:100 delta:100 delta:500` (writes
results/churn.json and its section of RESULTS.md). SotW at M = 500 saturates this two-core rig:
every SotW EDS ACK repeats all 5,000 cluster names, 10 pushes a second to each client.
"""

import argparse
import asyncio
import json
import random
import statistics
import threading
import time

from benchmarks.processes import cpu_seconds, spawn, wait_port
from benchmarks.report import save_json, update_section
from xdsproxy.harness.envoy import terminate
from xdsproxy.harness.http import free_port
from xdsproxy.harness.stack import running_sim
from xdsproxy.sim.mesh import Endpoint, generate
from xdsproxy.sim.server import SimServer


class Arrivals(threading.Thread):
    """Reads the load generator's lines: readiness and traced EDS arrivals."""

    def __init__(self, process) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.ready = threading.Event()
        self.eds: list[tuple[str, float]] = []
        self.start()

    def run(self) -> None:
        for line in self.process.stdout:
            word, *rest = line.split()
            if word == "ready":
                self.ready.set()
            elif word == "eds":
                self.eds.append((rest[1], float(rest[2])))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _phase(
    sim: SimServer,
    target: int,
    m: int,
    delta: bool,
    rate: float,
    seconds: float,
    trace: int,
    pid: int = 0,
):
    """Latencies (ms) of traced EDS arrivals while the endpoints churn, and the CPU seconds
    process `pid` used during the churn."""
    loadgen = spawn(
        "xdsproxy.harness.loadgen", "--target", f"127.0.0.1:{target}", "--clients", str(m),
        "--ramp", "0", "--trace", str(trace), *(["--delta"] if delta else []),
        read=True,
    )  # fmt: skip
    try:
        arrivals = Arrivals(loadgen)
        if not await asyncio.to_thread(arrivals.ready.wait, 600):
            raise RuntimeError("the clients never synced")
        await asyncio.sleep(1)
        fqdns = [s.fqdn for s in sim.mesh.services.values() if s.kind == "eds"]
        first_push = len(sim.endpoint_pushes)
        cpu = cpu_seconds(pid) if pid else 0.0
        start = time.monotonic()
        changes = 0
        while time.monotonic() - start < seconds:
            changes += 1
            address = f"10.202.{changes // 250 % 250}.{changes % 250 + 1}"
            sim.set_endpoints(random.choice(fqdns), [Endpoint(address, 8080)])
            await asyncio.sleep(1 / rate)
        cpu = (cpu_seconds(pid) - cpu) / (time.monotonic() - start) if pid else 0.0
        await asyncio.sleep(2)  # the last pushes arrive
        sent = dict(sim.endpoint_pushes[first_push:])
        latencies = [(at - sent[v]) * 1000 for v, at in arrivals.eds if v in sent]
        return latencies, changes, len(sent), cpu
    finally:
        terminate(loadgen)


async def measure(
    services: int, m: int, delta: bool, rate: float, seconds: float, trace: int
) -> dict:
    async with running_sim(generate(services)) as sim:
        direct, changes, pushes, _ = await _phase(sim, sim.port, m, delta, rate, seconds, trace)
        port = free_port()
        proxy = spawn(
            "xdsproxy.cli", "--log-level", "warning", "serve", "--upstream",
            f"127.0.0.1:{sim.port}", "--upstream-plaintext", "--listen", f"127.0.0.1:{port}",
            "--debug-listen", "127.0.0.1:0", "--admin-listen", "",
        )  # fmt: skip
        try:
            await asyncio.to_thread(wait_port, port)
            via, _, _, cpu_share = await _phase(
                sim, port, m, delta, rate, seconds, trace, proxy.pid
            )
        finally:
            terminate(proxy)
    row: dict = {
        "services": services,
        "clients": m,
        "protocol": "Delta" if delta else "SotW",
        "changes_per_s": rate,
        "seconds": seconds,
        "changes": changes,
        "eds_pushes": pushes,
        "traced_clients": trace,
        "proxy_cpu_share": cpu_share,  # of one core, during the churn
    }
    for label, values in (("direct", direct), ("via", via)):
        row[f"{label}_samples"] = len(values)
        row[f"{label}_p50_ms"] = statistics.median(values)
        row[f"{label}_p99_ms"] = _quantile(values, 0.99)
    row["added_p50_ms"] = row["via_p50_ms"] - row["direct_p50_ms"]
    row["added_p99_ms"] = row["via_p99_ms"] - row["direct_p99_ms"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["sotw:100", "delta:100", "delta:500"],
        help="PROTOCOL:CLIENTS, protocol sotw or delta",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="endpoint changes per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--trace", type=int, default=20, help="clients whose arrivals are timed")
    args = parser.parse_args()
    runs = [(protocol, int(m)) for protocol, m in (run.split(":") for run in args.runs)]
    rows = [
        asyncio.run(
            measure(args.services, m, protocol == "delta", args.rate, args.seconds, args.trace)
        )
        for protocol, m in runs
    ]
    save_json("churn", rows)
    lines = [
        "## Push latency under endpoint churn (`python -m benchmarks.churn`)",
        "",
        "Passthrough. Endpoint changes debounced 100 ms into incremental EDS pushes, as "
        "Istiod does; every client watches every cluster. Latency: from the simulator issuing "
        "a push to a traced client receiving it, straight and through xdsproxy. CPU: "
        "xdsproxy's share of one core during the churn.",
        "",
        "| services | clients | xDS | changes/s | EDS pushes | direct p50 ms | direct p99 ms | "
        "via p50 ms | via p99 ms | added p50 ms | added p99 ms | xdsproxy CPU |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['services']} | {r['clients']} | {r.get('protocol', 'SotW')} | "
            f"{r['changes_per_s']:g} | {r['eds_pushes']} | "
            f"{r['direct_p50_ms']:.1f} | {r['direct_p99_ms']:.1f} | {r['via_p50_ms']:.1f} | "
            f"{r['via_p99_ms']:.1f} | {r['added_p50_ms']:.1f} | {r['added_p99_ms']:.1f} | "
            f"{r['proxy_cpu_share']:.0%} |"
        )
    update_section(lines)


if __name__ == "__main__":
    main()
