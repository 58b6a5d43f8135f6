"""What a user waits for on a learn, stage by stage.

Real sidecar and lazy egress Envoys, xdsproxy in-process on the simulated Istiod with N
services. Each learn is a first HTTP request (or TCP connection) from the sidecar's workload to
a service out of its scope: it goes through the egress, whose access log entry teaches xdsproxy
the dependency; an HTTP learn is over when the sidecar has ACKed the route table that sends the
next request direct, a TCP one (placeholders) when it runs Istio's cluster, warmed, in the
placeholder's place (the last two stages do not apply).
The stages are read off a tap on every message crossing xdsproxy's edge (`AdsProxy.tap`) and
the learner's entry point:

| stage           | from               | to                                                  |
|-----------------|--------------------|-----------------------------------------------------|
| egress → ALS    | the request sent   | its access log entry at xdsproxy                     |
| committed       | the entry          | attributed, stored, the scope widened               |
| CDS pushed      | committed          | the sidecar's CDS with the new cluster written      |
| EDS asked       | CDS pushed         | Envoy's EDS request naming it (before its CDS ACK) |
| EDS from Istiod | EDS asked          | Istiod's answer holding it                          |
| EDS pushed      | Istiod's answer    | relayed to Envoy                                    |
| EDS ACKed       | EDS pushed         | Envoy's ACK of it                                   |
| CDS ACKed       | CDS pushed         | Envoy's ACK of the CDS (alongside the EDS stages)   |
| route pushed    | both ACKs          | the route table naming the cluster written          |
| route ACKed     | route pushed       | Envoy's ACK: the sidecar sends the next request direct |

`--batch 20` sends 20 first requests at once (to 20 services) from the one workload. `--store
sqlite` commits each new edge to SQLite before the push that uses it (as in service).
Run: `python -m benchmarks.learn_stages --sizes 1000 2000 10000 --protocols sotw delta`
(writes results/learn_stages.json and its section of RESULTS.md).
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from benchmarks.report import save_json, update_section
from xdsproxy.harness.http import (
    Backend,
    EchoServer,
    connect_via_sidecar,
    echoes,
    free_port,
    request_via_sidecar,
)
from xdsproxy.harness.lazymesh import (
    lazy_stack,
    pick_services,
    served_mesh,
    sidecar_identity,
)
from xdsproxy.harness.stack import eventually, running_envoy, settled
from xdsproxy.istio.names import ServicePort, cluster_name, outbound_cluster
from xdsproxy.scope.routes import parse_table
from xdsproxy.server import ads
from xdsproxy.sim.mesh import Endpoint
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import decode_delta_response, decode_sotw_response
from xdsproxy.xds.ordering import is_eds_cluster

CDS, EDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE
EGRESS_PORT = 80  # the egress Service's port, as Istio names its route table
STAGES = (
    "egress → ALS",
    "committed",
    "CDS pushed",
    "EDS asked",
    "EDS from Istiod",
    "EDS pushed",
    "EDS ACKed",
    "CDS ACKed",
    "route pushed",
    "route ACKed",
)


@dataclass(frozen=True, slots=True)
class Message:
    at: float  # time.time()
    where: str
    type_url: str
    nonce: str  # a response's nonce, or the nonce a request answers
    names: frozenset[str]  # resources in a response; names a request subscribes
    bodies: dict[str, bytes] = field(default_factory=dict)
    nack: bool = False


class Recorder:
    """The sidecar's messages, decoded just enough, with the time each crossed the edge."""

    def __init__(self, pod: str, delta: bool) -> None:
        self.pod = pod
        self.delta = delta
        self.messages: list[Message] = []
        # service -> (its first entry in, learned)
        self.entries: dict[ServicePort, tuple[float, float]] = {}

    def tap(self, session, where: str, data: bytes) -> None:
        if f"~{self.pod}." not in session.node_id:
            return
        now = time.time()
        if where in (ads.TO_ENVOY, ads.FROM_ISTIOD):
            if self.delta:
                response = decode_delta_response(data)
                bodies = dict(zip(response.names, response.anys, strict=True))
                nonce = response.nonce
            else:
                response = decode_sotw_response(data)
                bodies = dict(zip(response.names, response.bodies, strict=True))
                nonce = response.nonce
            message = Message(now, where, response.type_url, nonce, frozenset(bodies), bodies)
        else:
            request = (DeltaDiscoveryRequest if self.delta else DiscoveryRequest).FromString(data)
            names = request.resource_names_subscribe if self.delta else request.resource_names
            message = Message(
                now,
                where,
                request.type_url,
                request.response_nonce,
                frozenset(names),
                nack=request.HasField("error_detail"),
            )
        self.messages.append(message)

    def watch_learner(self, learner) -> None:
        """Time each access log entry's arrival and the learn it makes (the learner's own entry
        point, wrapped)."""
        observe = learner.observe

        async def timed(record, started):
            arrived = time.time()
            result = await observe(record, started)
            parsed = outbound_cluster(record.upstream_cluster)
            if parsed is not None:
                self.entries.setdefault(parsed.service, (arrived, time.time()))
            return result

        learner.observe = timed

    def _first(self, after: float, where: str, type_url: str, test=lambda m: True) -> Message:
        for message in self.messages:
            if (
                message.at >= after
                and message.where == where
                and message.type_url == type_url
                and test(message)
            ):
                return message
        raise LookupError(f"no {where} {typeurls.short_name(type_url)} after {after}")

    def _ack(self, push: Message) -> Message:
        """Envoy's ACK of `push`, or of a later push of the type that superseded it."""
        nonces = {
            m.nonce
            for m in self.messages
            if m.where == ads.TO_ENVOY and m.type_url == push.type_url and m.at >= push.at
        }
        return self._first(
            push.at, ads.FROM_ENVOY, push.type_url, lambda m: m.nonce in nonces and not m.nack
        )

    def timeline(self, sent: float, target: ServicePort, tcp: bool) -> dict[str, float | None]:
        """Each stage's milliseconds (the module's table) and the total, for one learn. The
        entry may name a subset's cluster (a VirtualService's weighted route); the plain
        cluster is learned with it. A TCP learn (placeholders) ends when Envoy runs Istio's
        cluster in the placeholder's place, warmed: the listener never changes."""
        cluster, table = cluster_name(target), str(target.port)
        arrived, learned = self.entries[target]
        cds = self._first(
            arrived,
            ads.TO_ENVOY,
            CDS,
            lambda m: cluster in m.names and is_eds_cluster(m.bodies[cluster]),
        )
        cds_ack = self._ack(cds)
        asked = self._first(cds.at, ads.FROM_ENVOY, EDS, lambda m: cluster in m.names)
        answer = self._first(asked.at, ads.FROM_ISTIOD, EDS, lambda m: cluster in m.names)
        eds = self._first(answer.at, ads.TO_ENVOY, EDS, lambda m: cluster in m.names)
        eds_ack = self._ack(eds)
        direct = max(cds_ack.at, eds_ack.at)
        spans: list[tuple[float, float] | None] = [
            (sent, arrived),
            (arrived, learned),
            (learned, cds.at),
            (cds.at, asked.at),
            (asked.at, answer.at),
            (answer.at, eds.at),
            (eds.at, eds_ack.at),
            (cds.at, cds_ack.at),
        ]
        if tcp:
            return _stages([*spans, None, None], (direct - sent) * 1000)
        route = self._first(
            cds.at,
            ads.TO_ENVOY,
            RDS,
            lambda m: table in m.bodies and _routes_to(parse_table(m.bodies[table]), target),
        )
        route_ack = self._ack(route)
        spans += [(direct, route.at), (route.at, route_ack.at)]
        return _stages(spans, (route_ack.at - sent) * 1000)


