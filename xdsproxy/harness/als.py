"""Sending an access log entry as the lazy egress would: for tests and benchmarks."""

import grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

from xdsproxy.scope.contract import METADATA_NAMESPACE

ALS_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


def send_access_log(
    port: int, ip: str, cluster: str, namespace: str = "ns-0", workload: str = "app"
) -> None:
    """One HTTP entry: `ip` (the caller's socket address) reached `cluster`, with the source
    headers the caller's sidecar sets."""
    message = StreamAccessLogsMessage()
    common = message.http_logs.log_entry.add().common_properties
    common.downstream_direct_remote_address.socket_address.address = ip
    common.upstream_cluster = cluster
    common.start_time.GetCurrentTime()
    common.metadata.filter_metadata[METADATA_NAMESPACE].update(
        {"x-xdsproxy-source-namespace": namespace, "x-xdsproxy-source-workload": workload}
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        channel.stream_unary(ALS_METHOD)(iter([message.SerializeToString()]), timeout=10)
