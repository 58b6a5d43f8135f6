"""State of one Delta (incremental) ADS stream between Envoy and Istiod.

Nonces follow the same two-source rule as SotW (see `sotw`). The stream keeps, per type, the
upstream's current resources and what Envoy holds (from `initial_resource_versions` on
reconnect and from every response since). Every upstream response is relayed as exactly one
downstream response with the upstream nonce, holding the difference between what the view
selects and what Envoy holds, so removals are sent only for names Envoy holds.

The exception: when that difference is empty and Envoy has accepted what it holds (a change
outside a scoped sidecar's view, or Istiod resending unchanged resources on a full push),
xdsproxy ACKs the upstream response itself and sends Envoy nothing. Envoy's pushed response then
stands for it (`Exchange.cover`), as a local response would.

As in SotW, nothing is pushed from inputs that have not arrived on this stream: a type whose
selection depends on a type Envoy requested here and the upstream has not answered yet waits,
and its newest upstream response is relayed (with Istiod's nonce) once they have. Otherwise a
reconnect, where Istiod sends CDS before LDS, would remove the clusters Envoy's listeners use.
Whether a push goes out or is held back is decided in `xds.holds`, for both protocols; this
module encodes the decision.
"""

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import LRUCache
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest

from xdsproxy import caches
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import (
    DeltaResponse,
    WireError,
    decode_delta_response,
    encode_delta_resource,
    encode_delta_response,
)
from xdsproxy.wire.typeurls import is_wildcard_type, push_order
from xdsproxy.xds import holds, ordering, shared
from xdsproxy.xds.events import (
    AckedHere,
    Event,
    SendDownstream,
    SendUpstream,
    UpstreamApplied,
    UpstreamProtocolError,
)
from xdsproxy.xds.exchange import LOCAL_NONCE_PREFIX, Exchange, Subscription, TypeStatus
from xdsproxy.xds.requests import read_request
from xdsproxy.xds.shared import EMPTY_MAP, EMPTY_SET, EMPTY_UPSTREAM, FrozenMap, UpstreamMap
from xdsproxy.xds.view import NOTHING, UNSCOPED, ResourceView, Selection

WILDCARD = "*"
# Delta keeps subscribed names as a set, shared from the empty one (see `shared`)
_NOTHING_SUBSCRIBED = Subscription(False, EMPTY_SET)


@dataclass(slots=True)
class _TypeState:
    """The maps are shared with other streams in the same state (see `shared`): replaced on
    every change, never mutated."""

    started: bool = False
    received: bool = False  # the upstream answered this type on this stream
    # What Envoy was pushed and ACKed, as selections (for the types that name clusters), and
    # the push held back (`xds.holds`)
    record: holds.Record = field(default_factory=holds.Record)
    # What the upstream last sent
    upstream: UpstreamMap = field(default_factory=lambda: EMPTY_UPSTREAM)
    # name -> serialized Any Envoy holds; None when only its version is known (reconnect)
    held: FrozenMap[bytes | None] = field(default_factory=lambda: EMPTY_MAP)
    # Names Envoy holds that the upstream removed, until the removal is passed on
    gone: frozenset[str] = EMPTY_SET
    acked: FrozenMap[bytes | None] | None = None  # what Envoy held at its newest ACK
    # nonce -> (names sent, names removed) of every response Envoy has not answered: a NACK
    # undoes one (docs/protocol.md R14); Envoy answers in order, so an answer settles the older
    sent: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    system_version: str = ""
    # The pushed nonce xdsproxy answered newer upstream responses for (see the module doc)
    exchange: Exchange = field(default_factory=lambda: Exchange(subscription=_NOTHING_SUBSCRIBED))

    def upstream_selection(self) -> Selection:
        return self.upstream.selection()


# A held map as a selection, by the map's identity (maps are shared and never change).
_SELECTIONS: LRUCache[int, tuple[FrozenMap, Selection]] = caches.lru("delta_selection")


