"""Istio's own types pass untouched, gateways are not scoped, and no removal Istiod would not
send: pure state machines and the lazy runtime's view choice, fed bytes."""

import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from google.protobuf.any_pb2 import Any

from tests.xds_messages import node, receive_upstream
from xdsproxy.istio.names import ServicePort
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.egress import EgressSettings
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.server.lazy import LazyRuntime
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import (
    decode_delta_response,
    decode_sotw_response,
    encode_delta_resource,
    encode_delta_response,
    encode_sotw_response,
)
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import SendDownstream, SendUpstream
from xdsproxy.xds.sotw import SotwStream
from xdsproxy.xds.view import UNSCOPED

EGRESS = "outbound|80||lazy-egress.istio-system.svc.cluster.local"
PCDS = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"
UNKNOWN = "type.googleapis.com/example.v1.SomethingNew"
ECDS = typeurls.EXTENSION_CONFIG


def _views():
    return {
        "passthrough": UNSCOPED,
        "lazy": SidecarView(Scope(WorkloadKey("ns-0", "app")), EGRESS),
    }


def _unnamed(type_url: str) -> bytes:
    return Any(type_url=type_url, value=b"\x0a\x03abc").SerializeToString()


@pytest.mark.parametrize("mode", ["passthrough", "lazy"])
@pytest.mark.parametrize("type_url", [typeurls.NAME_TABLE, PCDS, UNKNOWN])
def test_delta_agent_types_with_empty_requests_reach_envoy(mode: str, type_url: str) -> None:
    """The agent asks NDS and PCDS with empty requests; Istiod answers with an unnamed
    resource (its wildcard rule). Envoy's side must get it, in both modes."""
    stream = DeltaStream(_views()[mode])
    request = DeltaDiscoveryRequest(type_url=type_url)
    request.node.CopyFrom(node())
    first = request.SerializeToString()
    assert stream.receive_downstream(first) == [SendUpstream(first)]
    body = _unnamed(type_url)
    response = encode_delta_response("v1", type_url, "up-1", [encode_delta_resource("", body)])
    [down] = receive_upstream(stream, response)
    assert isinstance(down, SendDownstream) and down.relayed
    assert decode_delta_response(down.payload).anys == (body,)


@pytest.mark.parametrize("mode", ["passthrough", "lazy"])
@pytest.mark.parametrize("type_url", [typeurls.NAME_TABLE, PCDS, UNKNOWN])
def test_sotw_agent_types_pass_byte_for_byte(mode: str, type_url: str) -> None:
    stream = SotwStream(_views()[mode])
    request = DiscoveryRequest(type_url=type_url)
    request.node.CopyFrom(node())
    stream.receive_downstream(request.SerializeToString())
    response = encode_sotw_response("v1", type_url, "up-1", [_unnamed(type_url)])
    [down] = receive_upstream(stream, response)
    assert isinstance(down, SendDownstream) and down.payload == response
    assert decode_sotw_response(down.payload).bodies == (_unnamed(type_url),)


@pytest.mark.parametrize("mode", ["passthrough", "lazy"])
def test_delta_reconnect_never_removes_ecds_istiod_did_not_remove(mode: str) -> None:
    """Envoy held two filter configs; Istiod's first answer on the new stream names one.
    Istiod never removes ECDS (a listener may still reference it: envoyproxy/envoy#32823)."""
    stream = DeltaStream(_views()[mode])
    request = DeltaDiscoveryRequest(
        type_url=ECDS,
        resource_names_subscribe=["wasm-a", "wasm-b"],
        initial_resource_versions={"wasm-a": "1", "wasm-b": "1"},
    )
    request.node.CopyFrom(node())
    stream.receive_downstream(request.SerializeToString())
    body = _unnamed(ECDS)
    response = encode_delta_response("v2", ECDS, "up-1", [encode_delta_resource("wasm-a", body)])
    [down] = receive_upstream(stream, response)
    assert not decode_delta_response(down.payload).removed
    # An explicit removal by the upstream is passed on.
    removal = encode_delta_response("v3", ECDS, "up-2", [], removed=["wasm-b"])
    [down] = receive_upstream(stream, removal)
    assert list(decode_delta_response(down.payload).removed) == ["wasm-b"]


def test_gateways_get_passthrough_in_lazy_mode() -> None:
    runtime = LazyRuntime(ServicePort("e.istio-system.svc.cluster.local", 80), EgressSettings())
    gateway = Node(
        id="router~10.0.0.5~istio-ingressgateway-7d9f5c-abcde.istio-system~istio-system.svc.cluster.local"
    )
    gateway.metadata.update({"NAMESPACE": "istio-system", "WORKLOAD_NAME": "istio-ingressgateway"})
    assert runtime.view_for(gateway) is UNSCOPED
    sidecar = Node(id="sidecar~10.0.0.6~app-0.ns-0~ns-0.svc.cluster.local")
    sidecar.metadata.update({"NAMESPACE": "ns-0", "WORKLOAD_NAME": "app"})
    assert isinstance(runtime.view_for(sidecar), SidecarView)


def test_proxyless_grpc_clients_get_passthrough_in_lazy_mode() -> None:
    """N6. gRPC's own xDS client (`GENERATOR: grpc`) cannot follow the catch-all to the egress
    (it ignores `request_headers_to_add`): relayed as Istiod sent it (docs/protocol.md R29)."""
    runtime = LazyRuntime(ServicePort("e.istio-system.svc.cluster.local", 80), EgressSettings())
    client = Node(id="sidecar~10.0.0.5~client-0.ns-0~ns-0.svc.cluster.local")
    client.metadata.update(
        {
            "GENERATOR": "grpc",
            "NAMESPACE": "ns-0",
            "WORKLOAD_NAME": "client",
            "ISTIO_VERSION": "1.24.0",
        }
    )
    assert runtime.view_for(client) is UNSCOPED
