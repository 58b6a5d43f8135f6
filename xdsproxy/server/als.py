"""The ALS endpoint (`envoy.service.accesslog.v3.AccessLogService`): the lazy egress streams
access logs here; only connected egress nodes and `--als-allow` networks may."""

import logging

import grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from google.protobuf.message import DecodeError

from xdsproxy.learn.records import records
from xdsproxy.logs import RateLimitedLog
from xdsproxy.server.lazy import LazyRuntime

log = logging.getLogger("xdsproxy.als")

ALS_SERVICE = "envoy.service.accesslog.v3.AccessLogService"


def peer_ip(peer: str) -> str:
    """`ipv4:10.0.0.1:5555` / `ipv6:[::1]:5555` -> the address."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    return rest.rsplit(":", 1)[0]


class AlsService:
    def __init__(self, runtime: LazyRuntime) -> None:
        self.runtime = runtime
        self._warn = RateLimitedLog(log)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ALS_SERVICE,
            {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(self.stream_access_logs)},
        )

    async def stream_access_logs(
        self, _requests: object, context: grpc.aio.ServicerContext
    ) -> bytes:
        ip = peer_ip(context.peer())
        role = self.runtime.als_role(ip)
        if role is None:
            self.runtime.learner.reject("peer_not_allowed")
            self._warn.warning(
                "peer", "access log stream from a peer that is not allowed", extra={"peer": ip}
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{ip} is not a connected lazy egress nor in --als-allow",
            )
        while (data := await context.read()) is not grpc.aio.EOF:
            try:
                message = StreamAccessLogsMessage.FromString(data)
            except DecodeError:
                self.runtime.learner.reject("malformed")
                self._warn.warning("malformed", "malformed access log message", extra={"peer": ip})
                continue
            for record, started in records(message):
                try:
                    if role == "egress":
                        await self.runtime.learner.observe(record, started)
                    else:
                        self.runtime.learner.observe_usage(record, ip)
                except Exception:  # one bad entry must not end the egress's log stream
                    self.runtime.learner.reject("internal_error")
                    log.exception("failed to process an access log entry")
        return b""
