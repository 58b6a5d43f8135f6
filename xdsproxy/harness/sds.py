"""A stand-in for pilot-agent's SDS server: each Envoy's workload certificate and the mesh root.

Istio's agent serves two secrets to its Envoy over the `sds-grpc` cluster: `default` (the
workload certificate and key) and `ROOTCA` (the mesh root for validating peers). On loopback
there is no agent, so this gRPC server plays it for several Envoys at once, choosing the
certificate by the node id in each stream's first request.
"""

import asyncio
import contextlib
import uuid

import grpc
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf.any_pb2 import Any

from xdsproxy.harness.pki import Issued

SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class SdsServer:
    def __init__(self, root: bytes, workloads: dict[str, Issued]) -> None:
        """`workloads`: node id -> the certificate that node's agent would hold."""
        self.root = root
        self.workloads = workloads
        self.port = 0
        self._server: grpc.aio.Server | None = None

    def secret(self, node_id: str, name: str) -> Secret | None:
        secret = Secret(name=name)
        if name == "ROOTCA":
            secret.validation_context.trusted_ca.inline_bytes = self.root
        elif name == "default" and node_id in self.workloads:
            issued = self.workloads[node_id]
            secret.tls_certificate.certificate_chain.inline_bytes = issued.cert.read_bytes()
            secret.tls_certificate.private_key.inline_bytes = issued.key.read_bytes()
        else:
            return None
        return secret

    async def _stream(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        node_id = ""
        sent: set[str] = set()
        with contextlib.suppress(asyncio.CancelledError):
            while (data := await context.read()) is not grpc.aio.EOF:
                request = DiscoveryRequest.FromString(data)
                node_id = node_id or request.node.id
                wanted = [name for name in request.resource_names if name not in sent]
                secrets = [s for name in wanted if (s := self.secret(node_id, name))]
                if not secrets:
                    continue  # an ACK, or a secret this node has none of
                sent.update(s.name for s in secrets)
                response = DiscoveryResponse(
                    version_info="1", type_url=SECRET_TYPE, nonce=uuid.uuid4().hex
                )
                for secret in secrets:
                    packed = Any()
                    packed.Pack(secret)
                    response.resources.append(packed)
                await context.write(response.SerializeToString())

    async def __aenter__(self) -> "SdsServer":
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SDS_SERVICE,
                    {"StreamSecrets": grpc.stream_stream_rpc_method_handler(self._stream)},
                ),
            )
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(None)
