"""One xdsproxy holding M simulated sidecars of an N-service mesh.

Three processes: the simulated Istiod (`xdsproxy sim`), `xdsproxy serve` (passthrough), and
the load generator (`xdsproxy.harness.loadgen`: lightweight clients that ACK like Envoy, SotW
or Delta). For each protocol and M, the same clients first straight to the simulator, then
through xdsproxy:
- initial sync: time until all M hold CDS, EDS, LDS and RDS; xdsproxy's CPU for it;
- a full push (the simulator pushes every type again on SIGHUP, as Istiod on a full push, in
  Delta too): time until all M have every response (fan-out), and xdsproxy's CPU for it;
- xdsproxy's RSS after the sync and its peak, sampled every 0.2 s.

Run: `python -m benchmarks.scale --services 5000 --clients 100 500 1000` (writes
results/scale.json and its section of RESULTS.md).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import threading
import time

from benchmarks.processes import cpu_seconds, metric_sum, rss_mb, spawn, wait_port
from benchmarks.report import save_json, update_section
from xdsproxy.harness.envoy import terminate
from xdsproxy.harness.http import free_port


class Clients:
    """The load generator, with a thread that reads every line it prints."""

    def __init__(self, target: int, clients: int, delta: bool, cds_only: bool = False) -> None:
        self.clients = clients
        self.cds_only = cds_only
        self.ready_at: list[float] = []
        self.pushes = 0
        self.pushes_at = 0.0
        self.started = time.monotonic()
        self.process = spawn(
            "xdsproxy.harness.loadgen",
            "--target", f"127.0.0.1:{target}", "--clients", str(clients), "--ramp", "0",
            *(["--delta"] if delta else []), *(["--cds-only"] if cds_only else []),
            read=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            word, *rest = line.split()
            if word == "ready":
                self.ready_at.append(time.monotonic())
            elif word == "pushes":
                self.pushes, self.pushes_at = int(rest[0]), time.monotonic()

    def wait(self, check, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the load generator did not get there")
            time.sleep(0.05)

    def sync_seconds(self) -> float:
        self.wait(lambda: self.ready_at)
        return self.ready_at[0] - self.started

    def quiet(self, seconds: float = 1.0) -> int:
        """Push count once nothing has arrived for `seconds`."""
        self.wait(lambda: self.pushes and time.monotonic() - self.pushes_at > seconds)
        return self.pushes

    def stop(self) -> None:
        terminate(self.process)


def _full_push(sim: subprocess.Popen, clients: Clients) -> float:
    """Seconds from the simulator's full push until every client has every type again."""
    base = clients.quiet()
    start = time.monotonic()
    os.kill(sim.pid, signal.SIGHUP)
    types = 1 if clients.cds_only else 4  # CDS alone, or CDS, EDS, LDS and RDS
    clients.wait(lambda: clients.pushes >= base + types * clients.clients)
    return clients.pushes_at - start


def _answered(debug_port: int) -> float:
    """Istiod responses xdsproxy has answered: relayed to Envoy or ACKed itself."""
    return metric_sum(
        debug_port, "xdsproxy_acked_here_total", 'xdsproxy_pushes_total{origin="relayed"'
    )


def _lazy_full_push(sim: subprocess.Popen, clients: Clients, debug_port: int) -> float:
    """Seconds from the simulator's full push until xdsproxy has answered every response of
    it. Lazy sidecars are sent nothing for a push that changes nothing in their scope, so
    the clients cannot tell: xdsproxy's own counters do."""
    clients.quiet()
    base = _answered(debug_port)
    start = time.monotonic()
    os.kill(sim.pid, signal.SIGHUP)
    types = 1 if clients.cds_only else 4
    deadline = start + 900
    while _answered(debug_port) < base + types * clients.clients:
        if time.monotonic() > deadline:
            raise RuntimeError("xdsproxy did not answer the whole push")
        time.sleep(0.05)
    return time.monotonic() - start


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True
        self.start()

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except FileNotFoundError:
                return
            time.sleep(0.2)


