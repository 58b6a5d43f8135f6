"""Make before break, decided once for SotW and Delta (docs/protocol.md, "Make before break").
Pure: no clock of its own, no I/O.

Each type of a scoped stream has one `Record` of what Envoy holds and has accepted of it (the
newest pushed, the newest ACKed, what a NACKed response may have left applied) and of the push
held back, if any (`Hold`: why, since when, whose response). Warm clusters are one `Warmth`
per stream. Given those and a candidate push, `decide` says what the stream does:

| the candidate                                          | `Decision`                        |
|--------------------------------------------------------|-----------------------------------|
| reads an input Envoy requested and Istiod has not sent | hold, until those types (R9, R10) |
| names a cluster Envoy has not warmed                   | hold, until those clusters (R11)  |
| the same, Istiod's, held since before `release_before` | send cold (R13)                   |
| anything else                                          | send                              |

A held push goes out with Istiod's nonce when it carries an Istiod response (its ACK is
Istiod's to hear), with xdsproxy's own otherwise (R3), whatever made it go out. Only a hold
of Istiod's config is ever sent cold: a push of xdsproxy's own (a learn) waits for its cluster
however long it takes, while the route Envoy holds (the catch-all to the egress) still serves.
Tests: `tests/unit/test_xds_holds.py`, row by row.
"""

import enum
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xdsproxy.wire import typeurls
from xdsproxy.xds import ordering
from xdsproxy.xds.view import NOTHING, Selection

# Types whose resources name no cluster: nothing they hold can wait for, or keep, a cluster.
UNNAMING = frozenset({typeurls.CLUSTER, typeurls.ENDPOINT})


class Why(enum.Enum):
    INPUTS = "inputs"  # an input of the selection was requested and not answered yet
    COLD = "cold"  # the selection names clusters Envoy has not warmed


@dataclass(frozen=True, slots=True)
class Hold:
    """A push held back."""

    why: Why
    since: float  # when this type started to wait (the stream's clock)
    # The Istiod response the push carries, relayed under its nonce; "" for xdsproxy's own
    upstream_nonce: str = ""
    control_plane: bytes = b""  # of that response (Delta relays it)
    until: frozenset[str] = frozenset()  # the types (INPUTS) or clusters (COLD) it waits for

    @property
    def releasable(self) -> bool:
        """Sent cold once the bound has passed (R13): only Istiod's config."""
        return self.why is Why.COLD and bool(self.upstream_nonce)


@dataclass(slots=True)
class Record:
    """What Envoy holds and has accepted of one type, as make-before-break needs it."""

    pushed: Selection | None = None  # the newest push (Delta: everything Envoy holds)
    acked: Selection | None = None  # what Envoy held at its newest ACK
    # After a NACK, until the next ACK: what the rejected response carried. Envoy applies the
    # valid resources of a NACKed CDS or LDS response (DESIGN.md), so they may be in use.
    maybe: Selection = NOTHING
    hold: Hold | None = None

    def named(self, references: ordering.References, type_url: str) -> frozenset[str]:
        """Clusters that what Envoy may hold of this type names."""
        named: frozenset[str] = frozenset()
        for selection in (self.pushed, self.acked, self.maybe):
            if selection:
                named |= ordering.names_in(references, type_url, selection)
        return named

    def newly_named(
        self, references: ordering.References, type_url: str, names: frozenset[str]
    ) -> frozenset[str]:
        """Of the clusters a candidate push names, those what Envoy ACKed of the type did not."""
        if names and self.acked is not None:
            names -= ordering.names_in(references, type_url, self.acked)
        return names

    def note_ack(self) -> None:
        self.acked, self.maybe = self.pushed, NOTHING

    def note_nack(self, rejected: Selection) -> None:
        """Each (name, body) once: NACKs in a row of a config Envoy keeps rejecting do not pile
        up. Every body stays, since Envoy may hold any of them until it ACKs."""
        if rejected:
            pairs = dict.fromkeys((*zip(*self.maybe, strict=True), *zip(*rejected, strict=True)))
            self.maybe = Selection(tuple(n for n, _ in pairs), tuple(b for _, b in pairs))


@dataclass(frozen=True, slots=True)
class Warmth:
    """Which clusters Envoy can route to now. `started` is False until Envoy runs a CDS it
    ACKed on this stream: a fresh or reconnecting Envoy takes Istiod's own order (R13)."""

    started: bool
    # Clusters of the newest CDS Envoy ACKed; none while a CDS push is unanswered (it may be
    # removing them).
    clusters: Collection[str] = frozenset()
    endpoints: Collection[str] = frozenset()  # clusters whose endpoints Envoy accepted and holds
    upstream: Mapping[str, bytes] = field(default_factory=dict)  # Istiod's clusters, by name
    # What Envoy was pushed of CDS, by name (None where only the name is known)
    pushed: Mapping[str, bytes | None] = field(default_factory=dict)

    def cold(self, names: Iterable[str]) -> frozenset[str]:
        """Of `names`, the clusters Envoy was pushed or Istiod sends that Envoy has not warmed."""
        return ordering.cold(
            frozenset(names), self.upstream, self.pushed, self.clusters, self.endpoints
        )


