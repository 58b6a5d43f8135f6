"""A raw ADS client and a recording upstream stand-in for Istiod, both speaking bytes over real
gRPC: for tests and benchmarks that need a peer that does what Envoy or Istiod never would."""

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from xdsproxy.server.grpcio import (
    DELTA_METHOD,
    SOTW_METHOD,
    ads_handler,
    message_options,
    method_path,
)


class AdsClient:
    """A bare gRPC ADS peer, for sending what Envoy never would."""

    def __init__(
        self,
        port: int,
        delta: bool = False,
        metadata: tuple[tuple[str, str], ...] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        target = f"127.0.0.1:{port}"
        opts = message_options() + (options or [])
        self.channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials
            else grpc.aio.insecure_channel(target, options=opts)
        )
        method = method_path(DELTA_METHOD if delta else SOTW_METHOD)
        self.call = self.channel.stream_stream(method)(metadata=metadata)

    async def send(self, data: bytes) -> None:
        await self.call.write(data)

    async def recv(self, timeout: float = 10.0) -> bytes:
        data = await asyncio.wait_for(self.call.read(), timeout)
        assert data is not grpc.aio.EOF, "stream ended"
        return data

    async def status(self, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
        code = await asyncio.wait_for(self.call.code(), timeout)
        return code, await self.call.details()

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


class RecordingUpstream:
    """A stand-in for Istiod that records what reaches it and answers with `respond`."""

    def __init__(self, respond: Callable[[bytes], list[bytes]]) -> None:
        self.respond = respond
        self.metadata: list[dict[str, str]] = []
        self.peers: list[str] = []  # one entry per stream: the connection it came on
        self.auth: list[dict[str, list[bytes]]] = []
        self.requests: list[bytes] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, credentials: grpc.ServerCredentials | None = None) -> int:
        self.server = grpc.aio.server(options=message_options())
        self.server.add_generic_rpc_handlers((ads_handler(self._serve, self._serve),))
        if credentials:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        if self.server:
            await self.server.stop(0)

    async def _serve(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        self.peers.append(context.peer())
        self.auth.append(dict(context.auth_context()))
        try:
            while (data := await context.read()) is not grpc.aio.EOF:
                self.requests.append(data)
                for response in self.respond(data):
                    await context.write(response)
        except asyncio.CancelledError:
            pass
