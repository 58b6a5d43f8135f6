"""Reconnect storm: M clients, xdsproxy killed (-9) and restarted, every client reconnects at
once (with Envoy-like jittered backoff). Measured: time from the restart until every client
holds CDS, EDS, LDS and RDS again, and xdsproxy's peak RSS meanwhile.

Run: `python -m benchmarks.storm --services 1000 --clients 1000` (writes results/storm.json and
its section of RESULTS.md).
"""

import argparse
import json
import os
import signal
import threading
import time

from benchmarks.processes import rss_mb, spawn, wait_port
from benchmarks.report import save_json, update_section
from xdsproxy.harness.envoy import terminate
from xdsproxy.harness.http import free_port


def _proxy(sim_port: int, port: int):
    return spawn(
        "xdsproxy.cli",
        "--log-level",
        "warning",
        "serve",
        "--upstream",
        f"127.0.0.1:{sim_port}",
        "--upstream-plaintext",
        "--listen",
        f"127.0.0.1:{port}",
        "--debug-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "",
    )


def storm(services: int, clients: int, delta: bool) -> dict:
    sim_port, port = free_port(), free_port()
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
    proxy = loadgen = None
    try:
        wait_port(sim_port)
        proxy = _proxy(sim_port, port)
        wait_port(port)
        loadgen = spawn(
            "xdsproxy.harness.loadgen",
            "--target",
            f"127.0.0.1:{port}",
            "--clients",
            str(clients),
            "--ramp",
            "0.001",
            "--reconnect",
            *(["--delta"] if delta else []),
            read=True,  # a thread below reads every line
        )
        assert loadgen.stdout is not None
        readies: list[float] = []

        def read() -> None:
            for line in loadgen.stdout:
                if line.startswith("ready"):
                    readies.append(time.monotonic())

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 600
        while not readies and time.monotonic() < deadline:
            time.sleep(0.1)
        assert readies, "the clients never synced"
        before_rss = rss_mb(proxy.pid)
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.wait(10)
        restarted = time.monotonic()
        proxy = _proxy(sim_port, port)
        peak = 0.0
        while len(readies) < 2 and time.monotonic() < deadline:
            peak = max(peak, rss_mb(proxy.pid))
            time.sleep(0.2)
        assert len(readies) >= 2, "the clients did not all resync"
        row = {
            "services": services,
            "clients": clients,
            "protocol": "Delta" if delta else "SotW",
            "resync_s": readies[1] - restarted,
            "peak_rss_mb": peak,
            "steady_rss_mb_before": before_rss,
        }
    finally:
        terminate(loadgen)
        terminate(proxy)
        terminate(sim)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--delta", action="store_true")
    args = parser.parse_args()
    row = storm(args.services, args.clients, args.delta)
    save_json("storm", row)
    update_section(
        [
            "## Reconnect storm (`python -m benchmarks.storm`)",
            "",
            "Passthrough; xdsproxy killed with SIGKILL and restarted at once; every client "
            "reconnects with 0.1-1 s jittered backoff.",
            "",
            "| services | clients | xDS | resync after restart s | peak RSS MB | RSS before MB |",
            "|---:|---:|---|---:|---:|---:|",
            f"| {row['services']} | {row['clients']} | {row['protocol']} | {row['resync_s']:.1f} | "
            f"{row['peak_rss_mb']:.0f} | {row['steady_rss_mb_before']:.0f} |",
        ]
    )


if __name__ == "__main__":
    main()
