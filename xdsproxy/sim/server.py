"""gRPC shell around the simulated Istiod: serves SotW and Delta ADS and pushes on mutations."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import grpc

from xdsproxy.server.grpcio import ads_handler, message_options, server_keepalive, status_code
from xdsproxy.sim.istiod import DeltaConnection, IstiodError, Snapshot, SotwConnection, epoch
from xdsproxy.sim.mesh import Endpoint, Mesh, cluster_name
from xdsproxy.wire import lean, typeurls

log = logging.getLogger("xdsproxy.sim")

_CLOSE = object()


class _Live:
    def __init__(self, connection: SotwConnection | DeltaConnection) -> None:
        self.connection = connection
        self.outbox: asyncio.Queue[object] = asyncio.Queue()


class _PushSent:
    """Put after a full push's responses in an outbox: written, the push frees its slot."""


def _is_endpoints(response: bytes) -> bool:
    return lean.SotwResponse.FromString(response).type_url == typeurls.ENDPOINT


class SimServer:
    """A stand-in for Istiod. Mutate `mesh`, then call `push()` to send the change to everyone."""

    def __init__(
        self, mesh: Mesh, bind_address: str | None = None, proxy_protocol: bool = False
    ) -> None:
        self.mesh = mesh
        self.bind_address = bind_address
        self.proxy_protocol = proxy_protocol
        self.epoch = epoch()
        self.snapshot = self._snapshot()
        self.port = 0
        self.connections_served = 0
        self._live: set[_Live] = set()
        # Istiod's push queue: a full push reaches at most PILOT_PUSH_THROTTLE connections at
        # once, and a connection waiting in the queue gets the newest snapshot when its turn
        # comes (pushes merge; none goes backwards).
        self.push_throttle = 100
        self._queued: dict[_Live, None] = {}
        self._wake = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None
        self._pusher: asyncio.Task[None] | None = None
        self.debounce_seconds = 0.1  # Istiod's PILOT_DEBOUNCE_AFTER
        self.eds_delay_seconds = 0.0  # how late answers to EDS requests come (0: at once)
        self._endpoint_changes: set[str] = set()
        self._debounce: asyncio.TimerHandle | None = None
        # (version, wall time) of each incremental EDS push, for latency benchmarks.
        self.endpoint_pushes: list[tuple[str, float]] = []
        self._server: grpc.aio.Server | None = None

    def connections(self, node_id: str) -> list[SotwConnection | DeltaConnection]:
        """The live connections of a node, as Istiod's debug endpoint lists them."""
        return [
            live.connection
            for live in self._live
            if live.connection.node is not None and live.connection.node.id == node_id
        ]

    @property
    def connected(self) -> int:
        return len(self._live)

    async def start(
        self, listen: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None
    ) -> int:
        server = grpc.aio.server(options=message_options() + server_keepalive())
        server.add_generic_rpc_handlers((ads_handler(self._sotw, self._delta),))
        if credentials is None:
            self.port = server.add_insecure_port(listen)
        else:
            self.port = server.add_secure_port(listen, credentials)
        await server.start()
        self._server = server
        self._slots = asyncio.Semaphore(self.push_throttle)
        self._pusher = asyncio.create_task(self._push_queue())
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self._debounce is not None:
            self._debounce.cancel()
            self._debounce = None
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pusher
            self._pusher = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def _snapshot(self) -> Snapshot:
        return Snapshot(self.mesh, self.epoch, self.bind_address, self.proxy_protocol)

    def mutate(self, change: Callable[[Mesh], None]) -> None:
        change(self.mesh)
        self.push()

    def set_endpoints(self, fqdn: str, endpoints: Iterable[Endpoint]) -> None:
        """An endpoint-only change, pushed after Istiod's debounce as an incremental EDS push
        of just the changed load assignments (several changes within the window share one)."""
        self.mesh.set_endpoints(fqdn, endpoints)
        self._endpoint_changes.add(fqdn)
        if self._debounce is None:
            self._debounce = asyncio.get_running_loop().call_later(
                self.debounce_seconds, self._push_endpoints
            )

    def _push_endpoints(self) -> None:
        fqdns, self._endpoint_changes, self._debounce = self._endpoint_changes, set(), None
        self.snapshot = self.snapshot.with_endpoints(self.mesh, fqdns)
        clusters = frozenset(
            cluster_name(port.number, fqdn, subset)
            for fqdn in fqdns
            if (service := self.mesh.services.get(fqdn)) is not None
            for port in service.ports
            for subset in ["", *(name for name, _ in service.subsets)]
        )
        self.endpoint_pushes.append((self.snapshot.version, time.time()))
        for live in list(self._live):
            for response in live.connection.push_endpoints(self.snapshot, clusters):
                live.outbox.put_nowait(response)

    def push(self) -> None:
        """Rebuild the snapshot and queue a full push to every connected node, as Istiod does
        after its debounce."""
        self.snapshot = self._snapshot()
        for live in self._live:
            self._queued[live] = None
        self._wake.set()

    async def _push_queue(self) -> None:
        assert self._slots is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                live = next(iter(self._queued))
                del self._queued[live]
                if live not in self._live:
                    continue
                await self._slots.acquire()
                for response in live.connection.push(self.snapshot):
                    live.outbox.put_nowait(response)
                live.outbox.put_nowait(_PushSent())

    def _free_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _sotw(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        await self._serve(SotwConnection(self.snapshot), context)

    async def _delta(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        await self._serve(DeltaConnection(self.snapshot), context)

    async def _serve(
        self, connection: SotwConnection | DeltaConnection, context: grpc.aio.ServicerContext
    ) -> None:
        live = _Live(connection)
        self._live.add(live)
        self.connections_served += 1
        reader = asyncio.create_task(self._read(live, context))
        try:
            while (item := await live.outbox.get()) is not _CLOSE:
                if isinstance(item, _PushSent):
                    self._free_slot()
                    continue
                if isinstance(item, IstiodError):
                    await context.abort(status_code(item.code), str(item))
                assert isinstance(item, bytes)
                await context.write(item)
                del item  # a push is megabytes; do not hold the last one per connection
        except asyncio.CancelledError:
            pass  # the client went away
        finally:
            self._live.discard(live)
            self._queued.pop(live, None)
            while not live.outbox.empty():
                if isinstance(live.outbox.get_nowait(), _PushSent):
                    self._free_slot()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, live: _Live, context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (data := await context.read()) is not grpc.aio.EOF:
                for response in live.connection.receive(data):
                    if self.eds_delay_seconds and _is_endpoints(response):
                        # A loaded Istiod: answers to EDS requests come late (tests of the
                        # make-before-break order). Pushes are not delayed.
                        loop.call_later(self.eds_delay_seconds, live.outbox.put_nowait, response)
                    else:
                        live.outbox.put_nowait(response)
                    del response
        except IstiodError as exc:
            live.outbox.put_nowait(exc)
            return
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        live.outbox.put_nowait(_CLOSE)
