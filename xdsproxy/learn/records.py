"""Reading `AccessRecord`s out of ALS messages (xds-protos types, decoded once per message)."""

from envoy.config.core.v3.address_pb2 import Address
from envoy.data.accesslog.v3.accesslog_pb2 import AccessLogCommon
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from google.protobuf.json_format import MessageToDict

from xdsproxy.learn.attribution import AccessRecord
from xdsproxy.scope.contract import (
    METADATA_NAMESPACE,
    ORIGINAL_PORT,
    SOURCE_NAMESPACE,
    SOURCE_WORKLOAD,
)


def _ip(address: Address) -> str:
    return address.socket_address.address


def _spiffe(common: AccessLogCommon) -> tuple[str, str]:
    """(namespace, service account) from `spiffe://TRUST/ns/NS/sa/SA`, if the peer had one."""
    for san in common.tls_properties.peer_certificate_properties.subject_alt_name:
        parts = san.uri.split("/")
        if (
            san.uri.startswith("spiffe://")
            and len(parts) >= 7
            and parts[3] == "ns"
            and parts[5] == "sa"
        ):
            return parts[4], parts[6]
    return "", ""


def _record(common: AccessLogCommon, authority: str) -> AccessRecord:
    fields = {}
    if METADATA_NAMESPACE in common.metadata.filter_metadata:
        fields = MessageToDict(common.metadata.filter_metadata[METADATA_NAMESPACE])
    peer_namespace, peer_account = _spiffe(common)
    return AccessRecord(
        remote_ip=_ip(common.downstream_direct_remote_address),
        claimed_namespace=str(fields.get(SOURCE_NAMESPACE, "")),
        claimed_workload=str(fields.get(SOURCE_WORKLOAD, "")),
        peer_namespace=peer_namespace,
        peer_service_account=peer_account,
        upstream_cluster=common.upstream_cluster,
        authority=authority,
        original_port=str(fields.get(ORIGINAL_PORT, "")),
    )


def records(message: StreamAccessLogsMessage) -> list[tuple[AccessRecord, float]]:
    """Each entry's record with its start time (seconds since the epoch, 0 when absent)."""
    out = []
    for entry in message.http_logs.log_entry:
        common = entry.common_properties
        out.append(
            (_record(common, entry.request.authority), common.start_time.ToNanoseconds() / 1e9)
        )
    for entry in message.tcp_logs.log_entry:
        common = entry.common_properties
        out.append((_record(common, ""), common.start_time.ToNanoseconds() / 1e9))
    return out