def _serve(*args: str) -> subprocess.Popen:
    return spawn("xdsproxy.cli", "--log-level", "warning", *args)


# Lazy mode with an empty learned scope per client (each is its own workload); any mesh
# service stands in for the egress, which the clients never call.
LAZY_ARGS = ("--mode", "lazy", "--egress", "svc-0.ns-0.svc.cluster.local:80", "--store", "memory://",
             "--als-listen", "127.0.0.1:0")  # fmt: skip

SETTLE_SECONDS = 15.0  # a steady-state reading: after the proxy's heap trimmer has had its turn


def measure(
    services: int,
    m: int,
    delta: bool,
    connections: int = 0,
    cds_only: bool = False,
    settle: float = SETTLE_SECONDS,
    lazy: bool = False,
    pushes: int = 3,
) -> dict:
    sim_port, proxy_port, debug_port = free_port(), free_port(), free_port()
    sim = _serve("sim", "--services", str(services), "--listen", f"127.0.0.1:{sim_port}")
    proxy = clients = None
    row: dict = {
        "services": services,
        "clients": m,
        "protocol": "Delta" if delta else "SotW",
        "types": "CDS" if cds_only else "all",
        "mode": "lazy" if lazy else "passthrough",
        "upstream_connections": connections or m,
    }
    try:
        wait_port(sim_port)
        clients = Clients(sim_port, m, delta, cds_only)
        row["direct_sync_s"] = clients.sync_seconds()
        row["direct_push_runs_s"] = [_full_push(sim, clients) for _ in range(pushes)]
        clients.stop()
        proxy = _serve(
            "serve", "--upstream", f"127.0.0.1:{sim_port}", "--upstream-plaintext",
            "--listen", f"127.0.0.1:{proxy_port}", "--debug-listen", f"127.0.0.1:{debug_port}",
            "--admin-listen", "",
            "--upstream-connections", str(connections), *(LAZY_ARGS if lazy else ()),
        )  # fmt: skip
        wait_port(proxy_port)
        peak = PeakRss(proxy.pid)
        row["proxy_idle_rss_mb"] = rss_mb(proxy.pid)
        cpu = cpu_seconds(proxy.pid)
        clients = Clients(proxy_port, m, delta, cds_only)
        row["proxy_sync_s"] = clients.sync_seconds()
        clients.quiet()
        row["proxy_sync_cpu_s"] = cpu_seconds(proxy.pid) - cpu
        time.sleep(settle)
        row["proxy_rss_mb"] = rss_mb(proxy.pid)
        row["proxy_push_runs_s"], row["proxy_push_cpu_runs_s"] = [], []
        for _ in range(pushes):
            cpu = cpu_seconds(proxy.pid)
            if lazy:
                row["proxy_push_runs_s"].append(_lazy_full_push(sim, clients, debug_port))
                time.sleep(1)
            else:
                row["proxy_push_runs_s"].append(_full_push(sim, clients))
                clients.quiet()
            row["proxy_push_cpu_runs_s"].append(cpu_seconds(proxy.pid) - cpu)
        time.sleep(settle)
        row["proxy_rss_after_push_mb"] = rss_mb(proxy.pid)
        peak.running = False
        row["proxy_peak_rss_mb"] = peak.peak
    finally:
        if clients is not None:
            clients.stop()
        terminate(proxy)
        terminate(sim)
    # Medians over the pushes (the machine is shared and noisy); every run is kept in the JSON.
    row["direct_push_s"] = statistics.median(row["direct_push_runs_s"])
    row["proxy_push_s"] = statistics.median(row["proxy_push_runs_s"])
    row["proxy_push_cpu_s"] = statistics.median(row["proxy_push_cpu_runs_s"])
    row["push_cpu_ms_per_client"] = row["proxy_push_cpu_s"] * 1000 / m
    row["fan_out_ratio"] = row["proxy_push_s"] / row["direct_push_s"]
    row["rss_per_client_mb"] = (row["proxy_rss_mb"] - row["proxy_idle_rss_mb"]) / m
    row["sync_cpu_ms_per_client"] = row["proxy_sync_cpu_s"] * 1000 / m
    print(json.dumps(row), flush=True)
    return row


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--clients", type=int, nargs="*", default=[100, 500, 1000])
    parser.add_argument(
        "--protocols", nargs="+", choices=["sotw", "delta"], default=["sotw", "delta"]
    )
    parser.add_argument(
        "--upstream-connections",
        type=int,
        nargs="+",
        default=[0, 16],
        help="xdsproxy's --upstream-connections; 0 is a connection per sidecar",
    )
    parser.add_argument("--cds-only-clients", type=int, nargs="*", default=[500])
    parser.add_argument(
        "--lazy-clients", type=int, nargs="*", default=[1000], help="lazy-mode rows (SotW, Delta)"
    )
    parser.add_argument("--settle", type=float, default=SETTLE_SECONDS, help="seconds before RSS")
    parser.add_argument("--pushes", type=int, default=3, help="full pushes per row (median)")
    args = parser.parse_args()
    rows = [
        measure(
            args.services,
            m,
            protocol == "delta",
            connections,
            settle=args.settle,
            pushes=args.pushes,
        )
        for protocol in args.protocols
        for connections in args.upstream_connections
        for m in args.clients
    ]
    if args.cds_only_clients:
        # The full CDS push alone, for the per-sidecar CPU of a CDS push.
        rows += [
            measure(args.services, m, False, 0, True, args.settle, pushes=args.pushes)
            for m in args.cds_only_clients
        ]
    # Lazy sidecars and a push that changes nothing in their scope: what xdsproxy still pays.
    rows += [
        measure(
            args.services,
            m,
            protocol == "delta",
            0,
            settle=args.settle,
            lazy=True,
            pushes=args.pushes,
        )
        for protocol in args.protocols
        for m in args.lazy_clients
    ]
    write_results(rows)


