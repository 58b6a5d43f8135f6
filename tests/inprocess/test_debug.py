"""The debug endpoint: health, readiness (store and upstream), metrics, errors as JSON."""

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from tests.helpers import get_json
from xdsproxy.harness.stack import eventually, running_proxy, running_sim
from xdsproxy.istio.names import ServicePort
from xdsproxy.store.base import StoreError


async def test_health_readiness_metrics_and_errors(tmp_path) -> None:
    async with (
        running_sim() as sim,
        running_proxy(
            sim.port,
            debug_listen="127.0.0.1:0",
            mode="lazy",
            store=f"sqlite://{tmp_path}/e.db",
            egress=ServicePort("lazy-egress.istio-system.svc.cluster.local", 80),
            als_listen="127.0.0.1:0",
        ) as proxy,
    ):
        port = proxy.debug.port
        assert await asyncio.to_thread(get_json, port, "/healthz") == (200, {"status": "ok"})
        ready = await eventually(lambda: get_json(port, "/readyz")[0] == 200, timeout=10)
        assert ready
        code, metrics = await asyncio.to_thread(get_json, port, "/metrics")
        assert code == 200 and "xdsproxy_learns_total" in metrics
        code, error = await asyncio.to_thread(get_json, port, "/nope")
        assert code == 404 and "error" in error
        await sim.stop()
        code, report = await eventually(
            lambda: (r := get_json(port, "/readyz"))[0] == 503 and r, timeout=15
        )
        assert report["checks"]["upstream"] != "ok" and report["checks"]["store"] == "ok"


async def test_a_store_that_cannot_be_opened_stops_start_up(tmp_path) -> None:
    """Serving with empty scopes would strip every reconnecting sidecar: refuse instead."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    async with running_sim() as sim:
        with pytest.raises(StoreError, match=r"edges\.db"):
            async with running_proxy(
                sim.port,
                mode="lazy",
                store=f"sqlite://{blocker}/edges.db",
                egress=ServicePort("lazy-egress.istio-system.svc.cluster.local", 80),
                als_listen="127.0.0.1:0",
            ):
                pass


async def test_an_egress_istiod_does_not_send_makes_the_replica_not_ready() -> None:
    """`--egress` naming no service Istiod sends would route every catch-all nowhere."""
    from tests.xds_messages import sotw_request
    from xdsproxy.harness.ads import AdsClient
    from xdsproxy.harness.lazymesh import egress_service
    from xdsproxy.sim.mesh import generate

    async with (
        running_sim(generate(20)) as sim,
        running_proxy(
            sim.port,
            debug_listen="127.0.0.1:0",
            mode="lazy",
            egress=ServicePort("lazy-egress.istio-system.svc.cluster.local", 80),
            als_listen="127.0.0.1:0",
        ) as proxy,
    ):
        port = proxy.debug.port
        client = AdsClient(proxy.port)
        await client.send(sotw_request(with_node=True))
        await client.recv()
        _, report = await eventually(
            lambda: (r := get_json(port, "/readyz"))[0] == 503 and r, timeout=10
        )
        assert (
            "--egress lazy-egress.istio-system.svc.cluster.local:80" in report["checks"]["egress"]
        )
        sim.mutate(lambda m: m.add(egress_service(80, 15081)))
        await eventually(lambda: get_json(port, "/readyz")[0] == 200, timeout=10)
        await client.close()
        assert proxy.metrics.value("xdsproxy_egress_nodes") == 0


@pytest.mark.slow
async def test_readiness_returns_promptly_after_an_istiod_outage() -> None:
    """After a 10 s outage, gRPC's default reconnect backoff would keep the probe away for
    seconds more (both replicas out of the Service for nothing): it reconnects within 1 s."""
    from xdsproxy.harness.http import free_port

    port = free_port()
    sim = await _start_sim(port)
    async with running_proxy(port, debug_listen="127.0.0.1:0", als_listen="127.0.0.1:0") as proxy:
        debug = proxy.debug.port
        await eventually(lambda: get_json(debug, "/readyz")[0] == 200, timeout=10)
        await sim.stop()
        await eventually(lambda: get_json(debug, "/readyz")[0] == 503, timeout=15)
        await asyncio.sleep(10)
        sim = await _start_sim(port)
        try:
            await eventually(lambda: get_json(debug, "/readyz")[0] == 200, timeout=3)
        finally:
            await sim.stop()


async def _start_sim(port: int):
    from xdsproxy.sim.mesh import generate
    from xdsproxy.sim.server import SimServer

    sim = SimServer(generate(10))
    await sim.start(f"127.0.0.1:{port}")
    return sim


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", body, method="POST", headers={"content-type": "x"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("writes", [False, True])
async def test_scope_writes_are_off_unless_asked_and_bad_requests_are_named(writes) -> None:
    async with (
        running_sim() as sim,
        running_proxy(
            sim.port,
            debug_listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            admin_writes=writes,
            mode="lazy",
            egress=ServicePort("lazy-egress.istio-system.svc.cluster.local", 80),
            als_listen="127.0.0.1:0",
        ) as proxy,
    ):
        admin, public = proxy.admin.port, proxy.debug.port
        good = json.dumps({"workload": "ns-0/app", "service": "svc-4.ns-0.svc.cluster.local:8080"})
        # The port the Service exposes serves no scope, read or write.
        assert (await asyncio.to_thread(_post, public, "/admin/scope/add", good.encode()))[0] == 404
        code, _ = await asyncio.to_thread(get_json, public, "/debug/scope/export")
        assert code == 404
        code, answer = await asyncio.to_thread(_post, admin, "/admin/scope/add", good.encode())
        if not writes:
            assert code == 403 and "--admin-writes" in answer["error"]
            return
        assert code == 200 and answer["added"] == 1
        for body, status, says in (
            (b"not json", 400, "malformed"),
            (b"[1]", 400, "JSON object"),
            (json.dumps({"workload": "app", "service": "x:80"}).encode(), 400, "NAMESPACE/NAME"),
            (json.dumps({"workload": "ns/a", "service": "x:http"}).encode(), 400, "1-65535"),
            (json.dumps({"workload": "ns/a", "service": "ns/*"}).encode(), 400, "no namespace"),
            (json.dumps({"workload": "ns/a", "service": "nope.ns"}).encode(), 404, "HOST:PORT"),
        ):
            code, answer = await asyncio.to_thread(_post, admin, "/admin/scope/add", body)
            assert (code, says in answer["error"]) == (status, True), answer
        code, why = await asyncio.to_thread(
            get_json,
            admin,
            "/debug/scope/why?workload=ns-0/app&service=svc-4.ns-0.svc.cluster.local",
        )
        assert code == 200 and why["services"][0]["in_scope"]
        assert why["services"][0]["reasons"][0].startswith("learned by operator via local")
