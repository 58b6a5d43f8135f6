"""Every protocol lazy, with real Envoys on the realistic profile: out-of-scope TCP and sniffed
services reach their backend through the egress tunnel, are learned at connect, and switch to
direct without breaking what is open."""

import asyncio
import socket
import ssl
import time

import grpc
import pytest

from tests.helpers import (
    DRAIN_SECONDS,
    EGRESS_REQUESTS,
    dumped_clusters,
    greeting,
    is_placeholder,
    named_clusters,
    rejected,
    service_cluster,
)
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import connect_via_sidecar, echoes, request_via_sidecar
from xdsproxy.harness.lazymesh import realistic_lazy_mesh, sidecar_identity
from xdsproxy.harness.pki import Authority, trusting_client
from xdsproxy.harness.stack import eventually
from xdsproxy.istio.names import outbound_cluster
from xdsproxy.scope.contract import ORIGINAL_DST, ORIGINAL_PORT, SOURCE_NAMESPACE
from xdsproxy.scope.tunnel import TUNNEL_LISTENER

pytestmark = pytest.mark.envoy


def _is_real(cluster: dict) -> bool:
    return cluster.get("type") == "EDS"


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_tcp_and_sniffed_services_tunnel_learn_and_switch_without_breaking(
    delta: bool,
) -> None:
    async with realistic_lazy_mesh(delta) as mesh:
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta, drain_seconds=DRAIN_SECONDS)
        listen = identity.proxy_config["proxyListenPort"]
        egress_cluster = mesh.proxy.runtime.egress_cluster

        listeners = dynamic_config(sidecar.config_dump(include_eds=False))["listeners"]
        assert TUNNEL_LISTENER in listeners
        clusters = dumped_clusters(sidecar)
        outbound = {n: c for n, c in clusters.items() if outbound_cluster(n)}
        real = {n for n, c in outbound.items() if not is_placeholder(c)}
        # Headless services (ORIGINAL_DST: only the caller knows the pod address) stay.
        headless = {n for n in real if outbound[n].get("type") == "ORIGINAL_DST"}
        assert headless, "the realistic profile has a headless TCP service"
        assert real - headless == {egress_cluster}, "before learning only the egress is real"
        assert sum(map(is_placeholder, outbound.values())) >= 10

        service, _ = mesh.tcp["tcp"]
        vip = (service.cluster_ip, service.ports[0].number)
        name = service_cluster(service)
        tunnelled_before = mesh.egress.stat(EGRESS_REQUESTS)
        # A connection opened while the service is out of scope: through the tunnel.
        held = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
        try:
            assert await asyncio.to_thread(echoes, held)
            assert mesh.egress.stat(EGRESS_REQUESTS) == tunnelled_before + 1
            await eventually(lambda: _is_real(dumped_clusters(sidecar)[name]), timeout=10)
            await eventually(lambda: sidecar.stat(f"cluster.{name}.membership_healthy") >= 1)
            switched = time.monotonic()

            # The next connection goes direct: the egress sees no new tunnel.
            direct = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
            with direct:
                assert await asyncio.to_thread(echoes, direct)
            assert sidecar.stat(f"cluster.{name}.upstream_cx_total") >= 1
            assert mesh.egress.stat(EGRESS_REQUESTS) == tunnelled_before + 1

            # The tunnelled connection outlives twice the drain time after the switch.
            while time.monotonic() - switched < 2 * DRAIN_SECONDS + 1:
                assert await asyncio.to_thread(echoes, held), "tunnel closed after the switch"
                await asyncio.sleep(0.1)
        finally:
            held.close()

        # A server-first service: the greeting arrives through the tunnel before any write.
        service, _ = mesh.tcp["server-first"]
        vip = (service.cluster_ip, service.ports[0].number)
        name = service_cluster(service)
        conn = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
        with conn:
            assert await asyncio.to_thread(greeting, conn) == b"220 ready\r\n"
            assert await asyncio.to_thread(echoes, conn)
        await eventually(lambda: _is_real(dumped_clusters(sidecar)[name]), timeout=10)
        await eventually(lambda: sidecar.stat(f"cluster.{name}.membership_healthy") >= 1)
        conn = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
        with conn:
            assert await asyncio.to_thread(greeting, conn) == b"220 ready\r\n"
        assert sidecar.stat(f"cluster.{name}.upstream_cx_total") >= 1

        # A sniffed port: HTTP keeps L7 through the table's catch-all, raw TCP tunnels.
        service, _ = mesh.tcp["sniffed"]
        port = service.ports[0].number
        vip = (service.cluster_ip, port)
        name = service_cluster(service)
        before = mesh.egress.stat(EGRESS_REQUESTS)
        reply = await asyncio.to_thread(
            request_via_sidecar, listen, vip, f"{service.name}.{service.namespace}", "127.0.0.2"
        )
        assert reply.status == 200 and reply.json()["backend"] == "sniffed", reply.body
        assert mesh.egress.stat(EGRESS_REQUESTS) == before + 1
        await eventually(lambda: _is_real(dumped_clusters(sidecar)[name]), timeout=10)
        await eventually(lambda: sidecar.stat(f"cluster.{name}.membership_healthy") >= 1)
        reply = await asyncio.to_thread(
            request_via_sidecar, listen, vip, f"{service.name}.{service.namespace}", "127.0.0.2"
        )
        assert reply.status == 200 and reply.json()["backend"] == "sniffed"
        conn = await asyncio.to_thread(connect_via_sidecar, listen, vip, "127.0.0.2")
        with conn:
            assert await asyncio.to_thread(echoes, conn)
        assert mesh.egress.stat(EGRESS_REQUESTS) == before + 1, "in scope: both go direct"

        runtime = mesh.proxy.runtime
        assert runtime.metrics.value("xdsproxy_learns_total") == 3
        for envoy in (sidecar, mesh.egress):
            assert rejected(envoy) == 0
            assert envoy.stat("cluster_manager.warming_clusters") == 0
            assert envoy.stat("listener_manager.total_listeners_warming") == 0
        # Nothing dangling: every cluster a listener of the sidecar names, it holds.
        listeners = dynamic_config(sidecar.config_dump(include_eds=False))["listeners"]
        named = set().union(*(named_clusters(body) for _, body in listeners.values()))
        assert named and named <= set(dumped_clusters(sidecar))


