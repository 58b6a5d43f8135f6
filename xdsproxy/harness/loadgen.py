"""Lightweight xDS clients that ACK the way Envoy does, for load benchmarks.

Each client opens an ADS stream (SotW or Delta), subscribes to CDS and LDS as wildcards, then
to EDS for every EDS cluster and RDS for every route table it is sent, and ACKs each response
with its nonce and version. It keeps only names, so thousands fit in one process.

Run as a process: `python -m xdsproxy.harness.loadgen --target HOST:PORT --clients M
[--delta] [--trace K]`; it prints `ready N` once every client holds CDS, EDS, LDS and RDS,
then `pushes N` lines as pushes arrive (and, with `--trace`, `eds CLIENT VERSION TIME` for
each EDS push to the first K clients once all are in sync), and runs until killed.
"""

import argparse
import asyncio
import contextlib
import random
import sys
import time

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from xdsproxy.server.grpcio import DELTA_METHOD, SOTW_METHOD, message_options, method_path
from xdsproxy.wire import lean, typeurls
from xdsproxy.wire.codec import decode_delta_response

CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE
ALL_TYPES = frozenset({CDS, EDS, LDS, RDS})


def _node_id(index: int) -> str:
    ip = f"10.{index // 65536}.{index // 256 % 256}.{index % 256}"
    return f"sidecar~{ip}~load-{index}.ns-0~ns-0.svc.cluster.local"


def _first(request: DiscoveryRequest | DeltaDiscoveryRequest, index: int) -> None:
    request.node.id = _node_id(index)
    request.node.metadata.update({"NAMESPACE": "ns-0", "WORKLOAD_NAME": f"load-{index}"})


class Client:
    def __init__(
        self,
        target: str,
        index: int,
        delta: bool,
        stats: "Stats",
        trace: bool = False,
        types: frozenset[str] = ALL_TYPES,
    ) -> None:
        self.target, self.index, self.delta, self.stats = target, index, delta, stats
        self.trace = trace  # print when each EDS push arrives, for latency benchmarks
        self.types = types  # what the client subscribes to
        self.seen: set[str] = set()

    async def run(self, reconnect: bool) -> None:
        """One stream; with `reconnect`, a new one after each end, with Envoy-like jittered
        backoff, starting from scratch as a restarted Envoy's agent would."""
        while True:
            options = [*message_options(), ("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(self.target, options=options) as channel:
                method = method_path(DELTA_METHOD if self.delta else SOTW_METHOD)
                self.call = channel.stream_stream(method)()
                self.seen = set()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self._stream()
            if not reconnect:
                return
            self.stats.reconnects += 1
            await asyncio.sleep(random.uniform(0.1, 1.0))

    async def _stream(self) -> None:
        send = self._delta_request if self.delta else self._sotw_request
        await self.call.write(send(CDS, first=True))
        if LDS in self.types:
            await self.call.write(send(LDS))
        while (data := await self.call.read()) is not grpc.aio.EOF:
            for request in (self._on_delta if self.delta else self._on_sotw)(data):
                await self.call.write(request)

    def _sotw_request(self, type_url: str, names=(), version="", nonce="", first=False) -> bytes:
        request = DiscoveryRequest(
            type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
        )
        if first:
            _first(request, self.index)
        return request.SerializeToString()

    def _delta_request(self, type_url: str, subscribe=(), nonce="", first=False) -> bytes:
        request = DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribe, response_nonce=nonce
        )
        if first:
            _first(request, self.index)
        return request.SerializeToString()

    def _note(self, type_url: str, version: str) -> None:
        if self.trace and type_url == EDS and self.stats.ready >= self.stats.clients:
            print(f"eds {self.index} {version} {time.time():.6f}", flush=False)
        self.stats.pushes += 1
        if type_url not in self.seen:
            self.seen.add(type_url)
            if self.seen >= self.types:
                self.stats.ready += 1

    def _on_sotw(self, data: bytes) -> list[bytes]:
        envelope = lean.SotwResponse.FromString(data)
        type_url = envelope.type_url
        self._note(type_url, envelope.version_info)
        out = [
            self._sotw_request(
                type_url, self._names(type_url), envelope.version_info, envelope.nonce
            )
        ]
        follow = EDS if type_url == CDS else RDS
        if type_url in (CDS, LDS) and follow in self.types:
            names = self._wanted(type_url, data)
            out.append(self._sotw_request(follow, names))
            setattr(self, f"_{follow.rsplit('.', 1)[-1]}", names)
        return out

    def _names(self, type_url: str) -> tuple[str, ...]:
        return getattr(self, f"_{type_url.rsplit('.', 1)[-1]}", ())

    @staticmethod
    def _wanted(type_url: str, data: bytes) -> tuple[str, ...]:
        names = [entry.value.name for entry in lean.SotwNames.FromString(data).resources]
        if type_url == CDS:
            return tuple(n for n in names if n.startswith("outbound|"))
        ports = [n.rsplit("_", 1)[-1] for n in names if n.startswith("0.0.0.0_")]
        return tuple(p for p in ports if p.isdigit())

    def _on_delta(self, data: bytes) -> list[bytes]:
        response = decode_delta_response(data)
        self._note(response.type_url, response.system_version)
        out = [self._delta_request(response.type_url, nonce=response.nonce)]
        if response.type_url == CDS and EDS in self.types:
            new = tuple(n for n in response.names if n.startswith("outbound|"))
            if new:
                out.append(self._delta_request(EDS, subscribe=new))
        elif response.type_url == LDS:
            ports = tuple(n.rsplit("_", 1)[-1] for n in response.names if n.startswith("0.0.0.0_"))
            if ports:
                out.append(self._delta_request(RDS, subscribe=ports))
        return out


class Stats:
    clients = 0
    ready = 0  # clients in sync, counted again after each reconnect
    pushes = 0
    reconnects = 0


async def main(
    target: str,
    clients: int,
    delta: bool,
    ramp: float,
    reconnect: bool,
    trace: int = 0,
    types: frozenset[str] = ALL_TYPES,
) -> None:
    stats = Stats()
    stats.clients = clients
    tasks = []
    for index in range(clients):
        client = Client(target, index, delta, stats, trace=index < trace, types=types)
        tasks.append(asyncio.create_task(client.run(reconnect)))
        if ramp:
            await asyncio.sleep(ramp)
    announced = 0
    last_pushes = -1
    while True:
        await asyncio.sleep(0.1)
        if stats.ready >= clients * (announced + 1):
            # Every client synced once more: first start, then after each reconnect storm.
            print(f"ready {clients} {time.time():.3f}", flush=True)
            announced += 1
        sys.stdout.flush()
        if announced and stats.pushes != last_pushes:
            print(f"pushes {stats.pushes} {time.time():.3f}", flush=True)
            last_pushes = stats.pushes
        if all(t.done() for t in tasks):
            print("all streams ended", file=sys.stderr, flush=True)
            return


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--delta", action="store_true")
    parser.add_argument("--ramp", type=float, default=0.005, help="seconds between clients")
    parser.add_argument("--reconnect", action="store_true", help="reconnect when a stream ends")
    parser.add_argument(
        "--trace", type=int, default=0, metavar="K", help="the first K clients print EDS arrivals"
    )
    parser.add_argument("--cds-only", action="store_true", help="subscribe to clusters only")
    args = parser.parse_args()
    types = frozenset({CDS}) if args.cds_only else ALL_TYPES
    asyncio.run(
        main(args.target, args.clients, args.delta, args.ramp, args.reconnect, args.trace, types)
    )
