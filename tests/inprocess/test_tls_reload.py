"""TLS that explains itself and renews without a restart: a renewed serving certificate is
served to new connections while open streams carry on; a renewed mesh root is used for new
upstream streams; a certificate of Istiod's that does not verify is named in `/readyz`."""

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import pytest

from tests.helpers import get_json
from tests.xds_messages import sotw_request
from xdsproxy.harness.ads import AdsClient
from xdsproxy.harness.pki import Authority
from xdsproxy.harness.stack import eventually, running_proxy, running_sim
from xdsproxy.sim.mesh import generate
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import decode_sotw_response

NAME = "xdsproxy.istio-system.svc"


def _issue(directory: Path, root: str) -> tuple[Path, Path, Path]:
    directory.mkdir()
    authority = Authority(directory, root)
    leaf = authority.issue("serving", [f"DNS:{NAME}", "IP:127.0.0.1"])
    return authority.cert, leaf.cert, leaf.key


def _swap(source: Path, target: Path) -> None:
    """As the kubelet updates a mounted Secret: the new file replaces the old in one rename."""
    staged = target.with_suffix(".new")
    shutil.copy(source, staged)
    os.replace(staged, target)


def _client(port: int, ca: Path) -> AdsClient:
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    return AdsClient(
        port, credentials=credentials, options=[("grpc.ssl_target_name_override", NAME)]
    )


async def test_a_renewed_serving_certificate_is_served_without_dropping_streams(tmp_path) -> None:
    old_ca, old_cert, old_key = _issue(tmp_path / "old", "old-root")
    new_ca, new_cert, new_key = _issue(tmp_path / "new", "new-root")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    async with (
        running_sim(generate(10)) as sim,
        running_proxy(sim.port, cert=cert, key=key) as proxy,
    ):
        before = _client(proxy.port, old_ca)
        await before.send(sotw_request(with_node=True))
        assert decode_sotw_response(await before.recv()).names
        _swap(new_key, key)
        _swap(new_cert, cert)
        after = _client(proxy.port, new_ca)
        await after.send(sotw_request(with_node=True))
        assert decode_sotw_response(await after.recv()).names
        # The stream opened under the old certificate is still served.
        await before.send(sotw_request(typeurls.LISTENER))
        assert decode_sotw_response(await before.recv()).type_url == typeurls.LISTENER
        stale = _client(proxy.port, old_ca)
        with pytest.raises(grpc.aio.AioRpcError):
            await stale.send(sotw_request(with_node=True))
            await stale.recv()
        for client in (before, after, stale):
            await client.close()


@pytest.mark.slow
async def test_an_istiod_certificate_that_does_not_verify_is_named_in_readyz(tmp_path) -> None:
    ca, cert, key = _issue(tmp_path / "pki", "root")
    from xdsproxy.harness.ads import RecordingUpstream

    upstream = RecordingUpstream(lambda data: [])
    await upstream.start(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    try:
        async with running_proxy(
            upstream.port,
            upstream_ca=ca,
            upstream_sni="someone-else.example",
            debug_listen="127.0.0.1:0",
        ) as proxy:
            _, report = await eventually(
                lambda: (
                    (r := get_json(proxy.debug.port, "/readyz"))[0] == 503
                    and "does not verify" in r[1]["checks"]["upstream"]
                    and r
                ),
                timeout=15,
            )
            reason = report["checks"]["upstream"]
            assert "someone-else.example" in reason and "--upstream-sni" in reason
    finally:
        await upstream.stop()


async def test_a_renewed_mesh_root_is_used_for_new_upstream_streams(tmp_path) -> None:
    """Istiod's root rotates: the file behind --upstream-ca is replaced, and new sidecar
    streams verify Istiod with the new root without a restart."""
    old_ca, _, _ = _issue(tmp_path / "old", "old-root")
    new_ca, new_cert, new_key = _issue(tmp_path / "new", "new-root")
    from xdsproxy.harness.ads import RecordingUpstream

    upstream = RecordingUpstream(lambda data: [])
    await upstream.start(
        grpc.ssl_server_credentials([(new_key.read_bytes(), new_cert.read_bytes())])
    )
    root = tmp_path / "root-cert.pem"
    shutil.copy(old_ca, root)
    try:
        async with running_proxy(upstream.port, upstream_ca=root, upstream_sni=NAME) as proxy:
            refused = AdsClient(proxy.port)
            await refused.send(sotw_request(with_node=True))
            code, _ = await refused.status(timeout=30)
            assert code == grpc.StatusCode.UNAVAILABLE and not upstream.requests
            await refused.close()
            _swap(new_ca, root)
            accepted = AdsClient(proxy.port)
            await accepted.send(sotw_request(with_node=True))
            await eventually(lambda: upstream.requests, timeout=15)
            await accepted.close()
    finally:
        await upstream.stop()
    await asyncio.sleep(0)
