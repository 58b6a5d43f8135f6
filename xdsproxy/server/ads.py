"""The downstream ADS server: one upstream stream per downstream stream, bytes in and out.

Each downstream stream runs four pieces: a reader of Envoy's requests, a reader of Istiod's
responses, and one writer per direction, each draining one outbox. Both readers produce
messages for Istiod (Envoy's answers; xdsproxy's own ACKs), and gRPC allows one outstanding
write per call (a second fails with "Internal error from Core" and ends the stream), so
neither reader ever writes: every message goes through its direction's outbox. All protocol
decisions are made by the pure state machines in `xdsproxy.xds`.
"""

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from xdsproxy.debug.metrics import Metrics, metric_type
from xdsproxy.logs import RateLimitedLog
from xdsproxy.server.grpcio import DELTA_METHOD, SOTW_METHOD
from xdsproxy.server.upstream import Channels, Upstream, forwardable_metadata
from xdsproxy.wire.typeurls import short_name
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import (
    AckedHere,
    Event,
    Nacked,
    ProtocolError,
    SendDownstream,
    SendUpstream,
    UpstreamApplied,
    UpstreamProtocolError,
)
from xdsproxy.xds.sotw import SotwStream
from xdsproxy.xds.view import UNSCOPED, ResourceView

log = logging.getLogger("xdsproxy.ads")

# Istiod's own answers to a bad node or token are the sidecar's business: relay them as they are.
_RELAYED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True, slots=True)
class _End:
    code: grpc.StatusCode
    message: str


@dataclass(eq=False)
class Session:
    """One downstream stream, as the debug endpoint and shutdown see it."""

    id: int
    protocol: str
    peer: str
    stream: SotwStream | DeltaStream
    # The proxy's way of queueing a stream's events (its outboxes, the warm-wait timer)
    apply: Callable[["Session", list[Event]], None] = field(repr=False)
    connected_at: float = field(default_factory=time.time)
    # (payload, type label, when the Istiod response it answers arrived; None for local pushes)
    outbox: asyncio.Queue[tuple[bytes, str, float | None]] = field(default_factory=asyncio.Queue)
    upstream_received: float | None = None  # set while an Istiod response is being applied
    # One writer per upstream call (docs/protocol.md R19): both readers queue here.
    upstream_outbox: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    upstream_pending_bytes: int = 0
    # Set while few enough bytes wait for Istiod that reading Envoy's next request is fine
    # (docs/protocol.md R30).
    upstream_drained: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Future[_End] = field(default_factory=asyncio.Future)
    pending_bytes: int = 0
    writing: bool = False  # a message is handed to gRPC and not yet sent
    # Set while few enough bytes wait for Envoy that reading Istiod's next response is fine.
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    # Sends Istiod's config that waits for clusters to warm once it has waited
    # `WARM_WAIT_SECONDS`, armed for the oldest such hold (docs/protocol.md R13)
    release_timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.drained.set()
        self.upstream_drained.set()

    @property
    def node_id(self) -> str:
        return self.stream.node.id if self.stream.node is not None else ""

    def refresh(self, inputs: frozenset[str]) -> None:
        """Inputs this stream's view reads besides the upstream changed (a scope widened, the
        mesh's route tables): push what they change."""
        self.apply(self, self.stream.inputs_changed(inputs))

    def end(self, code: grpc.StatusCode, message: str) -> None:
        """The first reason to end wins; the writer is cancelled even if blocked on Envoy."""
        if not self.ended.done():
            self.ended.set_result(_End(code, message))


# How long a listener or route table may wait for the clusters it names to warm (their EDS
# answered and ACKed) before it is pushed anyway: an answer that never comes must not hold a
# sidecar's routes back for ever (Envoy then warms, or 503s, as without xdsproxy).
WARM_WAIT_SECONDS = 5.0  # docs/protocol.md R13


@dataclass
class Limits:
    max_pending_bytes: int = 128 * 1024 * 1024
    # Backpressure (docs/protocol.md R25): while more than this waits for a sidecar, its
    # upstream stream is not read, so Istiod's flow control (and its push throttle) sees a slow
    # Envoy as it would without xdsproxy, and each stream holds at most about one response.
    # Otherwise a full push to many slow readers would sit in xdsproxy's memory all at once.
    pause_upstream_bytes: int = 1024 * 1024
    # gRPC accepts a stream's status only after the message it is sending has gone out: how
    # long an ended stream waits for a slow reader to take it, so the status can follow
    # (docs/protocol.md R26).
    final_write_seconds: float = 10.0
    # Flow control towards Istiod (docs/protocol.md R30): while more than this waits to be
    # written upstream for a sidecar, its requests are not read. Nothing is dropped or
    # reordered; Envoy's own HTTP/2 window then holds its requests back.
    pause_requests_bytes: int = 1024 * 1024


