"""State of one State-of-the-World ADS stream between Envoy and Istiod.

Nonces: a response that relays an upstream response keeps the upstream nonce, so Envoy's ACK or
NACK of it maps to Istiod one to one. A response xdsproxy originates itself carries a nonce with
`LOCAL_NONCE_PREFIX`, and Envoy's answer to it stays local. Only an answer to the newest response
of its type is acted on: Istiod ignores stale nonces anyway, and Envoy answers the newest one too.
"""

from dataclasses import dataclass, field

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf.message import DecodeError

from xdsproxy.wire.codec import WireError, decode_sotw_response, encode_sotw_response
from xdsproxy.xds.events import (
    Event,
    Nacked,
    ProtocolError,
    SendDownstream,
    SendUpstream,
    UpstreamProtocolError,
)
from xdsproxy.xds.status import TypeStatus
from xdsproxy.xds.view import PASS_THROUGH, ResourceView

LOCAL_NONCE_PREFIX = "xdsproxy-"


@dataclass(slots=True)
class _TypeState:
    subscribed: tuple[str, ...] = ()
    upstream_names: tuple[str, ...] = ()
    upstream_bodies: tuple[bytes, ...] = ()
    pushed_names: tuple[str, ...] = ()
    status: TypeStatus = field(default_factory=TypeStatus)


class SotwStream:
    def __init__(self, view: ResourceView = PASS_THROUGH) -> None:
        self.view = view
        self.node: Node | None = None
        self._types: dict[str, _TypeState] = {}

    def status(self) -> dict[str, TypeStatus]:
        return {type_url: state.status for type_url, state in self._types.items()}

    def pushed_names(self, type_url: str) -> tuple[str, ...]:
        state = self._types.get(type_url)
        return state.pushed_names if state else ()

    def receive_downstream(self, data: bytes) -> list[Event]:
        try:
            request = DiscoveryRequest.FromString(data)
        except DecodeError as exc:
            raise ProtocolError(f"malformed DiscoveryRequest: {exc}") from None
        if self.node is None:
            if not request.HasField("node"):
                raise ProtocolError("the first DiscoveryRequest on a stream must carry a node")
            self.node = request.node
        if not request.type_url:
            raise ProtocolError("DiscoveryRequest without type_url on an aggregated stream")
        state = self._types.setdefault(request.type_url, _TypeState())
        state.subscribed = tuple(request.resource_names)
        nonce = request.response_nonce
        if not nonce:
            # A first request for the type, or Envoy's re-request after reconnecting.
            return [SendUpstream(data)]
        status = state.status
        if nonce != status.pushed_nonce:
            return []
        if request.HasField("error_detail"):
            status.last_nack = request.error_detail.message
            status.nack_count += 1
        else:
            status.acked_version = request.version_info
            status.acked_nonce = nonce
            status.last_nack = ""
        relayed = not nonce.startswith(LOCAL_NONCE_PREFIX)
        events: list[Event] = []
        if request.HasField("error_detail"):
            events.append(Nacked(request.type_url, nonce, request.error_detail.message, relayed))
        if relayed:
            events.append(SendUpstream(data))
        return events

    def receive_upstream(self, data: bytes) -> list[Event]:
        try:
            response = decode_sotw_response(data)
        except WireError as exc:
            raise UpstreamProtocolError(str(exc)) from None
        state = self._types.setdefault(response.type_url, _TypeState())
        state.upstream_names, state.upstream_bodies = response.names, response.bodies
        status = state.status
        status.upstream_version, status.upstream_nonce = response.version, response.nonce
        status.upstream_resources, status.upstream_bytes = len(response.bodies), len(data)
        names, bodies = self.view.select(response.type_url, response.names, response.bodies)
        if bodies is response.bodies:
            payload = data
        else:
            payload = encode_sotw_response(
                response.version,
                response.type_url,
                response.nonce,
                bodies,
                response.control_plane,
                response.canary,
            )
        state.pushed_names = names
        status.pushed_version, status.pushed_nonce = response.version, response.nonce
        status.pushed_resources, status.pushed_bytes = len(bodies), len(payload)
        return [SendDownstream(payload, response.type_url, len(bodies), relayed=True)]
