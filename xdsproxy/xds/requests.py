"""Reading a request from Envoy: the checks both protocols make before anything else."""

from typing import TypeVar

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from google.protobuf.message import DecodeError

from xdsproxy.wire import lean
from xdsproxy.wire.codec import span_between
from xdsproxy.xds.events import ProtocolError

Request = TypeVar("Request", DiscoveryRequest, DeltaDiscoveryRequest)


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


def names_span(data: bytes, head: "lean.SotwRequestHead") -> tuple[int, int] | None:
    """Where an ACK's resource names lie: between the node and the type URL (a request with
    `error_detail` is always decoded in full, so it has none)."""
    before = lean.SotwRequestHead(version_info=head.version_info, node=head.node)
    after = lean.SotwRequestHead(type_url=head.type_url, response_nonce=head.response_nonce)
    return span_between(data, before.SerializeToString(), after.SerializeToString())
