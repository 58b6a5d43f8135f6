"""Small builders for the Envoy config xdsproxy writes itself (egress, scoped tables, simulator)."""

from envoy.config.core.v3.config_source_pb2 import ApiVersion, ConfigSource
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"


def pack(message: Message) -> bytes:
    """A serialized `Any` of the message, deterministic so equal config gives equal bytes."""
    return Any(
        type_url=_PREFIX + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    ).SerializeToString()


def typed(message: Message) -> Any:
    """A `typed_config` field value."""
    return Any(type_url=_PREFIX + message.DESCRIPTOR.full_name, value=message.SerializeToString())


def ads() -> ConfigSource:
    """`{ads: {}, resource_api_version: V3}`: fetch over the same aggregated stream."""
    source = ConfigSource(resource_api_version=ApiVersion.V3)
    source.ads.SetInParent()
    return source


def istio_sds() -> ConfigSource:
    """Istio's agent serves the workload certificate (`default`) and root (`ROOTCA`) over SDS
    on the `sds-grpc` cluster of every proxy's bootstrap."""
    source = ConfigSource(resource_api_version=ApiVersion.V3)
    api = source.api_config_source
    api.api_type = api.GRPC
    api.transport_api_version = ApiVersion.V3
    api.set_node_on_first_message_only = True
    api.grpc_services.add().envoy_grpc.cluster_name = "sds-grpc"
    return source
