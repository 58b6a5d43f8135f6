"""gRPC plumbing shared by xdsproxy's servers, its upstream clients and the simulator.

Methods are registered with generic handlers and no (de)serializers, so messages stay bytes end
to end: a response relayed to many sidecars is never re-serialized per stream.
"""

from collections.abc import Awaitable, Callable

import grpc

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW_METHOD = "StreamAggregatedResources"
DELTA_METHOD = "DeltaAggregatedResources"

StreamHandler = Callable[[object, grpc.aio.ServicerContext], Awaitable[None]]

UNLIMITED = -1


def message_options(max_message_bytes: int = UNLIMITED) -> list[tuple[str, int]]:
    """No 4 MB default cap: Istiod sends responses of tens of MB for large meshes."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_keepalive() -> list[tuple[str, int]]:
    """Keepalive as Istiod configures it, so dead sidecars are noticed within a minute."""
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def client_keepalive() -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def ads_handler(sotw: StreamHandler, delta: StreamHandler) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        ADS_SERVICE,
        {
            SOTW_METHOD: grpc.stream_stream_rpc_method_handler(sotw),
            DELTA_METHOD: grpc.stream_stream_rpc_method_handler(delta),
        },
    )


def method_path(method: str) -> str:
    return f"/{ADS_SERVICE}/{method}"


def status_code(name: str) -> grpc.StatusCode:
    return grpc.StatusCode[name]
