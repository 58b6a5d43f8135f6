"""The lazy egress is no open proxy: its header-driven passthrough needs a mesh identity.

Istio mTLS on loopback: an SDS stand-in gives every Envoy its own SPIFFE certificate, the
simulator's clusters carry Istio's auto-mTLS transport socket matches, and the egress's lazy
listener requires a client certificate from the mesh root. A request that does not come from a
sidecar cannot name its destination; one that does has its lazy headers set by the sidecar.
"""

import asyncio
import http.client
import socket
import ssl

import pytest

from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import request_via_sidecar
from xdsproxy.harness.lazymesh import lazy_mesh, sidecar_identity
from xdsproxy.harness.pki import Authority, trusting_client
from xdsproxy.harness.stack import eventually
from xdsproxy.scope.contract import ORIGINAL_DST, ORIGINAL_PORT, SOURCE_NAMESPACE

pytestmark = pytest.mark.envoy

A = "svc-3.ns-1.svc.cluster.local"


def _steer(port: int, target: tuple[str, int], mesh_port: int, tls: ssl.SSLContext | None) -> str:
    """A request straight to the egress that asks for `target`. Its outcome, as text."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn: socket.socket = tls.wrap_socket(raw) if tls else raw
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    with conn:
        request = (
            f"GET / HTTP/1.1\r\nHost: example.com\r\n{SOURCE_NAMESPACE}: ns-0\r\n"
            f"{ORIGINAL_PORT}: {mesh_port}\r\n{ORIGINAL_DST}: {target[0]}:{target[1]}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            conn.sendall(request.encode())
            response = http.client.HTTPResponse(conn)  # type: ignore[arg-type]
            response.begin()
            return f"status {response.status}"
        except (ssl.SSLError, OSError, http.client.HTTPException) as exc:
            return f"refused: {exc!r}"


async def test_only_mesh_sidecars_can_use_the_egress_and_cannot_pick_its_destination(
    tmp_path,
) -> None:
    async with lazy_mesh(delta=False, mtls=True) as mesh:
        assert mesh.mesh_ca is not None
        port = mesh.port
        egress_port = mesh.proxy.config.egress_settings.port
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta=False)
        listen = identity.proxy_config["proxyListenPort"]
        outside, c = mesh.backends["outside"], mesh.backends["c"]
        handshakes = f"listener.127.0.0.1_{egress_port}.ssl.handshake"

        # A mesh sidecar's first request: over mTLS to the egress, the caller's own routing.
        reply = await asyncio.to_thread(
            request_via_sidecar, listen, ("10.96.0.13", port), A, "127.0.0.2"
        )
        assert reply.status == 200, reply.body
        assert reply.json()["backend"] == "b"
        assert mesh.egress.stat(handshakes) >= 1
        learned = f"outbound|{port}|v2|{A}"
        await eventually(
            lambda: learned in dynamic_config(sidecar.config_dump(include_eds=False))["clusters"],
            timeout=10,
        )

        # Not through a sidecar: no certificate, or one from another CA. Nothing is forwarded.
        foreign = await asyncio.to_thread(Authority, tmp_path, "foreign")
        impostor = await asyncio.to_thread(foreign.workload, "ns-0", "default")
        target = (outside.host, outside.port)
        before = len(outside.requests)
        attempts = {
            "plaintext": None,
            "TLS without a certificate": trusting_client(),
            "a certificate from another CA": trusting_client(impostor.cert, impostor.key),
        }
        for name, tls in attempts.items():
            outcome = await asyncio.to_thread(_steer, egress_port, target, port, tls)
            assert outcome.startswith("refused"), f"{name}: {outcome}"
        assert len(outside.requests) == before

        # The control: the same request with a mesh certificate does reach the target, so the
        # refusals above are the certificate check and nothing else.
        mesh_cert = mesh.mesh_ca.sds.workloads[identity.node_id]
        outcome = await asyncio.to_thread(
            _steer, egress_port, target, port, trusting_client(mesh_cert.cert, mesh_cert.key)
        )
        assert outcome == "status 200"
        assert len(outside.requests) == before + 1

        # Through a sidecar, the app cannot steer: the catch-all overwrites the lazy headers with
        # what the sidecar saw, so the request goes where the app really dialled.
        c_before = len(c.requests)
        reply = await asyncio.to_thread(
            request_via_sidecar,
            listen,
            target,
            "example.com",
            "127.0.0.2",
            {ORIGINAL_DST: f"127.0.0.1:{c.port}", SOURCE_NAMESPACE: "istio-system"},
        )
        assert reply.status == 200 and reply.json()["backend"] == "outside"
        assert len(c.requests) == c_before
        for header in (ORIGINAL_DST, SOURCE_NAMESPACE):
            assert header not in outside.requests[-1]
