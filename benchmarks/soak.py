"""Soak: xdsproxy under endpoint churn for a while; its memory must stay flat.

The simulated Istiod runs in this process and changes one service's endpoints `--rate` times a
second (each change is pushed to every client); xdsproxy (lazy mode off, a child process)
serves `--clients` load-generator clients. xdsproxy's RSS is sampled every 5 s; the slope over
the second half of the run (after warm-up) is the figure.

Run: `make soak` (10 minutes each for SotW and Delta; not part of CI). Writes results/soak.json
and its section of RESULTS.md.
"""

import argparse
import asyncio
import json
import random
import statistics
import time

from benchmarks.processes import metric_sum, rss_mb, spawn, wait_port
from benchmarks.report import save_json, update_section
from xdsproxy.harness.envoy import terminate
from xdsproxy.harness.http import free_port
from xdsproxy.harness.stack import running_sim
from xdsproxy.sim.mesh import Endpoint, generate


def _slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares MB per minute."""
    xs = [t / 60 for t, _ in samples]
    ys = [m for _, m in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs) or 1.0
    return num / den


async def soak(
    services: int,
    clients: int,
    rate: float,
    minutes: float,
    delta: bool = False,
    verbose: bool = False,
) -> dict:
    mesh = generate(services)
    eds = [s.fqdn for s in mesh.services.values() if s.kind == "eds"]
    port, debug = free_port(), free_port()
    async with running_sim(mesh) as sim:
        proxy = spawn(
            "xdsproxy.cli",
            "--log-level",
            "warning",
            "serve",
            "--upstream",
            f"127.0.0.1:{sim.port}",
            "--upstream-plaintext",
            "--listen",
            f"127.0.0.1:{port}",
            "--debug-listen",
            f"127.0.0.1:{debug}",
            "--admin-listen",
            "",
        )
        loadgen = None
        try:
            await asyncio.to_thread(wait_port, port)
            loadgen = spawn(
                "xdsproxy.harness.loadgen",
                "--target",
                f"127.0.0.1:{port}",
                "--clients",
                str(clients),
                "--reconnect",
                *(["--delta"] if delta else []),
            )
            start = time.monotonic()
            samples: list[tuple[float, float]] = []
            changes = 0
            next_sample = start
            while (now := time.monotonic()) - start < minutes * 60:
                fqdn = random.choice(eds)
                ip = f"10.200.{changes // 250 % 250}.{changes % 250 + 1}"
                sim.mutate(lambda m, f=fqdn, a=ip: m.set_endpoints(f, [Endpoint(a, 8080)]))
                changes += 1
                if now >= next_sample:
                    samples.append((now - start, rss_mb(proxy.pid)))
                    next_sample += 5
                    if verbose:
                        print(
                            f"{now - start:.0f}s rss={samples[-1][1]:.0f}MB "
                            f"streams_opened={metric_sum(debug, 'xdsproxy_streams_opened_total')}",
                            flush=True,
                        )
                await asyncio.sleep(1 / rate)
        finally:
            opened = metric_sum(debug, "xdsproxy_streams_opened_total")
            terminate(loadgen)
            terminate(proxy)
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    row = {
        "services": services,
        "clients": clients,
        "protocol": "Delta" if delta else "SotW",
        "changes_per_s": rate,
        "minutes": minutes,
        "changes": changes,
        "rss_start_mb": samples[0][1],
        "rss_end_mb": samples[-1][1],
        "rss_peak_mb": max(m for _, m in samples),
        "slope_mb_per_min_second_half": _slope(half),
        "streams_opened": opened,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=2.0, help="endpoint changes per second")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    parser.add_argument(
        "--protocols", nargs="+", choices=["sotw", "delta"], default=["sotw", "delta"]
    )
    args = parser.parse_args()
    rows = [
        asyncio.run(
            soak(args.services, args.clients, args.rate, args.minutes, p == "delta", args.verbose)
        )
        for p in args.protocols
    ]
    save_json("soak", rows)
    lines = [
        "## Soak under churn (`make soak`)",
        "",
        "| services | clients | xDS | changes/s | minutes | RSS start MB | RSS end MB | peak MB | "
        "slope, second half (MB/min) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['services']} | {row['clients']} | {row['protocol']} | "
            f"{row['changes_per_s']:g} | {row['minutes']:g} | {row['rss_start_mb']:.0f} | "
            f"{row['rss_end_mb']:.0f} | {row['rss_peak_mb']:.0f} | "
            f"{row['slope_mb_per_min_second_half']:+.2f} |"
        )
    update_section(lines)


if __name__ == "__main__":
    main()