def _connect(egress_port: int, authority: str, port: int, tls: ssl.SSLContext | None) -> str:
    """An HTTP/1.1 CONNECT straight to the egress (not through a sidecar). Its outcome."""
    try:
        raw = socket.create_connection(("127.0.0.1", egress_port), timeout=5)
        conn: socket.socket = tls.wrap_socket(raw) if tls else raw
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    with conn:
        request = (
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"{SOURCE_NAMESPACE}: ns-0\r\n{ORIGINAL_PORT}: {port}\r\n"
            f"{ORIGINAL_DST}: {authority}\r\n\r\n"
        )
        try:
            conn.sendall(request.encode())
            head = conn.recv(4096)
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc!r}"
        if not head:
            return "refused: closed"
        return f"status {head.split(b' ', 2)[1].decode()}"


async def test_the_egress_tunnels_mesh_services_only_and_only_for_mesh_peers(tmp_path) -> None:
    async with realistic_lazy_mesh(delta=False, mtls=True) as mesh:
        assert mesh.mesh_ca is not None
        identity = sidecar_identity("app-0", "127.0.0.2")
        sidecar = await mesh.add_sidecar(identity, delta=False)
        listen = identity.proxy_config["proxyListenPort"]
        egress_port = mesh.proxy.config.egress_settings.port
        service, _ = mesh.tcp["tcp"]
        port = service.ports[0].number

        # Through the sidecar, over mesh mTLS, attributed by the sidecar's SPIFFE identity.
        conn = await asyncio.to_thread(
            connect_via_sidecar, listen, (service.cluster_ip, port), "127.0.0.2"
        )
        with conn:
            assert await asyncio.to_thread(echoes, conn)
        await eventually(
            lambda: _is_real(dumped_clusters(sidecar)[service_cluster(service)]), timeout=10
        )
        assert mesh.proxy.runtime.metrics.value("xdsproxy_learns_total") == 1

        mesh_cert = mesh.mesh_ca.sds.workloads[identity.node_id]
        with_cert = trusting_client(mesh_cert.cert, mesh_cert.key)
        admin = mesh.egress.admin
        outside = mesh.backends["outside"]
        # A mesh certificate is not enough to CONNECT anywhere but to a mesh service: not the
        # egress's own admin, not an address outside the mesh, in a TCP or an HTTP port's scope.
        for target, scope_port in (
            (admin, port),
            (admin, mesh.port),
            (f"{outside.host}:{outside.port}", mesh.port),
            (f"{outside.host}:{outside.port}", port),
        ):
            outcome = await asyncio.to_thread(_connect, egress_port, target, scope_port, with_cert)
            assert outcome == "status 404", f"CONNECT {target} in scope {scope_port}: {outcome}"
        # The control: the same client reaches a mesh service, so the 404s are the target.
        outcome = await asyncio.to_thread(
            _connect, egress_port, f"{service.fqdn}:{port}", port, with_cert
        )
        assert outcome == "status 200"
        # Without a mesh certificate nothing is tunnelled at all.
        foreign = await asyncio.to_thread(Authority, tmp_path, "foreign")
        impostor = await asyncio.to_thread(foreign.workload, "ns-0", "default")
        for tls in (None, trusting_client(), trusting_client(impostor.cert, impostor.key)):
            outcome = await asyncio.to_thread(
                _connect, egress_port, f"{service.fqdn}:{port}", port, tls
            )
            assert outcome.startswith("refused"), outcome


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
@pytest.mark.parametrize("version", ["1.9.1", ""], ids=["old-istio", "unknown-version"])
@pytest.mark.parametrize("lazy", ["placeholders", "compact"])
async def test_a_sidecar_without_the_internal_listener_keeps_its_tcp_services(
    delta: bool, version: str, lazy: str
) -> None:
    """Istio before 1.18 has no internal-listener bootstrap extension: known from the node's
    ISTIO_VERSION, or else from the one NACK of the tunnel listener, never repeated. Such a
    sidecar gets no compact mode either: its TCP services keep their listeners."""
    async with realistic_lazy_mesh(delta, lazy=lazy) as mesh:
        identity = sidecar_identity("app-0", "127.0.0.2")
        identity.istio_version, identity.internal_listener = version, False
        sidecar = await mesh.add_sidecar(identity, delta)
        listen = identity.proxy_config["proxyListenPort"]
        service, _ = mesh.tcp["tcp"]

        await eventually(
            lambda: _is_real(dumped_clusters(sidecar)[service_cluster(service)]), timeout=10
        )
        clusters = dumped_clusters(sidecar)
        assert not any(map(is_placeholder, clusters.values()))
        listeners = dynamic_config(sidecar.config_dump(include_eds=False))["listeners"]
        assert TUNNEL_LISTENER not in listeners
        assert f"{service.cluster_ip}_{service.ports[0].number}" in listeners
        conn = await asyncio.to_thread(
            connect_via_sidecar, listen, (service.cluster_ip, service.ports[0].number), "127.0.0.2"
        )
        with conn:
            assert await asyncio.to_thread(echoes, conn)
        nacks = sidecar.stat("listener_manager.lds.update_rejected")
        assert nacks == (1 if not version else 0)
        # No NACK loop: nothing more is rejected, not even after the stream reconnects.
        session = next(
            s for s in mesh.proxy.proxy.sessions.values() if identity.node_id == s.node_id
        )
        session.end(grpc.StatusCode.UNAVAILABLE, "test: reconnect")
        await eventually(
            lambda: sum(
                s.node_id == identity.node_id and s.id != session.id
                for s in mesh.proxy.proxy.sessions.values()
            ),
            timeout=15,
        )
        await asyncio.sleep(1)
        assert sidecar.stat("listener_manager.lds.update_rejected") == nacks
        assert not any(map(is_placeholder, dumped_clusters(sidecar).values()))