def write_results(rows: list[dict]) -> None:
    save_json("scale", rows)
    lines = [
        "## Proxy scale (`python -m benchmarks.scale`)",
        "",
        "Clients are lightweight ACKing xDS clients in a separate process. Passthrough, except "
        "the lazy rows: each client a workload of its own with an empty learned scope, so the "
        "push changes nothing in any scope, and its time is until xdsproxy has answered every "
        "response of it (ACKed here; see protocol rules). Sync: "
        "the initial CDS, EDS, LDS and RDS of every client. Full push: the simulator sends "
        "every type again to every client, unchanged resources included (in Delta too, as "
        "Istiod's generators do); push times and CPU are medians of three pushes. RSS 15 s "
        "after the sync and after the last push (steady state); "
        "peak sampled every 0.2 s over the run.",
        "",
        "| services | clients | xDS | mode | types | upstream conns | sync direct s | sync via s | "
        "sync CPU ms/client | "
        "push direct s | push via s | fan-out ratio | push CPU ms/client | RSS MB | "
        "RSS MB/client | RSS after push MB | peak RSS MB |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['services']} | {r['clients']} | {r['protocol']} | "
            f"{r.get('mode', 'passthrough')} | {r['types']} | "
            f"{r['upstream_connections']} | "
            f"{r['direct_sync_s']:.1f} | {r['proxy_sync_s']:.1f} | "
            f"{r['sync_cpu_ms_per_client']:.0f} | {_cell(r, 'direct_push_s', '.1f')} | "
            f"{_cell(r, 'proxy_push_s', '.1f')} | {_cell(r, 'fan_out_ratio', '.2f')} | "
            f"{_cell(r, 'push_cpu_ms_per_client', '.1f')} | {r['proxy_rss_mb']:.0f} | "
            f"{r['rss_per_client_mb']:.2f} | {_cell(r, 'proxy_rss_after_push_mb', '.0f')} | "
            f"{r['proxy_peak_rss_mb']:.0f} |"
        )
    update_section(lines)


if __name__ == "__main__":
    main()