class Runtime(Protocol):
    """What a mode adds around the streams: the view each node gets and what happens when
    streams open, close and receive upstream config."""

    def opened(self, session: "Session") -> ResourceView:
        """A stream has its node: register it, and the view it gets."""
        ...

    def closed(self, session: "Session") -> None: ...

    def upstream_applied(self, session: "Session", applied: UpstreamApplied) -> None:
        """An upstream response is the stream's current content of its type."""
        ...

    def nacked(self, session: "Session", nack: Nacked) -> None: ...


class PassthroughRuntime:
    """Passthrough mode: every node gets Istiod's config unscoped, and nothing is learned."""

    def opened(self, session: "Session") -> ResourceView:
        return UNSCOPED

    def closed(self, session: "Session") -> None:
        pass

    def upstream_applied(self, session: "Session", applied: UpstreamApplied) -> None:
        pass

    def nacked(self, session: "Session", nack: Nacked) -> None:
        pass


# A tap on every message of every stream, as it crosses xdsproxy's edge: (session, where,
# bytes), where is FROM_ENVOY, TO_ENVOY (as handed to gRPC), FROM_ISTIOD or TO_ISTIOD (as
# handed to gRPC; a peer's answer can arrive before the write call returns). For benchmarks
# that time what a user waits for, stage by stage; None in service.
FROM_ENVOY, TO_ENVOY, FROM_ISTIOD, TO_ISTIOD = "from envoy", "to envoy", "from istiod", "to istiod"
Tap = Callable[["Session", str, bytes], None]


