"""What a protocol state machine asks its transport to do, or reports to it."""

from dataclasses import dataclass

from xdsproxy.xds.view import Selection


class ProtocolError(ValueError):
    """The downstream peer broke the xDS protocol; the stream ends with INVALID_ARGUMENT."""


class UpstreamProtocolError(ValueError):
    """The upstream sent something that is not xDS; the stream ends with UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class SendUpstream:
    payload: bytes


@dataclass(frozen=True, slots=True)
class AckedHere:
    """An upstream response left what Envoy holds, and has accepted, unchanged: `payload` ACKs
    it to the upstream and Envoy is sent nothing."""

    payload: bytes
    type_url: str


@dataclass(frozen=True, slots=True)
class SendDownstream:
    payload: bytes
    type_url: str
    resource_count: int
    relayed: bool


@dataclass(frozen=True, slots=True)
class Nacked:
    """Envoy rejected a response. `relayed` tells whether the NACK was forwarded to Istiod."""

    type_url: str
    nonce: str
    message: str
    relayed: bool


@dataclass(frozen=True, slots=True)
class UpstreamApplied:
    """An upstream response is now the stream's current content of its type (whatever went to
    Envoy for it, if anything): what a runtime learns from Istiod's config (the services it
    knows, a namespace's route tables) it learns from here, not by reading the stream back."""

    type_url: str
    upstream: Selection
    size: int  # bytes of the upstream response


Event = SendUpstream | AckedHere | SendDownstream | Nacked | UpstreamApplied
