"""Reading a request from Envoy: the checks both protocols make before anything else."""

from typing import TypeVar

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from google.protobuf.message import DecodeError

from xdsproxy.wire import lean
from xdsproxy.wire.codec import span_between
from xdsproxy.xds.events import Nacked, ProtocolError
from xdsproxy.xds.status import TypeStatus

Request = TypeVar("Request", DiscoveryRequest, DeltaDiscoveryRequest)

#: Marks responses xdsproxy originated; Envoy's answers to them never go upstream.
LOCAL_NONCE_PREFIX = "xdsproxy-"


def answered_here(nonce: str, covering_nonce: str) -> bool:
    """Whether Envoy's answer to `nonce` stays with xdsproxy: the response was xdsproxy's own,
    or it stands for newer upstream responses xdsproxy already ACKed (`covering_nonce`)."""
    return nonce.startswith(LOCAL_NONCE_PREFIX) or nonce == covering_nonce


def read_request(kind: type[Request], data: bytes, node: Node | None) -> tuple[Request, Node]:
    """Parse and check a request; the node comes from the first request of a stream only
    (docs/protocol.md R21)."""
    name = kind.DESCRIPTOR.name
    try:
        request = kind.FromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"malformed {name}: {exc}") from None
    if node is None:
        if not request.HasField("node"):
            raise ProtocolError(f"the first {name} on a stream must carry a node")
        node = request.node
    if not request.type_url:
        raise ProtocolError(f"{name} without type_url on an aggregated stream")
    return request, node


def record_answer(
    request: DiscoveryRequest | DeltaDiscoveryRequest, status: TypeStatus, acked_version: str
) -> Nacked | None:
    """Note Envoy's ACK or NACK of the response with `request.response_nonce`."""
    nonce = request.response_nonce
    if request.HasField("error_detail"):
        status.last_nack = request.error_detail.message
        status.nack_count += 1
        relayed = not nonce.startswith(LOCAL_NONCE_PREFIX)
        return Nacked(request.type_url, nonce, request.error_detail.message, relayed)
    status.acked_version = acked_version
    status.acked_nonce = nonce
    status.last_nack = ""
    return None


def names_span(data: bytes, head: "lean.SotwRequestHead") -> tuple[int, int] | None:
    """Where an ACK's resource names lie: between the node and the type URL (a request with
    `error_detail` is always decoded in full, so it has none)."""
    before = lean.SotwRequestHead(version_info=head.version_info, node=head.node)
    after = lean.SotwRequestHead(type_url=head.type_url, response_nonce=head.response_nonce)
    return span_between(data, before.SerializeToString(), after.SerializeToString())
