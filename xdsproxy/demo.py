"""`xdsproxy demo`: the simulated Istiod, xdsproxy and a real Envoy, end to end, on loopback.

It shows the passthrough: what Envoy received through xdsproxy, next to what the simulator
served, and proof that the two agree. The lazy-mode demo is a later milestone.
"""

import asyncio
import json
import sys
import time
from typing import Any

from envoy.config.core.v3.base_pb2 import Node
from google.protobuf.json_format import ParseDict

from xdsproxy.harness.envoy import Envoy, SidecarIdentity
from xdsproxy.istio.node import parse_node
from xdsproxy.server.app import ProxyServer, ServeConfig
from xdsproxy.sim.mesh import generate
from xdsproxy.sim.server import SimServer
from xdsproxy.wire import typeurls

_KINDS = {
    "ClustersConfigDump": ("clusters", "dynamic_active_clusters"),
    "ListenersConfigDump": ("listeners", "dynamic_listeners"),
    "RoutesConfigDump": ("route tables", "dynamic_route_configs"),
}


def _say(message: str) -> None:
    print(message, flush=True)


def _received(dump: dict[str, Any]) -> dict[str, int]:
    out = {}
    for section in dump["configs"]:
        kind = _KINDS.get(section["@type"].rsplit(".", 1)[-1])
        if kind:
            out[kind[0]] = len(section.get(kind[1], []))
    return out


async def _demo(services: int, delta: bool) -> int:
    identity = SidecarIdentity(pod="productpage-0", namespace="ns-0", workload="productpage")
    node = parse_node(ParseDict(identity.node(), Node()))
    sim = SimServer(generate(services))
    await sim.start("127.0.0.1:0")
    _say(f"[1/4] simulated Istiod: {services} services on 127.0.0.1:{sim.port}")
    proxy = ProxyServer(ServeConfig(upstream=f"127.0.0.1:{sim.port}", listen="127.0.0.1:0"))
    await proxy.start()
    _say(f"[2/4] xdsproxy (passthrough) on 127.0.0.1:{proxy.port}")
    envoy = Envoy(proxy.port, identity, delta=delta)
    try:
        await asyncio.to_thread(envoy.start)
        protocol = "Delta" if delta else "SotW"
        _say(f"[3/4] Envoy 1.40 ({protocol} ADS) connected through xdsproxy, admin {envoy.admin}")
        served = {
            "clusters": len(sim.snapshot.resources(typeurls.CLUSTER, node)),
            "listeners": len(sim.snapshot.resources(typeurls.LISTENER, node)),
            "route tables": len(sim.snapshot.resources(typeurls.ROUTE, node)),
        }
        start = time.monotonic()
        received: dict[str, int] = {}
        while time.monotonic() - start < 60:
            received = _received(await asyncio.to_thread(envoy.config_dump, False))
            if received == served:
                break
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - start
        rejected = await asyncio.to_thread(envoy.stat, "cluster_manager.cds.update_rejected")
        memory = await asyncio.to_thread(envoy.allocated_bytes)
        _say(f"[4/4] Envoy applied the config in {elapsed:.1f}s\n")
        _say(f"{'':14}{'served by Istiod':>18}{'held by Envoy':>16}")
        for kind, count in served.items():
            _say(f"{kind:14}{count:>18}{received.get(kind, 0):>16}")
        _say(f"\nEnvoy allocated memory: {memory / 1e6:.1f} MB; CDS updates rejected: {rejected}")
        session = next(iter(proxy.proxy.sessions.values()), None)
        if session is not None:
            status = {
                typeurls.short_name(t): {"bytes": s.upstream_bytes, "state": s.state}
                for t, s in session.stream.status().items()
            }
            _say("per-type state in xdsproxy: " + json.dumps(status))
        _say(
            "\nLazy mode's savings, measured with real Envoy: benchmarks/RESULTS.md "
            "(make bench-lazy)."
        )
        return 0 if received == served and rejected == 0 else 1
    finally:
        await asyncio.to_thread(envoy.stop)
        await proxy.stop()
        await sim.stop()


def run_demo(services: int = 200, delta: bool = False) -> int:
    try:
        return asyncio.run(_demo(services, delta))
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