NOT_STARTED = Warmth(False)


class Action(enum.Enum):
    SEND = "send"
    HOLD = "hold"
    SEND_COLD = "send cold"  # a hold past its bound (R13)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    hold: Hold | None = None  # the hold kept (HOLD)
    upstream_nonce: str = ""  # the Istiod response a push relays; "" for xdsproxy's own
    control_plane: bytes = b""


def decide(
    current: Hold | None,
    *,
    upstream_nonce: str,
    control_plane: bytes,
    awaiting: frozenset[str],
    newly_named: frozenset[str],
    warmth: Warmth,
    now: float,
    release_before: float | None = None,
) -> Decision:
    """What to do with a candidate push of a type (the module's table).

    `current` is the type's hold, if any; `upstream_nonce` the Istiod response the candidate
    relays ("" when xdsproxy computed it: a learn, or a cluster warming); `awaiting` the inputs
    Envoy requested and Istiod has not answered; `newly_named` the clusters the candidate names
    that what Envoy ACKed of the type did not; `release_before`, when the caller's bound has
    passed for holds that started before it.
    """
    if not upstream_nonce and current is not None:
        upstream_nonce, control_plane = current.upstream_nonce, current.control_plane
    if awaiting:
        why, until = Why.INPUTS, awaiting
    else:
        until = warmth.cold(newly_named) if warmth.started else frozenset()
        if not until:
            return Decision(Action.SEND, None, upstream_nonce, control_plane)
        why = Why.COLD
    # A hold keeps its start, unless Istiod's config now waits where only ours did.
    fresh = current is None or (bool(upstream_nonce) and not current.upstream_nonce)
    since = now if fresh else current.since
    hold = Hold(why, since, upstream_nonce, control_plane, until)
    if release_before is not None and hold.releasable and since <= release_before:
        return Decision(Action.SEND_COLD, None, upstream_nonce, control_plane)
    return Decision(Action.HOLD, hold, upstream_nonce, control_plane)


class Holding:
    """What SotW and Delta streams share of holds: a stream keeps each type's state with its
    `record` (`_types`), recomputes types (`_refresh`) and reads its clock (`_clock`)."""

    _clock: Callable[[], float]
    _types: Mapping[str, Any]  # type URL -> the stream's state of it, with its `record`

    def _refresh(self, type_urls: frozenset[str], release_before: float | None = None) -> list:
        raise NotImplementedError

    def _warmth(self) -> Warmth:
        raise NotImplementedError

    def _decide(
        self,
        record: Record,
        upstream_nonce: str,
        control_plane: bytes,
        awaiting: frozenset[str],
        newly_named: frozenset[str],
        release_before: float | None,
    ) -> Decision:
        """`decide` for a type's candidate push, on this stream's clock; the record keeps the
        hold it returns."""
        decision = decide(
            record.hold,
            upstream_nonce=upstream_nonce,
            control_plane=control_plane,
            awaiting=awaiting,
            newly_named=newly_named,
            warmth=self._warmth() if newly_named else NOT_STARTED,
            now=self._clock(),
            release_before=release_before,
        )
        record.hold = decision.hold
        return decision

    def holds(self) -> dict[str, Hold]:
        """The pushes held back, by type (for the debug endpoint)."""
        return {t: s.record.hold for t, s in self._types.items() if s.record.hold is not None}

    def _held_types(self) -> frozenset[str]:
        return frozenset(self.holds())

    def held_back(self) -> bool:
        """A push waits for its inputs or for clusters to warm."""
        return any(s.record.hold is not None for s in self._types.values())

    def oldest_hold(self) -> float | None:
        """When the oldest hold that the warm-wait bound applies to started (the stream's
        clock); None if there is none (docs/protocol.md R13). Asked after every message."""
        starts = [
            s.record.hold.since
            for s in self._types.values()
            if s.record.hold is not None and s.record.hold.releasable
        ]
        return min(starts) if starts else None

    def release(self, started_before: float | None = None) -> list:
        """Send cold what waits for clusters to warm, of the holds of Istiod's config that
        started before `started_before` (all of them by default): an EDS answer that never comes
        must not hold Istiod's routes back for ever (docs/protocol.md R13)."""
        before = self._clock() if started_before is None else started_before
        return self._refresh(self._held_types(), release_before=before)