def _stages(spans: list[tuple[float, float] | None], total: float) -> dict[str, float | None]:
    stages = {
        name: None if span is None else (span[1] - span[0]) * 1000
        for name, span in zip(STAGES, spans, strict=True)
    }
    return {**stages, "total": total}


def _routes_to(table, service: ServicePort) -> bool:
    return any(
        (parsed := outbound_cluster(name)) is not None and parsed.service == service
        for name in table.referenced
    )


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": statistics.median(ordered), "p90": pick(0.9), "p99": pick(0.99)}


async def run(n: int, delta: bool, learns: int, batch: int, store: str, kind: str) -> dict:
    """`learns` learns of `kind` ("http" or "tcp"), `batch` at a time, on a mesh of `n`
    services."""
    tcp = kind == "tcp"
    async with AsyncExitStack() as stack:
        backend = stack.enter_context(Backend("backend"))
        echo = stack.enter_context(EchoServer())
        egress_port = free_port()
        mesh = served_mesh(n, backend.port, egress_port, EGRESS_PORT)
        targets = pick_services(mesh, learns, ("TCP",) if tcp else ("HTTP",))
        for target in targets if tcp else ():
            mesh.set_endpoints(target.host, [Endpoint("127.0.0.1", echo.port)])
        if store == "sqlite":
            directory = stack.enter_context(tempfile.TemporaryDirectory())
            store_url = f"sqlite:///{directory}/edges.db"
        else:
            store_url = "memory://"
        _, proxy, _ = await stack.enter_async_context(
            lazy_stack(mesh, egress_port, EGRESS_PORT, delta=delta, store=store_url)
        )
        recorder = Recorder("app-0", delta)
        proxy.proxy.tap = recorder.tap
        recorder.watch_learner(proxy.runtime.learner)
        identity = sidecar_identity("app-0", "127.0.0.2", "ns-0", "app")
        sidecar = await stack.enter_async_context(
            running_envoy(proxy.port, delta=delta, identity=identity)
        )
        await settled(sidecar, proxy, "app-0")
        listen = identity.proxy_config["proxyListenPort"]
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=batch))
        timelines = []
        for start in range(0, len(targets), batch):
            group = targets[start : start + batch]
            first = _first_connection if tcp else _first_request
            sent = await asyncio.gather(*(first(listen, mesh, t, pool) for t in group))
            for target, at in zip(group, sent, strict=True):
                missing: list[str] = []

                def done(t=target, s=at, missing=missing):
                    try:
                        return recorder.timeline(s, t, tcp)
                    except (LookupError, KeyError) as exc:
                        missing[:] = [f"{t}: {exc!r}"]
                        return None

                try:
                    timelines.append(await eventually(done, timeout=30, interval=0.02))
                except TimeoutError:
                    rds = [
                        (round(m.at - at, 4), m.where, m.nonce[-12:], m.nack, sorted(m.names)[:3])
                        for m in recorder.messages
                        if m.type_url == RDS and m.at >= at
                    ]
                    raise RuntimeError(f"learn not complete: {missing} {rds}") from None
        proxy.proxy.tap = None
    stages = {
        name: _percentiles([t[name] for t in timelines])
        for name in STAGES
        if timelines[0][name] is not None
    }
    total = _percentiles([t["total"] for t in timelines])
    return {
        "services": n,
        "kind": kind,
        "protocol": "delta" if delta else "sotw",
        "batch": batch,
        "store": store,
        "learns": len(timelines),
        "total_ms": total,
        "stages_ms": stages,
    }


