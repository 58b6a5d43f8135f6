"""One xDS type's exchange on one stream, shared by SotW and Delta: what Envoy subscribed to,
what Istiod sent last, what Envoy was pushed last, what Envoy answered, and what Envoy's next
answer means.

Two sources push on one stream. A push that relays an Istiod response keeps Istiod's nonce; a
push xdsproxy originates carries a nonce with `LOCAL_NONCE_PREFIX`. When xdsproxy ACKs an
Istiod response itself (nothing Envoy holds changes, docs/protocol.md R2), the push Envoy last
got stands for it: it becomes the covering push. Envoy answers each push with its nonce, and
`classify` says which push an answer is for:

| the answer's nonce is                          | `Answer`      | SotW      | Delta     |
|------------------------------------------------|---------------|-----------|-----------|
| the newest push, relayed from Istiod           | `RELAYED`     | up (R1)   | up        |
| the newest push, xdsproxy's own or covering    | `LOCAL`       | kept (R3) | kept (R6) |
| Istiod's newest, superseded by a local push    | `SUPERSEDED`  | up (R15)  | up        |
| an older push relayed from Istiod              | `STALE`       | dropped   | up (R8)   |
| an older push of xdsproxy's own                | `STALE_LOCAL` | dropped   | kept      |

(Rule numbers: docs/protocol.md.) Istiod ignores stale nonces itself, and in SotW Envoy
answers the newest response too, so a SotW stream drops a stale answer (R7); in Delta
every answer to a relayed response goes up and Istiod judges it.
"""

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from xdsproxy.xds.events import Nacked

#: Marks responses xdsproxy originated; Envoy's answers to them never go upstream.
LOCAL_NONCE_PREFIX = "xdsproxy-"


class Subscription(NamedTuple):
    """What Envoy asked for of one type: everything the upstream has (`wildcard`), and these
    names. A value, replaced on every change: SotW keeps the names as Envoy listed them (a tuple
    shared by every stream that asked the same), Delta as a set (shared likewise, see
    `shared`)."""

    wildcard: bool
    names: Collection[str]


NOTHING_SUBSCRIBED = Subscription(False, ())


class Answer(enum.Enum):
    RELAYED = "relayed"
    LOCAL = "local"
    SUPERSEDED = "superseded"
    STALE = "stale"
    STALE_LOCAL = "stale local"

    @property
    def ours(self) -> bool:
        """An answer to a push xdsproxy made itself (or one covering its own ACK): never
        Istiod's to hear."""
        return self in (Answer.LOCAL, Answer.STALE_LOCAL)


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """A read-only view of one exchange, for the debug endpoint, metrics and `status`."""

    wildcard: bool
    subscribed: int  # names subscribed (besides the wildcard)
    upstream_version: str
    upstream_nonce: str
    upstream_resources: int
    upstream_bytes: int
    pushed_version: str
    pushed_nonce: str
    pushed_resources: int
    pushed_bytes: int
    acked_version: str
    acked_nonce: str
    last_nack: str
    nack_count: int
    accepted: bool
    #: SYNCED, STALE, NACK or NOT SENT, in the sense of `istioctl proxy-status`.
    state: str


@dataclass(slots=True)
class Exchange:
    subscription: Subscription = NOTHING_SUBSCRIBED
    upstream_version: str = ""
    upstream_nonce: str = ""
    upstream_resources: int = 0
    upstream_bytes: int = 0
    pushed_version: str = ""
    pushed_nonce: str = ""
    pushed_resources: int = 0
    pushed_bytes: int = 0
    acked_version: str = ""
    acked_nonce: str = ""
    last_nack: str = ""
    nack_count: int = 0
    # The push that stands for newer Istiod responses xdsproxy ACKed itself
    covering_nonce: str = ""

    def subscribe(self, wildcard: bool, names: Collection[str]) -> bool:
        """Envoy's subscription now; True when it changed."""
        current = self.subscription
        if current.wildcard == wildcard and (current.names is names or current.names == names):
            return False
        self.subscription = Subscription(wildcard, names)
        return True

    def record_upstream(self, version: str, nonce: str) -> None:
        """Istiod sent a response of the type."""
        self.upstream_version, self.upstream_nonce = version, nonce

    def record_push(self, version: str, nonce: str) -> None:
        """Envoy was sent a response of the type."""
        self.pushed_version, self.pushed_nonce = version, nonce

    def cover(self) -> None:
        """The newest Istiod response is ACKed here: the newest push now stands for it."""
        self.covering_nonce = self.pushed_nonce

    @property
    def accepted(self) -> bool:
        """Envoy ACKed the newest response it was sent."""
        return bool(self.pushed_nonce) and self.acked_nonce == self.pushed_nonce

    def is_newest(self, nonce: str) -> bool:
        return nonce == self.pushed_nonce

    def classify(self, nonce: str) -> Answer:
        """Which push an answer carrying `nonce` is for (the module's table)."""
        here = nonce.startswith(LOCAL_NONCE_PREFIX) or nonce == self.covering_nonce
        if nonce == self.pushed_nonce:
            return Answer.LOCAL if here else Answer.RELAYED
        if here:
            return Answer.STALE_LOCAL
        return Answer.SUPERSEDED if nonce == self.upstream_nonce else Answer.STALE

    def answered(
        self, request: DiscoveryRequest | DeltaDiscoveryRequest, acked_version: str
    ) -> Nacked | None:
        """Note Envoy's ACK or NACK of the push with `request.response_nonce`."""
        nonce = request.response_nonce
        if request.HasField("error_detail"):
            self.last_nack = request.error_detail.message
            self.nack_count += 1
            relayed = not nonce.startswith(LOCAL_NONCE_PREFIX)
            return Nacked(request.type_url, nonce, request.error_detail.message, relayed)
        self.acked_version = acked_version
        self.acked_nonce = nonce
        self.last_nack = ""
        return None

    def status(self) -> TypeStatus:
        if not self.pushed_nonce:
            state = "NOT SENT"
        elif self.accepted:
            state = "SYNCED"
        else:
            state = "NACK" if self.last_nack else "STALE"
        return TypeStatus(
            self.subscription.wildcard,
            len(self.subscription.names),
            self.upstream_version,
            self.upstream_nonce,
            self.upstream_resources,
            self.upstream_bytes,
            self.pushed_version,
            self.pushed_nonce,
            self.pushed_resources,
            self.pushed_bytes,
            self.acked_version,
            self.acked_nonce,
            self.last_nack,
            self.nack_count,
            self.accepted,
            state,
        )
