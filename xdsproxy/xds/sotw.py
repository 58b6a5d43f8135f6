"""State of one State-of-the-World ADS stream between Envoy and Istiod.

Two sources of responses share the stream. A response that relays an upstream response keeps
the upstream nonce and version, so Envoy's ACK or NACK of it maps to Istiod one to one. A
response xdsproxy originates (a scope widened, a dependency changed, a type served locally)
carries a nonce with `LOCAL_NONCE_PREFIX`; Envoy's answer to it stays local. Only an answer to
the newest response of its type is acted on: Istiod ignores stale nonces anyway, and Envoy
answers the newest one too.

An upstream response that leaves what Envoy holds unchanged (a change outside a scoped
sidecar's view) is not sent to Envoy when Envoy has accepted what it holds: xdsproxy ACKs it to
Istiod itself, so such a change costs Envoy nothing and xdsproxy no encode or write. Envoy's
pushed response then stands for the upstream's newest one (`Exchange.cover`), and Envoy's later
answers to it are treated like answers to a local response.

A selection computed before its inputs have arrived on this stream is never pushed: after a
reconnect Istiod sends CDS before LDS, and a sidecar's clusters depend on its listeners (TCP
services), so pushing then would remove clusters Envoy holds and add them back a moment later,
draining their connections. A type whose inputs Envoy has requested here but the upstream has
not answered yet is held back; once they arrive, its newest upstream response is relayed
with Istiod's nonce, so Envoy's answer still reaches Istiod (docs/protocol.md, "inputs").

Clusters are added before what names them and removed after it: a listener or route table
naming a cluster Envoy has not warmed is held back the same way until Envoy has ACKed it (and
its endpoints), and CDS keeps a cluster while a listener or table Envoy may hold still names
it. Whether a push goes out or is held back is decided in `xds.holds`, for both protocols;
this module encodes the decision.
"""

import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf.message import DecodeError

from xdsproxy.wire import lean, typeurls
from xdsproxy.wire.codec import (
    SotwResponse,
    WireError,
    decode_sotw_response,
    encode_sotw_response,
)
from xdsproxy.wire.pool import intern_names
from xdsproxy.wire.typeurls import is_wildcard_type, push_order
from xdsproxy.xds import holds, ordering, shared
from xdsproxy.xds.events import (
    AckedHere,
    Event,
    Nacked,
    SendDownstream,
    SendUpstream,
    UpstreamApplied,
    UpstreamProtocolError,
)
from xdsproxy.xds.exchange import (
    LOCAL_NONCE_PREFIX,
    NOTHING_SUBSCRIBED,
    Answer,
    Exchange,
    Subscription,
    TypeStatus,
)
from xdsproxy.xds.requests import names_span, read_request
from xdsproxy.xds.view import NOTHING, UNSCOPED, ResourceView, Selection


@dataclass(slots=True)
class _TypeState:
    names_bytes: bytes = b""  # the subscribed names as Envoy encoded them, to spot a repeat
    requested_upstream: tuple[str, ...] | None = None  # names last sent upstream
    # What Envoy was pushed and ACKed, and the push held back (`xds.holds`)
    record: holds.Record = field(default_factory=holds.Record)
    exchange: Exchange = field(default_factory=Exchange)


def _superseded_nack(request: DiscoveryRequest | lean.SotwRequestHead) -> list[Event]:
    if not request.HasField("error_detail"):
        return []
    message = request.error_detail.message
    return [Nacked(request.type_url, request.response_nonce, message, relayed=True)]


