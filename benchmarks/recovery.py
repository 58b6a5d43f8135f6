"""How long after Istiod's return (the simulator, a stand-in) a replica is ready again and its
sidecars are in sync, after an outage of `--outage` seconds.

Sidecars are load-generator clients that reconnect as the agent does (jittered, under a
second). Medians over `--runs`. Run: `python -m benchmarks.recovery` (writes
results/recovery.json and a section of RESULTS.md).
"""

import argparse
import asyncio
import json
import statistics
import time
import urllib.error
import urllib.request

from benchmarks.report import save_json, update_section
from xdsproxy.harness.http import free_port
from xdsproxy.harness.loadgen import Client, Stats
from xdsproxy.harness.stack import eventually, running_proxy
from xdsproxy.sim.mesh import generate
from xdsproxy.sim.server import SimServer

CLIENTS = 5


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


async def _sim(port: int) -> SimServer:
    sim = SimServer(generate(50))
    await sim.start(f"127.0.0.1:{port}")
    return sim


async def once(outage: float) -> tuple[float, float]:
    port = free_port()
    sim = await _sim(port)
    async with running_proxy(port, debug_listen="127.0.0.1:0") as proxy:
        debug = proxy.debug.port
        stats = Stats()
        stats.clients = CLIENTS
        target = f"127.0.0.1:{proxy.port}"
        tasks = [
            asyncio.create_task(Client(target, i, False, stats).run(reconnect=True))
            for i in range(CLIENTS)
        ]
        try:
            await eventually(lambda: stats.ready >= CLIENTS and _ready(debug), timeout=30)
            await sim.stop()
            await eventually(lambda: not _ready(debug), timeout=30)
            await asyncio.sleep(outage)
            synced_before = stats.ready
            sim = await _sim(port)
            start = time.monotonic()
            await eventually(lambda: _ready(debug), timeout=60, interval=0.02)
            ready_s = time.monotonic() - start
            await eventually(
                lambda: stats.ready >= synced_before + CLIENTS, timeout=60, interval=0.02
            )
            synced_s = time.monotonic() - start
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sim.stop()
    return ready_s, synced_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--outage", type=float, default=10.0, help="seconds Istiod is away")
    args = parser.parse_args()
    runs = [asyncio.run(once(args.outage)) for _ in range(args.runs)]
    result = {
        "outage_s": args.outage,
        "ready_s": [r for r, _ in runs],
        "synced_s": [s for _, s in runs],
    }
    print(json.dumps(result))
    save_json("recovery", result)
    ready, synced = statistics.median(result["ready_s"]), statistics.median(result["synced_s"])
    update_section(
        [
            "## Recovery after an Istiod outage (`python -m benchmarks.recovery`)",
            "",
            f"Istiod (the simulator) away for {args.outage:.0f} s; {CLIENTS} SotW clients that "
            "reconnect as the agent does. Seconds from Istiod's return, medians of "
            f"{args.runs} runs.",
            "",
            "| `/readyz` 200 again | every client in sync again |",
            "|---:|---:|",
            f"| {ready:.2f} (max {max(result['ready_s']):.2f}) | "
            f"{synced:.2f} (max {max(result['synced_s']):.2f}) |",
        ]
    )


if __name__ == "__main__":
    main()
