"""One xdsproxy holding M simulated sidecars of an N-service mesh (issue 6, first part).

Three processes: the simulated Istiod (`xdsproxy sim`), `xdsproxy serve` (passthrough), and
the load generator (`xdsproxy.harness.loadgen`: lightweight clients that ACK like Envoy).
Measured: the time until all M clients hold CDS, EDS, LDS and RDS, xdsproxy's RSS then, and
xdsproxy's CPU seconds for that initial sync; the same clients straight to the simulator give
the direct time.

Run: `python -m benchmarks.scale --services 5000 --clients 100` (writes results/scale.json and
its section of RESULTS.md).
"""

import argparse
import json
import time
from pathlib import Path

from benchmarks.processes import cpu_seconds, rss_mb, spawn, wait_port
from benchmarks.report import update_section
from xdsproxy.harness.envoy import terminate
from xdsproxy.harness.http import free_port

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(target: int, clients: int, delta: bool) -> float:
    """Seconds until the load generator reports every client in sync."""
    args = [
        "xdsproxy.harness.loadgen",
        "--target",
        f"127.0.0.1:{target}",
        "--clients",
        str(clients),
        "--ramp",
        "0",
    ]
    start = time.monotonic()
    loadgen = spawn(*args, *(["--delta"] if delta else []), read=True)
    try:
        assert loadgen.stdout is not None
        for line in loadgen.stdout:
            if line.startswith("ready"):
                return time.monotonic() - start
        raise RuntimeError("the load generator ended before every client was in sync")
    finally:
        terminate(loadgen)


def measure(services: int, clients: int, delta: bool) -> dict:
    sim_port, proxy_port = free_port(), free_port()
    sim = spawn(
        "xdsproxy.cli",
        "--log-level",
        "warning",
        "sim",
        "--services",
        str(services),
        "--listen",
        f"127.0.0.1:{sim_port}",
    )
    proxy = None
    try:
        wait_port(sim_port)
        direct = _sync(sim_port, clients, delta)
        proxy = spawn(
            "xdsproxy.cli",
            "--log-level",
            "warning",
            "serve",
            "--upstream",
            f"127.0.0.1:{sim_port}",
            "--upstream-plaintext",
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--debug-listen",
            "127.0.0.1:0",
        )
        wait_port(proxy_port)
        idle_rss, cpu_before = rss_mb(proxy.pid), cpu_seconds(proxy.pid)
        via = _sync(proxy_port, clients, delta)
        row = {
            "services": services,
            "clients": clients,
            "protocol": "Delta" if delta else "SotW",
            "direct_sync_s": direct,
            "proxy_sync_s": via,
            "proxy_cpu_s": cpu_seconds(proxy.pid) - cpu_before,
            "proxy_rss_mb": rss_mb(proxy.pid),
            "proxy_idle_rss_mb": idle_rss,
        }
    finally:
        terminate(proxy)
        terminate(sim)
    row["rss_per_client_mb"] = (row["proxy_rss_mb"] - row["proxy_idle_rss_mb"]) / clients
    row["cpu_ms_per_client"] = row["proxy_cpu_s"] * 1000 / clients
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--clients", type=int, nargs="*", default=[100])
    parser.add_argument("--delta", action="store_true")
    args = parser.parse_args()
    rows = [measure(args.services, m, args.delta) for m in args.clients]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "## Proxy scale, first measurements (`python -m benchmarks.scale`)",
        "",
        "Passthrough; clients are lightweight ACKing xDS clients in a separate process; "
        "the initial sync of CDS, EDS, LDS and RDS for every client.",
        "",
        "| services | clients | xDS | sync direct s | sync via xdsproxy s | xdsproxy CPU s | "
        "CPU ms per client | RSS MB | RSS MB per client |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['services']} | {r['clients']} | {r['protocol']} | "
            f"{r['direct_sync_s']:.1f} | {r['proxy_sync_s']:.1f} | {r['proxy_cpu_s']:.1f} | "
            f"{r['cpu_ms_per_client']:.0f} | {r['proxy_rss_mb']:.0f} | "
            f"{r['rss_per_client_mb']:.2f} |"
        )
    update_section(lines)


if __name__ == "__main__":
    main()