async def _first_request(listen: int, mesh, target: ServicePort, pool: ThreadPoolExecutor) -> float:
    """The first request to `target`, from a thread of its own (so that a batch goes out at
    once); when it was sent."""
    service = mesh.services[target.host]

    def send() -> tuple[float, int]:
        sent = time.time()
        reply = request_via_sidecar(
            listen, (service.cluster_ip, target.port), target.host, "127.0.0.2"
        )
        return sent, reply.status

    sent, status = await asyncio.get_running_loop().run_in_executor(pool, send)
    if status != 200:
        raise RuntimeError(f"first request to {target} failed: {status}")
    return sent


async def _first_connection(
    listen: int, mesh, target: ServicePort, pool: ThreadPoolExecutor
) -> float:
    """The first connection to the TCP service `target` (through the egress tunnel), checked
    end to end with an echo; when it was opened."""
    service = mesh.services[target.host]

    def connect() -> tuple[float, bool]:
        opened = time.time()
        with connect_via_sidecar(listen, (service.cluster_ip, target.port), "127.0.0.2") as conn:
            return opened, echoes(conn)

    opened, ok = await asyncio.get_running_loop().run_in_executor(pool, connect)
    if not ok:
        raise RuntimeError(f"no echo from {target} through the tunnel")
    return opened


def write_results(points: list[dict]) -> None:
    save_json("learn_stages", points)
    lines = [
        "## Learn latency, stage by stage (`python -m benchmarks.learn_stages`)",
        "",
        "A first HTTP request through the egress until the sidecar has ACKed the route that",
        "sends the next one direct; for TCP, a first connection through the tunnel until the",
        "sidecar runs Istio's cluster, warmed, in its placeholder's place. Real Envoys, the",
        "simulated Istiod (named-ports profile: 1 in 10 services TCP, kept as placeholders).",
        "Milliseconds, p50 / p99 over the learns. Each",
        "stage starts where the one before it ends, but for `EDS asked` and `CDS ACKed`, which",
        "both start when the CDS is written (Envoy asks EDS for a new cluster before it ACKs",
        "the CDS), and `route pushed`, which starts at the later of the two ACKs. `EDS asked`",
        "and `CDS ACKed` are the sidecar Envoy applying the CDS; `egress → ALS` is the first",
        "request's own trip through the egress and the test backend (one Python thread, which",
        "answers a batch's requests in turn), then the access log entry.",
        "",
        "| services | kind | protocol | batch | store | learns | total | "
        + " | ".join(STAGES)
        + " |",
        "|" + "---:|" * (7 + len(STAGES)),
    ]
    for p in points:
        cells = [
            f"{p['stages_ms'][s]['p50']:.1f} / {p['stages_ms'][s]['p99']:.1f}"
            if s in p["stages_ms"]
            else "-"
            for s in STAGES
        ]
        total = f"{p['total_ms']['p50']:.1f} / {p['total_ms']['p99']:.1f}"
        lines.append(
            f"| {p['services']:,} | {p.get('kind', 'http')} | {p['protocol']} | {p['batch']} | "
            f"{p['store']} | "
            f"{p['learns']} | {total} | " + " | ".join(cells) + " |"
        )
    update_section(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 10000])
    parser.add_argument("--protocols", nargs="+", default=["sotw", "delta"])
    parser.add_argument("--learns", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--stores", nargs="+", default=["memory", "sqlite"])
    parser.add_argument("--kinds", nargs="+", default=["http", "tcp"])
    args = parser.parse_args()
    points = []
    for n in args.sizes:
        for protocol in args.protocols:
            for batch in args.batch:
                for store in args.stores:
                    for kind in args.kinds:
                        point = asyncio.run(
                            run(n, protocol == "delta", args.learns, batch, store, kind)
                        )
                        print(json.dumps(point), flush=True)
                        points.append(point)
    write_results(points)


if __name__ == "__main__":
    main()
