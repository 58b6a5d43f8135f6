"""State of one Delta (incremental) ADS stream between Envoy and Istiod.

Nonces follow the same rule as SotW (see `sotw`): relayed responses keep Istiod's nonce. The
stream also tracks what Envoy holds per type (from `initial_resource_versions` on reconnect and
from every response since), so that a policy that narrows the view can send the removals Envoy
needs, and never a removal for something Envoy does not hold.
"""

from dataclasses import dataclass, field

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest
from google.protobuf.message import DecodeError

from xdsproxy.wire.codec import WireError, decode_delta_response, encode_delta_response
from xdsproxy.wire.typeurls import WILDCARD_TYPES
from xdsproxy.xds.events import (
    Event,
    Nacked,
    ProtocolError,
    SendDownstream,
    SendUpstream,
    UpstreamProtocolError,
)
from xdsproxy.xds.sotw import LOCAL_NONCE_PREFIX
from xdsproxy.xds.status import TypeStatus
from xdsproxy.xds.view import PASS_THROUGH, ResourceView

WILDCARD = "*"


@dataclass(slots=True)
class _TypeState:
    started: bool = False
    wildcard: bool = False
    subscribed: set[str] = field(default_factory=set)
    upstream: dict[str, bytes] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)
    status: TypeStatus = field(default_factory=TypeStatus)


class DeltaStream:
    def __init__(self, view: ResourceView = PASS_THROUGH) -> None:
        self.view = view
        self.node: Node | None = None
        self._types: dict[str, _TypeState] = {}

    def status(self) -> dict[str, TypeStatus]:
        return {type_url: state.status for type_url, state in self._types.items()}

    def held(self, type_url: str) -> dict[str, str]:
        """Names Envoy holds for the type, with the version it was sent (may be empty)."""
        state = self._types.get(type_url)
        return dict(state.held) if state else {}

    def subscription(self, type_url: str) -> tuple[bool, frozenset[str]]:
        state = self._types.get(type_url)
        return (state.wildcard, frozenset(state.subscribed)) if state else (False, frozenset())

    def receive_downstream(self, data: bytes) -> list[Event]:
        try:
            request = DeltaDiscoveryRequest.FromString(data)
        except DecodeError as exc:
            raise ProtocolError(f"malformed DeltaDiscoveryRequest: {exc}") from None
        if self.node is None:
            if not request.HasField("node"):
                raise ProtocolError("the first DeltaDiscoveryRequest on a stream must carry a node")
            self.node = request.node
        if not request.type_url:
            raise ProtocolError("DeltaDiscoveryRequest without type_url on an aggregated stream")
        state = self._types.setdefault(request.type_url, _TypeState())
        self._update_subscription(state, request)
        nonce = request.response_nonce
        if not nonce:
            return [SendUpstream(data)]
        status = state.status
        nacked = request.HasField("error_detail")
        if nacked:
            status.last_nack = request.error_detail.message
            status.nack_count += 1
        else:
            status.acked_nonce = nonce
            status.acked_version = status.pushed_version
            status.last_nack = ""
        relayed = not nonce.startswith(LOCAL_NONCE_PREFIX)
        events: list[Event] = []
        if nacked:
            events.append(Nacked(request.type_url, nonce, request.error_detail.message, relayed))
        if relayed:
            events.append(SendUpstream(data))
        elif request.resource_names_subscribe or request.resource_names_unsubscribe:
            # The answer to a local response stays here, but a subscription change riding on
            # it is Istiod's business: forward it as a plain subscription request.
            request.response_nonce = ""
            request.ClearField("error_detail")
            request.ClearField("node")
            events.append(SendUpstream(request.SerializeToString()))
        return events

    @staticmethod
    def _update_subscription(state: _TypeState, request: DeltaDiscoveryRequest) -> None:
        subscribe = request.resource_names_subscribe
        if not state.started:
            state.started = True
            # An empty first request subscribes to everything for wildcard-capable types.
            state.wildcard = not subscribe and request.type_url in WILDCARD_TYPES
            state.held.update(request.initial_resource_versions)
        for name in subscribe:
            if name == WILDCARD:
                state.wildcard = True
            else:
                state.subscribed.add(name)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
            else:
                state.subscribed.discard(name)

    def receive_upstream(self, data: bytes) -> list[Event]:
        try:
            response = decode_delta_response(data)
        except WireError as exc:
            raise UpstreamProtocolError(str(exc)) from None
        state = self._types.setdefault(response.type_url, _TypeState())
        upstream = state.upstream
        upstream.update(zip(response.names, response.bodies, strict=True))
        for name in response.removed:
            upstream.pop(name, None)
        status = state.status
        status.upstream_version, status.upstream_nonce = response.system_version, response.nonce
        status.upstream_resources = len(upstream)
        status.upstream_bytes += len(data)

        names, bodies = self.view.select(response.type_url, response.names, response.bodies)
        held = state.held
        if bodies is response.bodies:
            payload = data
            removed = response.removed
        else:
            kept = set(names)
            removed = tuple(
                [name for name in response.removed if name in held]
                + [name for name in response.names if name not in kept and name in held]
            )
            payload = encode_delta_response(
                response.system_version,
                response.type_url,
                response.nonce,
                bodies,
                removed,
                response.control_plane,
                response.removed_resource_names,
            )
        versions = dict(zip(response.names, response.versions, strict=True))
        for name in names:
            held[name] = versions.get(name, "")
        for name in removed:
            held.pop(name, None)
        status.pushed_version, status.pushed_nonce = response.system_version, response.nonce
        status.pushed_resources = len(held)
        status.pushed_bytes += len(payload)
        return [SendDownstream(payload, response.type_url, len(bodies), relayed=True)]