class SotwStream(holds.Holding):
    def __init__(
        self, view: ResourceView = UNSCOPED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.view = view
        self.node: Node | None = None
        self.local_nacks = 0
        self._clock = clock
        self._types: dict[str, _TypeState] = {}
        self._upstream: dict[str, Selection] = {}
        self._local_nonces = itertools.count(1)

    def status(self) -> dict[str, TypeStatus]:
        return {type_url: state.exchange.status() for type_url, state in self._types.items()}

    def pushed_names(self, type_url: str) -> tuple[str, ...]:
        return self.pushed(type_url).names

    def pushed(self, type_url: str) -> Selection:
        """What Envoy was last sent for the type: names and serialized `Any`s."""
        state = self._types.get(type_url)
        return state.record.pushed if state and state.record.pushed else NOTHING

    def upstream(self, type_url: str) -> Selection:
        return self._upstream.get(type_url, NOTHING)

    def subscription(self, type_url: str) -> Subscription:
        state = self._types.get(type_url)
        return state.exchange.subscription if state else NOTHING_SUBSCRIBED

    # -- from Envoy ------------------------------------------------------------------------

    def _read(self, data: bytes) -> tuple[DiscoveryRequest | lean.SotwRequestHead, tuple[str, ...]]:
        """The request and its resource names. An ACK whose names are byte for byte the ones
        already subscribed (the common case: EDS ACKs repeat thousands) is read without
        decoding them; anything else is decoded and checked in full."""
        if self.node is not None:
            try:
                head = lean.SotwRequestHead.FromString(data)
            except DecodeError:
                head = None  # the full decode below reports it
            state = self._types.get(head.type_url) if head is not None else None
            if state is not None and state.names_bytes and not head.HasField("error_detail"):
                span = names_span(data, head)
                if (
                    span is not None
                    and span[1] - span[0] == len(state.names_bytes)
                    and data.startswith(state.names_bytes, span[0])
                ):
                    return head, state.exchange.subscription.names
        request, self.node = read_request(DiscoveryRequest, data, self.node)
        names_bytes = b""
        if request.resource_names and not request.HasField("error_detail"):
            span = names_span(data, lean.SotwRequestHead.FromString(data))
            if span is not None:
                names_bytes = data[span[0] : span[1]]
        if names_bytes:
            names_bytes, names = shared.shared_names(
                names_bytes, lambda: intern_names(request.resource_names)
            )
        else:
            names = intern_names(request.resource_names)
        # These names become the subscription (see receive_downstream).
        self._types.setdefault(request.type_url, _TypeState()).names_bytes = names_bytes
        return request, names

    def receive_downstream(self, data: bytes) -> list[Event]:
        request, names = self._read(data)
        type_url = request.type_url
        state = self._types.setdefault(type_url, _TypeState())
        exchange = state.exchange
        # Istiod's rule: no names means everything, for the wildcard types (docs/protocol.md R16)
        changed = exchange.subscribe(not names and is_wildcard_type(type_url), names)
        if changed and not exchange.subscription.wildcard and not self.view.transparent:
            self._unwatched(type_url, state)
        nonce = request.response_nonce

        if type_url in self.view.local_types:
            events: list[Event] = []
            if nonce and exchange.is_newest(nonce):
                events += self._record_answer(request)
            if not nonce or changed:
                events += self._push_local(type_url, force=True)
            return events

        if not nonce:
            # A first request for the type, or Envoy's re-request after reconnecting: relayed
            # byte for byte (docs/protocol.md R20).
            state.requested_upstream = names
            return [SendUpstream(data), *self._inputs_settled(type_url, changed)]
        answer = exchange.classify(nonce)
        if answer in (Answer.STALE, Answer.STALE_LOCAL):
            return []  # docs/protocol.md R7
        if answer is Answer.SUPERSEDED:
            # Envoy's answer to Istiod's newest response, which a local push superseded
            # before Envoy answered: still Istiod's to hear (an ACK, or a NACK of its config),
            # or its watch stays un-ACKed (docs/protocol.md R15).
            state.requested_upstream = names
            return [*_superseded_nack(request), SendUpstream(data)]
        events = self._record_answer(request)
        if answer is Answer.RELAYED:
            state.requested_upstream = names
            events.append(SendUpstream(data))
        elif names != state.requested_upstream and exchange.upstream_nonce:
            # A subscription change answered on a local or covering response is still Istiod's
            # business: send it against the newest upstream nonce, with the version Envoy
            # holds from it (docs/protocol.md R3, R6).
            state.requested_upstream = names
            forward = DiscoveryRequest(
                type_url=type_url,
                resource_names=names,
                version_info=exchange.upstream_version,
                response_nonce=exchange.upstream_nonce,
            )
            events.append(SendUpstream(forward.SerializeToString()))
        return events + self._settle(type_url, state)

    def _inputs_settled(self, type_url: str, changed: bool) -> list[Event]:
        """A request naming nothing of a type that is no wildcard is no input: Istiod never
        answers it (docs/protocol.md R28), so what waited for it goes out."""
        if not changed or self.view.transparent or self._subscribes(type_url):
            return []
        return self._refresh(self._dependents(type_url))

    def _unwatched(self, type_url: str, state: _TypeState) -> None:
        """Envoy drops what it stops watching of a type that is no wildcard (a route table no
        listener names, the endpoints of a cluster it no longer has): so does the stream's
        state of it (docs/protocol.md R31)."""
        names = state.exchange.subscription.names
        record = state.record
        if type_url in self._upstream:
            self._upstream[type_url] = shared.merged(self._upstream[type_url], NOTHING, names)
        if record.pushed is not None:
            record.pushed = shared.merged(record.pushed, NOTHING, names)
        if record.acked is not None:
            record.acked = shared.merged(record.acked, NOTHING, names)

    def _record_answer(self, request: DiscoveryRequest) -> list[Event]:
        state = self._types[request.type_url]
        record = state.record
        nacked = state.exchange.answered(request, request.version_info)
        if nacked is None:
            record.note_ack()
            return []
        record.note_nack(record.pushed or NOTHING)
        self.local_nacks += not nacked.relayed
        return [nacked]

    def _settle(self, type_url: str, state: _TypeState) -> list[Event]:
        """After Envoy ACKed a type: what waited for it to warm a cluster, and clusters kept
        only for what it no longer names, can go out now."""
        if not state.exchange.accepted or self.view.transparent:
            return []
        due = set(self._held_types())
        if type_url not in holds.UNNAMING:
            due.add(typeurls.CLUSTER)
        return self._refresh(frozenset(due & set(self._types)))

    # -- from Istiod -----------------------------------------------------------------------

    def receive_upstream(self, data: bytes) -> list[Event]:
        try:
            response = decode_sotw_response(data)
        except WireError as exc:
            raise UpstreamProtocolError(str(exc)) from None
        type_url = response.type_url
        state = self._types.setdefault(type_url, _TypeState())
        exchange = state.exchange
        exchange.record_upstream(response.version, response.nonce)
        exchange.upstream_resources, exchange.upstream_bytes = len(response.bodies), len(data)
        upstream = Selection(response.names, response.bodies)
        if not exchange.subscription.wildcard and not self.view.transparent:
            # Istiod's responses of a type that is no wildcard carry only what they change (an
            # incremental EDS push, the answer to a subscription change), and Envoy keeps the
            # rest: the stream's state of it is every response merged (docs/protocol.md R31).
            upstream = shared.merged(
                self._upstream.get(type_url, NOTHING), upstream, exchange.subscription.names
            )
        self._upstream[type_url] = upstream
        applied = UpstreamApplied(type_url, upstream, len(data))
        return [*self._relay(state, response, data, upstream), applied]

    def _relay(
        self, state: _TypeState, response: SotwResponse, data: bytes, upstream: Selection
    ) -> list[Event]:
        """What Envoy gets for the response just stored: it relayed (narrowed or not), ACKed
        here, or nothing yet (held back)."""
        type_url = response.type_url
        if self.view.transparent:
            self._record_push(state, upstream, response.version, response.nonce, len(data))
            return [SendDownstream(data, type_url, len(upstream.bodies), relayed=True)]
        # Dependents first: clusters a new listener needs must reach Envoy before it
        # (docs/protocol.md R4).
        events = self._refresh(self._dependents(type_url))
        selection, decision = self._selected(
            type_url, state, response.nonce, response.control_plane
        )
        if selection is None:
            return events
        if self._holds_accepted(state, selection):
            # Nothing Envoy holds changes: ACKed here (docs/protocol.md R2).
            state.exchange.cover()
            ack = DiscoveryRequest(
                type_url=type_url,
                version_info=response.version,
                response_nonce=response.nonce,
                resource_names=state.requested_upstream or (),
            )
            events.append(AckedHere(ack.SerializeToString(), type_url))
            return events
        if selection is upstream:
            # Istiod's own bytes (docs/protocol.md R1): Envoy merges them as the stream did
            self._record_push(state, selection, response.version, response.nonce, len(data))
            events.append(SendDownstream(data, type_url, len(response.bodies), relayed=True))
            return events
        return events + self._encode(type_url, state, selection, decision)

    @staticmethod
    def _holds_accepted(state: _TypeState, selection: Selection) -> bool:
        """Envoy holds exactly `selection` and has ACKed the response that brought it."""
        return state.exchange.accepted and selection == state.record.pushed

    # -- what goes out, and when -----------------------------------------------------------

    def _dependents(self, type_url: str) -> frozenset[str]:
        return frozenset(t for t in self._types if type_url in self.view.depends_on(t))

    def _subscribes(self, type_url: str) -> bool:
        subscription = self._types[type_url].exchange.subscription
        return subscription.wildcard or bool(subscription.names)

    def _awaiting_inputs(self, type_url: str) -> frozenset[str]:
        """Inputs of the type's selection that Envoy requested here and the upstream has not
        answered: a selection now could drop what they will keep (docs/protocol.md R9, R10).
        A request naming nothing of a type that is no wildcard is none (R28)."""
        return frozenset(
            t
            for t in self.view.depends_on(type_url)
            if t in self._types and t not in self._upstream and self._subscribes(t)
        )

    def _selected(
        self,
        type_url: str,
        state: _TypeState,
        upstream_nonce: str,
        control_plane: bytes = b"",
        release_before: float | None = None,
    ) -> tuple[Selection | None, holds.Decision]:
        """The type's selection and what to do with it (`xds.holds.decide`); None when it is
        held back."""
        awaiting = self._awaiting_inputs(type_url)
        selection = None if awaiting else self._select(type_url)
        newly_named = frozenset() if selection is None else self._newly_named(type_url, selection)
        decision = self._decide(
            state.record, upstream_nonce, control_plane, awaiting, newly_named, release_before
        )
        if decision.action is holds.Action.HOLD:
            return None, decision
        return selection, decision

    def _newly_named(self, type_url: str, selection: Selection) -> frozenset[str]:
        if type_url in holds.UNNAMING:
            return frozenset()
        references = self.view.references
        names = ordering.names_in(references, type_url, selection)
        return self._types[type_url].record.newly_named(references, type_url, names)

    def _warmth(self) -> holds.Warmth:
        clusters = self._types.get(typeurls.CLUSTER)
        if clusters is None or clusters.record.acked is None:
            return holds.NOT_STARTED
        return holds.Warmth(
            True,
            # While a CDS push is unanswered, what Envoy ACKed before may be on its way out.
            ordering.by_name(clusters.record.acked) if clusters.exchange.accepted else {},
            self._warm_endpoints(),
            ordering.by_name(self._upstream.get(typeurls.CLUSTER, NOTHING)),
            ordering.by_name(clusters.record.pushed or NOTHING),
        )

    def _warm_endpoints(self) -> Collection[str]:
        """EDS clusters whose endpoints Envoy accepted and still watches."""
        endpoints = self._types.get(typeurls.ENDPOINT)
        if endpoints is None or endpoints.record.acked is None:
            return frozenset()
        return ordering.by_name(endpoints.record.acked)

    def _select(self, type_url: str) -> Selection:
        """The view's selection, plus (for CDS) the clusters whose removal must wait."""
        selection = self.view.select(type_url, self._upstream)
        state = self._types.get(type_url)
        if type_url != typeurls.CLUSTER or state is None or not state.record.pushed:
            return selection
        named = ordering.named_by_envoy(
            self.view.references,
            ((t, s.record) for t, s in self._types.items() if t != type_url),
        )
        return ordering.keep_named(
            selection, self._upstream.get(type_url, NOTHING), state.record.pushed.names, named
        )

    def refresh(self) -> list[Event]:
        """Recompute every pushed type; push what differs."""
        return self._refresh(frozenset(self._types))

    def inputs_changed(self, inputs: frozenset[str]) -> list[Event]:
        """Inputs the view reads besides the upstream (a scope, the mesh's route tables)
        changed: recompute only the types that declare them; push what differs
        (docs/protocol.md R27)."""
        return self._refresh(frozenset(t for t in self._types if self.view.depends_on(t) & inputs))

    def _refresh(
        self, type_urls: frozenset[str], release_before: float | None = None
    ) -> list[Event]:
        events: list[Event] = []
        for type_url in push_order(set(type_urls)):
            events += self._push_local(type_url, force=False, release_before=release_before)
        return events

    def _push_local(
        self, type_url: str, force: bool, release_before: float | None = None
    ) -> list[Event]:
        state = self._types.get(type_url)
        if state is None:
            return []
        record = state.record
        due = force or record.hold is not None
        if record.pushed is None and not due:
            return []
        if type_url not in self.view.local_types and type_url not in self._upstream:
            return []
        if not due and self._awaiting_inputs(type_url):
            return []  # pushed once they are in, if it changed by then
        selection, decision = self._selected(type_url, state, "", release_before=release_before)
        if selection is None or (not due and selection == record.pushed):
            return []
        return self._encode(type_url, state, selection, decision)

    def _encode(
        self, type_url: str, state: _TypeState, selection: Selection, decision: holds.Decision
    ) -> list[Event]:
        """A push as decided: Istiod's nonce and version when it carries an Istiod response
        (docs/protocol.md R1), xdsproxy's own otherwise (R3)."""
        exchange = state.exchange
        relayed = bool(decision.upstream_nonce)
        if relayed:
            nonce, version = decision.upstream_nonce, exchange.upstream_version
        else:
            nonce = f"{LOCAL_NONCE_PREFIX}{next(self._local_nonces)}"
            version = f"{exchange.upstream_version or 'local'}+{nonce}"
        payload = encode_sotw_response(
            version, type_url, nonce, selection.bodies, decision.control_plane
        )
        self._record_push(state, selection, version, nonce, len(payload))
        return [SendDownstream(payload, type_url, len(selection.bodies), relayed=relayed)]

    @staticmethod
    def _record_push(
        state: _TypeState, selection: Selection, version: str, nonce: str, size: int
    ) -> None:
        state.record.pushed = selection
        exchange = state.exchange
        exchange.record_push(version, nonce)
        exchange.pushed_resources, exchange.pushed_bytes = len(selection.bodies), size