def _selection_of(held: FrozenMap) -> Selection:
    found = _SELECTIONS.get(id(held))
    if found is not None and found[0] is held:
        return found[1]
    known = [(n, a) for n, a in held.items() if a is not None]
    selection = Selection(tuple(n for n, _ in known), tuple(a for _, a in known))
    _SELECTIONS[id(held)] = (held, selection)
    return selection


class DeltaStream(holds.Holding):
    def __init__(
        self, view: ResourceView = UNSCOPED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.view = view
        self.node: Node | None = None
        self.local_nacks = 0
        self._clock = clock
        self._types: dict[str, _TypeState] = {}
        self._local_nonces = itertools.count(1)

    def status(self) -> dict[str, TypeStatus]:
        return {type_url: state.exchange.status() for type_url, state in self._types.items()}

    def held(self, type_url: str) -> frozenset[str]:
        """Names Envoy holds for the type."""
        state = self._types.get(type_url)
        return frozenset(state.held) if state else frozenset()

    def pushed_names(self, type_url: str) -> tuple[str, ...]:
        return tuple(sorted(self.held(type_url)))

    def pushed(self, type_url: str) -> Selection:
        """What Envoy holds for the type, as sent on this stream (names it held from before a
        reconnect and was not sent again are left out)."""
        state = self._types.get(type_url)
        if state is None:
            return NOTHING
        held = sorted((n, a) for n, a in state.held.items() if a is not None)
        return Selection(tuple(n for n, _ in held), tuple(a for _, a in held))

    def subscription(self, type_url: str) -> Subscription:
        state = self._types.get(type_url)
        return state.exchange.subscription if state else _NOTHING_SUBSCRIBED

    def upstream(self, type_url: str) -> Selection:
        state = self._types.get(type_url)
        return state.upstream_selection() if state else NOTHING

    # -- from Envoy ------------------------------------------------------------------------

    def receive_downstream(self, data: bytes) -> list[Event]:
        request, self.node = read_request(DeltaDiscoveryRequest, data, self.node)
        type_url = request.type_url
        state = self._types.setdefault(type_url, _TypeState())
        first = not state.started
        self._update_subscription(state, request)
        nonce = request.response_nonce
        events: list[Event] = []
        if nonce:
            events += self._record_answer(request, state)
        if type_url in self.view.local_types:
            if first or request.resource_names_subscribe:
                events += self._push(type_url, state, upstream_nonce="")
            return events
        if not nonce or not state.exchange.classify(nonce).ours:
            # Every answer to a relayed response goes up; Istiod judges staleness
            # (docs/protocol.md R8).
            events.append(SendUpstream(data))
        elif request.resource_names_subscribe or request.resource_names_unsubscribe:
            # The answer to a local response stays here, but a subscription change riding on
            # it is Istiod's business: forward it as a plain subscription request
            # (docs/protocol.md R3, R6).
            request.response_nonce = ""
            request.ClearField("error_detail")
            events.append(SendUpstream(request.SerializeToString()))
        if nonce and state.exchange.accepted and nonce == state.exchange.acked_nonce:
            events += self._settle(type_url)
        return events

    def _settle(self, type_url: str) -> list[Event]:
        """After Envoy ACKed a type: what waited for it to warm a cluster, and clusters kept
        only for what it no longer names, can go out now."""
        if self.view.transparent:
            return []
        due = set(self._held_types())
        if type_url not in holds.UNNAMING and typeurls.CLUSTER in self._types:
            due.add(typeurls.CLUSTER)
        return self.refresh(frozenset(due))

    def _named_by_envoy(self, type_url: str) -> frozenset[str]:
        return ordering.named_by_envoy(
            self.view.references,
            (
                (t, s.record)
                for t, s in self._types.items()
                if t != type_url and t not in holds.UNNAMING
            ),
        )

    def _newly_named(self, type_url: str, pairs: list[tuple[str, bytes]]) -> frozenset[str]:
        if type_url in holds.UNNAMING:
            return frozenset()
        # A selection of this push alone: read directly, not memoized (`ordering.names_in`).
        selection = Selection(tuple(n for n, _ in pairs), tuple(a for _, a in pairs))
        names = self.view.references(type_url, selection)
        return self._types[type_url].record.newly_named(self.view.references, type_url, names)

    def _warmth(self) -> holds.Warmth:
        clusters = self._types.get(typeurls.CLUSTER)
        if clusters is None or clusters.acked is None:
            return holds.NOT_STARTED
        endpoints = self._types.get(typeurls.ENDPOINT)
        return holds.Warmth(
            True,
            # While a CDS push is unanswered, what Envoy ACKed before may be on its way out.
            clusters.acked if clusters.exchange.accepted else EMPTY_SET,
            endpoints.acked if endpoints and endpoints.acked else EMPTY_SET,
            ordering.by_name(clusters.upstream.selection()),
            clusters.held,
        )

    def _record_answer(self, request: DeltaDiscoveryRequest, state: _TypeState) -> list[Event]:
        nacked = state.exchange.answered(request, state.exchange.pushed_version)
        sent = self._answered(state, request.response_nonce)
        if nacked is None:
            if state.exchange.accepted:
                state.acked = state.held
                state.record.note_ack()
            return []
        if sent is not None:
            self._undo(request.type_url, state, *sent)
        self.local_nacks += not nacked.relayed
        return [nacked]

    @staticmethod
    def _answered(state: _TypeState, nonce: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """What the answered response carried; the older ones are settled too (Envoy answers
        in order), so nothing is forgotten while answers are on their way back."""
        if nonce not in state.sent:
            return None
        while True:
            first = next(iter(state.sent))
            carried = state.sent.pop(first)
            if first == nonce:
                return carried

    def _undo(
        self, type_url: str, state: _TypeState, names: tuple[str, ...], removed: tuple[str, ...]
    ) -> None:
        """docs/protocol.md R14. Envoy may have applied some of it, or none (it applies the
        valid resources of a NACKed CDS or LDS response): what it holds of those names is no
        longer known, so the next push offers them again and nothing is ACKed here on Envoy's
        behalf; until Envoy ACKs again, the clusters they name count as named (R12)."""
        held = state.held
        rejected = [(n, held[n]) for n in names if held.get(n) is not None]
        state.record.note_nack(
            Selection(tuple(n for n, _ in rejected), tuple(a for _, a in rejected))
        )
        unknown = names + removed
        state.held = shared.updated(held, unknown, (None,) * len(unknown), ())
        self._note_held(type_url, state)
        state.gone = state.gone | frozenset(removed)  # to be removed again if still due

    def _update_subscription(self, state: _TypeState, request: DeltaDiscoveryRequest) -> None:
        subscribe, unsubscribe = (
            request.resource_names_subscribe,
            request.resource_names_unsubscribe,
        )
        current = state.exchange.subscription
        wildcard = current.wildcard
        if not state.started:
            state.started = True
            # An empty first request subscribes to everything for wildcard-capable types
            # (docs/protocol.md R22); what Envoy says it holds counts as held
            # (docs/protocol.md R23).
            wildcard = not subscribe and is_wildcard_type(request.type_url)
            if request.initial_resource_versions:
                state.held = shared.held_unknown(frozenset(request.initial_resource_versions))
        if WILDCARD in subscribe:
            wildcard = True
        if WILDCARD in unsubscribe:
            wildcard = False
        added = tuple(n for n in subscribe if n != WILDCARD)
        dropped = tuple(n for n in unsubscribe if n != WILDCARD)
        state.exchange.subscribe(wildcard, shared.subscribed(current.names, added, dropped))
        if dropped:
            # Envoy drops what it unsubscribes; the upstream stops sending it.
            state.held = shared.without(state.held, dropped)
            self._note_held(request.type_url, state)
            if state.acked is not None:
                state.acked = shared.without(state.acked, dropped)
                if request.type_url not in holds.UNNAMING:
                    state.record.acked = _selection_of(state.acked)
            state.upstream = shared.without(state.upstream, dropped)

    # -- from Istiod -----------------------------------------------------------------------

    def receive_upstream(self, data: bytes) -> list[Event]:
        try:
            response = decode_delta_response(data)
        except WireError as exc:
            raise UpstreamProtocolError(str(exc)) from None
        type_url = response.type_url
        state = self._types.setdefault(type_url, _TypeState())
        # Named by content, so every stream that gets these resources shares the result.
        content = response.resources_id or None
        upstream = state.upstream = shared.updated(
            state.upstream,
            response.names,
            zip(response.bodies, response.anys, strict=True),
            response.removed,
            content,
        )
        state.system_version = response.system_version
        state.received = True
        if response.removed and not self.view.transparent:
            gone = frozenset(n for n in response.removed if n in state.held)
            if gone:
                state.gone = state.gone | gone
        exchange = state.exchange
        exchange.record_upstream(response.system_version, response.nonce)
        exchange.upstream_resources = len(upstream)
        exchange.upstream_bytes += len(data)
        events = self._relay(state, response, data, content)
        events.append(UpstreamApplied(type_url, upstream.selection(), len(data)))
        return events

    def _relay(
        self, state: _TypeState, response: DeltaResponse, data: bytes, content: object
    ) -> list[Event]:
        """What Envoy gets for the response just stored: the difference it makes to what Envoy
        holds, an ACK here, or nothing yet (held back)."""
        type_url = response.type_url
        if self.view.transparent:
            state.held = shared.updated(
                state.held, response.names, response.anys, response.removed, content
            )
            self._record_push(state, response.system_version, response.nonce, len(data))
            return [SendDownstream(data, type_url, len(response.names), relayed=True)]
        # Dependents first: clusters a new listener needs must reach Envoy before it
        # (docs/protocol.md R4).
        events = self.refresh(self._dependents(type_url))
        events += self._push(
            type_url, state, upstream_nonce=response.nonce, control_plane=response.control_plane
        )
        return events

    # -- originated here -------------------------------------------------------------------

    def _dependents(self, type_url: str) -> frozenset[str]:
        return frozenset(t for t in self._types if type_url in self.view.depends_on(t))

    def _awaiting_inputs(self, type_url: str) -> frozenset[str]:
        """Inputs of the type's selection that Envoy requested here and the upstream has not
        answered: a selection now could drop what they will keep (docs/protocol.md R9, R10).
        A subscription to nothing of a type that is no wildcard is none (R28)."""
        awaiting = []
        for dependency in self.view.depends_on(type_url):
            state = self._types.get(dependency)
            if state is not None and state.started and not state.received:
                subscription = state.exchange.subscription
                if subscription.wildcard or subscription.names:
                    awaiting.append(dependency)
        return frozenset(awaiting)

    def inputs_changed(self, inputs: frozenset[str]) -> list[Event]:
        """Inputs the view reads besides the upstream (a scope, the mesh's route tables)
        changed: recompute only the types that declare them; push what differs
        (docs/protocol.md R27)."""
        return self.refresh(frozenset(t for t in self._types if self.view.depends_on(t) & inputs))

    def refresh(
        self, type_urls: frozenset[str] | None = None, release_before: float | None = None
    ) -> list[Event]:
        """Recompute types (all started ones by default) and push what Envoy lacks; a push
        held back goes out once `xds.holds` says so."""
        events: list[Event] = []
        for type_url in push_order(set(self._types if type_urls is None else type_urls)):
            state = self._types[type_url]
            if not state.started:
                continue
            if state.record.hold is not None:
                events += self._push(type_url, state, "", release_before=release_before)
            elif self._awaiting_inputs(type_url):
                continue  # pushed once they are in, if it changed by then
            elif state.upstream or type_url in self.view.local_types:
                events += self._push(type_url, state, "", skip_empty=True)
        return events

    _refresh = refresh

    def _push(
        self,
        type_url: str,
        state: _TypeState,
        upstream_nonce: str,
        control_plane: bytes = b"",
        skip_empty: bool = False,
        release_before: float | None = None,
    ) -> list[Event]:
        """The difference between the view's selection and what Envoy holds, as `xds.holds`
        decides: pushed (with Istiod's nonce when it carries an Istiod response), ACKed here,
        or held back."""
        record = state.record
        awaiting = self._awaiting_inputs(type_url)
        if awaiting:
            self._decide(record, upstream_nonce, control_plane, awaiting, frozenset(), None)
            return []
        upstream_view = {t: s.upstream_selection() for t, s in self._types.items()}
        names, anys = self.view.select(type_url, upstream_view)
        subscription = state.exchange.subscription
        if not subscription.wildcard and type_url not in self.view.local_types:
            wanted = subscription.names
            pairs = [(n, a) for n, a in zip(names, anys, strict=True) if n in wanted]
        else:
            pairs = list(zip(names, anys, strict=True))
        held = state.held
        if type_url == typeurls.CLUSTER and held:
            # Removals last: a cluster something Envoy holds still names stays for now
            # (docs/protocol.md R12).
            named = self._named_by_envoy(type_url)
            chosen = {n for n, _ in pairs}
            pairs += [
                (n, pair[1])
                for n, pair in state.upstream.items()
                if n in named and n in held and n not in chosen
            ]
        # Additions first: wait until Envoy has warmed the clusters these name
        # (docs/protocol.md R11).
        decision = self._decide(
            record,
            upstream_nonce,
            control_plane,
            frozenset(),
            self._newly_named(type_url, pairs),
            release_before,
        )
        if decision.action is holds.Action.HOLD:
            return []
        upstream_nonce, control_plane = decision.upstream_nonce, decision.control_plane
        skip_empty = skip_empty and not decision.upstream_nonce
        bodies: list[bytes] = []
        sent: list[str] = []
        for name, any_ in pairs:
            if held.get(name, b"") == any_ and name in held:
                continue
            sent.append(name)
            original = state.upstream.get(name)
            if original is not None and original[1] == any_:
                bodies.append(original[0])
            else:
                bodies.append(encode_delta_resource(name, any_))
        kept = {n for n, _ in pairs}
        if type_url in self.view.local_types:
            removed = [name for name in held if name not in kept]
        else:
            # docs/protocol.md R17, R23. Only what the view narrowed away or the upstream
            # removed: a name Envoy held from before a reconnect that the upstream has not
            # mentioned yet is the upstream's to keep or remove (Istiod never removes ECDS,
            # whose removal while a listener still references it causes 5xx,
            # envoyproxy/envoy#32823).
            upstream, gone = state.upstream, state.gone
            removed = [n for n in held if n not in kept and (n in upstream or n in gone)]
            state.gone = EMPTY_SET
        if bodies or removed:
            unmentioned = [(n, a) for n, a in held.items() if n not in kept and n not in removed]
            state.held = FrozenMap(pairs + unmentioned)
            self._note_held(type_url, state)
        if not bodies and not removed:
            if skip_empty:
                return []
            if upstream_nonce and state.exchange.accepted:
                # Nothing Envoy holds changes: ACKed here (docs/protocol.md R2); otherwise the
                # response goes down, empty if need be, so its answer reaches Istiod
                # (docs/protocol.md R5).
                state.exchange.cover()
                ack = DeltaDiscoveryRequest(type_url=type_url, response_nonce=upstream_nonce)
                return [AckedHere(ack.SerializeToString(), type_url)]
        nonce = upstream_nonce or f"{LOCAL_NONCE_PREFIX}{next(self._local_nonces)}"
        version = state.system_version if upstream_nonce else f"{state.system_version}+{nonce}"
        payload = encode_delta_response(version, type_url, nonce, bodies, removed, control_plane)
        state.sent[nonce] = (tuple(sent), tuple(removed))
        self._record_push(state, version, nonce, len(payload))
        return [SendDownstream(payload, type_url, len(bodies), relayed=bool(upstream_nonce))]

    @staticmethod
    def _note_held(type_url: str, state: _TypeState) -> None:
        """What Envoy holds of a type whose resources name clusters, as its record's selection
        (`xds.holds.Record`)."""
        if type_url not in holds.UNNAMING:
            state.record.pushed = _selection_of(state.held)

    @staticmethod
    def _record_push(state: _TypeState, version: str, nonce: str, size: int) -> None:
        exchange = state.exchange
        exchange.record_push(version, nonce)
        exchange.pushed_resources = len(state.held)
        exchange.pushed_bytes += size