class AdsProxy:
    tap: Tap | None = None

    def __init__(
        self,
        upstream: Upstream | Channels,
        runtime: Runtime | None = None,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.channels = upstream if isinstance(upstream, Channels) else Channels(upstream)
        self.runtime = runtime or PassthroughRuntime()
        self.metrics = metrics or Metrics()
        self.limits = limits or Limits()
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._upstream_warnings = RateLimitedLog(log)
        self._closing = False

    def _enqueue(self, session: Session, event: SendDownstream) -> None:
        kind = metric_type(event.type_url)
        self.metrics.pushes.labels(kind, "relayed" if event.relayed else "local").inc()
        self.metrics.downstream_bytes.labels(kind).inc(len(event.payload))
        session.pending_bytes += len(event.payload)
        if session.pending_bytes > self.limits.pause_upstream_bytes:
            session.drained.clear()
        if session.pending_bytes > self.limits.max_pending_bytes:
            session.end(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self.limits.max_pending_bytes} bytes wait for a slow reader",
            )
            return
        session.outbox.put_nowait((event.payload, kind, session.upstream_received))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "push",
                extra={
                    "node": session.node_id,
                    "type": kind,
                    "resources": event.resource_count,
                    "bytes": len(event.payload),
                    "origin": "relayed" if event.relayed else "local",
                },
            )

    async def sotw(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        await self._proxy(SOTW_METHOD, SotwStream(), context)

    async def delta(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        await self._proxy(DELTA_METHOD, DeltaStream(), context)

    def shutdown(self) -> None:
        """End every stream with UNAVAILABLE so each Envoy keeps its config and reconnects."""
        self._closing = True
        for session in list(self.sessions.values()):
            session.end(grpc.StatusCode.UNAVAILABLE, "xdsproxy is shutting down")

    async def _proxy(
        self, method: str, stream: SotwStream | DeltaStream, context: grpc.aio.ServicerContext
    ) -> None:
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "xdsproxy is shutting down")
        protocol = "SotW" if method == SOTW_METHOD else "Delta"
        session = Session(next(self._ids), protocol, context.peer(), stream, self._apply)
        try:
            first = await context.read()
        except asyncio.CancelledError:
            return  # Envoy went away before saying anything
        if first is grpc.aio.EOF:
            return
        try:
            first_events = stream.receive_downstream(first)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        assert stream.node is not None
        self.sessions[session.id] = session
        stream.view = self.runtime.opened(session)
        self.metrics.streams_opened.labels(protocol).inc()
        self.metrics.streams.labels(protocol).inc()
        log.info(
            "stream opened",
            extra={"node": session.node_id, "protocol": protocol, "peer": session.peer},
        )
        async with self.channels.lease() as channel:
            await self._relay(session, method, context, channel, first_events)

    async def _relay(
        self,
        session: Session,
        method: str,
        context: grpc.aio.ServicerContext,
        channel: grpc.aio.Channel,
        first_events: list[Event],
    ) -> None:
        protocol = session.protocol
        call: grpc.aio.StreamStreamCall | None = None
        tasks: list[asyncio.Task[None]] = []
        abandoned = False
        try:
            call = Upstream.call(
                channel, method, forwardable_metadata(context.invocation_metadata() or ())
            )
            tasks = [
                asyncio.create_task(self._pump_downstream(session, context, first_events)),
                asyncio.create_task(self._pump_upstream(session, call)),
                asyncio.create_task(self._drain_upstream(session, call)),
                asyncio.create_task(self._drain(session, context)),
            ]
            end = await session.ended
            self.sessions.pop(session.id, None)
            self._log_end(session, end.code.name, end.message)
            if not await self._finish_write(session, tasks):
                abandoned = True  # the peer never took its last message: no status can follow
            elif end.code != grpc.StatusCode.OK:
                await context.abort(end.code, end.message)
        except asyncio.CancelledError:
            if not session.ended.done():  # Envoy went away
                self._log_end(session, "CANCELLED", "envoy closed the stream")
        finally:
            self.sessions.pop(session.id, None)
            if session.release_timer is not None:
                session.release_timer.cancel()
            self.metrics.upstream_outbox_bytes.dec(session.upstream_pending_bytes)
            session.upstream_pending_bytes = 0
            self.runtime.closed(session)
            self.metrics.streams.labels(protocol).dec()
            for task in tasks:
                task.cancel()
            if call is not None:
                call.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if abandoned:
            # Cancelled is the one ending gRPC takes while a message is still in flight.
            raise asyncio.CancelledError

    @staticmethod
    def _log_end(session: Session, code: str, reason: str) -> None:
        log.info(
            "stream ended",
            extra={
                "node": session.node_id,
                "protocol": session.protocol,
                "code": code,
                "reason": reason,
                "seconds": round(time.time() - session.connected_at, 1),
            },
        )

    def _upstream_failed(self, session: Session, code: str, reason: str) -> None:
        """Counted, and logged at warning once a minute per code: when Istiod restarts, every
        stream fails at once, and each stream's end is logged already."""
        self.metrics.upstream_error(code)
        self._upstream_warnings.warning(
            code,
            "istiod stream failed",
            extra={"code": code, "reason": reason, "node": session.node_id},
        )

    async def _finish_write(self, session: Session, tasks: list[asyncio.Task[None]]) -> bool:
        """Stop the pumps and the writer, letting a write in flight complete (bounded). False
        if it did not."""
        *pumps, drain = tasks
        for task in pumps:
            task.cancel()
        while not session.outbox.empty():
            session.outbox.get_nowait()  # what was never sent is let go at once
        if session.writing:
            await asyncio.wait({drain}, timeout=self.limits.final_write_seconds)
        drain.cancel()
        return not session.writing

    async def _drain(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        try:
            while not session.ended.done():
                item, kind, received = await session.outbox.get()
                if self.tap is not None:
                    self.tap(session, TO_ENVOY, item)
                session.writing = True
                await context.write(item)
                session.writing = False
                if received is not None:
                    self.metrics.push_latency.labels(kind).observe(time.monotonic() - received)
                session.pending_bytes -= len(item)
                if session.pending_bytes <= self.limits.pause_upstream_bytes:
                    session.drained.set()
                del item  # not held while waiting: see _pump_upstream
        except (asyncio.InvalidStateError, grpc.aio.UsageError, RuntimeError):
            session.end(grpc.StatusCode.CANCELLED, "downstream went away")

    async def _drain_upstream(self, session: Session, call: grpc.aio.StreamStreamCall) -> None:
        """The one writer of the upstream call, in the order the readers queued."""
        try:
            while not session.ended.done():
                payload = await session.upstream_outbox.get()
                if self.tap is not None:
                    self.tap(session, TO_ISTIOD, payload)
                await call.write(payload)
                self._upstream_written(session, len(payload))
        except grpc.aio.AioRpcError as exc:
            session.end(grpc.StatusCode.UNAVAILABLE, f"upstream: {exc.details()}")
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            session.end(grpc.StatusCode.UNAVAILABLE, "upstream stream closed")

    async def _pump_downstream(
        self, session: Session, context: grpc.aio.ServicerContext, first_events: list[Event]
    ) -> None:
        try:
            self._apply(session, first_events)
            while (
                await session.upstream_drained.wait()
                and (data := await context.read()) is not grpc.aio.EOF
            ):
                if self.tap is not None:
                    self.tap(session, FROM_ENVOY, data)
                self._apply(session, session.stream.receive_downstream(data))
            session.end(grpc.StatusCode.OK, "")
        except ProtocolError as exc:
            session.end(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _pump_upstream(self, session: Session, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while await session.drained.wait() and (data := await call.read()) is not grpc.aio.EOF:
                self._on_upstream(session, data)
                # Drop the response before waiting for the next: a full push is megabytes,
                # and holding the last one per stream would cost that much per sidecar.
                del data
            code = await call.code()
            self._upstream_failed(session, code.name, "istiod closed the stream")
            session.end(grpc.StatusCode.UNAVAILABLE, f"upstream closed the stream ({code.name})")
        except UpstreamProtocolError as exc:
            self._upstream_failed(session, "INVALID_ARGUMENT", f"a bad message: {exc}")
            session.end(grpc.StatusCode.UNAVAILABLE, f"upstream sent a bad message: {exc}")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            self._upstream_failed(session, code.name, exc.details() or code.name)
            relayed = code if code in _RELAYED_CODES else grpc.StatusCode.UNAVAILABLE
            session.end(relayed, f"upstream: {exc.details() or code.name}")

    def _on_upstream(self, session: Session, data: bytes) -> None:
        if self.tap is not None:
            self.tap(session, FROM_ISTIOD, data)
        session.upstream_received = time.monotonic()
        try:
            self._apply(session, session.stream.receive_upstream(data))
        finally:
            session.upstream_received = None

    def _apply(self, session: Session, events: list[Event]) -> None:
        self._apply_events(session, events)
        self._arm_release(session)

    def _arm_release(self, session: Session) -> None:
        """The release timer follows the oldest hold of Istiod's config, whenever it started
        (docs/protocol.md R13): a hold that ended takes its timer with it."""
        oldest = session.stream.oldest_hold()
        timer = session.release_timer
        due = None if oldest is None else oldest + WARM_WAIT_SECONDS
        if timer is not None and due is not None and abs(timer.when() - due) < 0.001:
            return
        if timer is not None:
            timer.cancel()
            session.release_timer = None
        if due is not None:
            # The streams' clock is time.monotonic, as is the event loop's.
            session.release_timer = asyncio.get_running_loop().call_at(
                due, lambda: self._release(session)
            )

    def _release(self, session: Session) -> None:
        session.release_timer = None
        if session.id in self.sessions:
            started_before = time.monotonic() - WARM_WAIT_SECONDS
            self._apply(session, session.stream.release(started_before))

    def _enqueue_upstream(self, session: Session, payload: bytes) -> None:
        """Queued for the one upstream writer; past the bound, the sidecar's requests wait
        (docs/protocol.md R30)."""
        session.upstream_outbox.put_nowait(payload)
        session.upstream_pending_bytes += len(payload)
        self.metrics.upstream_outbox_bytes.inc(len(payload))
        if (
            session.upstream_pending_bytes > self.limits.pause_requests_bytes
            and session.upstream_drained.is_set()
        ):
            session.upstream_drained.clear()
            self.metrics.upstream_outbox_pauses.inc()

    def _upstream_written(self, session: Session, size: int) -> None:
        session.upstream_pending_bytes -= size
        self.metrics.upstream_outbox_bytes.dec(size)
        if session.upstream_pending_bytes <= self.limits.pause_requests_bytes:
            session.upstream_drained.set()

    def _apply_events(self, session: Session, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, SendDownstream):
                self._enqueue(session, event)
            elif isinstance(event, SendUpstream):
                self._enqueue_upstream(session, event.payload)
            elif isinstance(event, AckedHere):
                self.metrics.acked_here.labels(metric_type(event.type_url)).inc()
                self._enqueue_upstream(session, event.payload)
            elif isinstance(event, Nacked):
                origin = "relayed" if event.relayed else "local"
                self.metrics.nacks.labels(metric_type(event.type_url), origin).inc()
                # Envoy rejecting config xdsproxy built itself is xdsproxy's own bug.
                log.log(
                    logging.WARNING if event.relayed else logging.ERROR,
                    "envoy rejected a response",
                    extra={
                        "node": session.node_id,
                        "type": short_name(event.type_url),
                        "relayed": event.relayed,
                        "error": event.message[:500],
                    },
                )
                self.runtime.nacked(session, event)
            elif isinstance(event, UpstreamApplied):
                self.metrics.upstream_bytes.labels(metric_type(event.type_url)).inc(event.size)
                self.runtime.upstream_applied(session, event)
