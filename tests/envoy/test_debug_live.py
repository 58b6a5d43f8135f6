"""The debug endpoint and `xdsproxy status` against a live lazy xdsproxy with real Envoys; the
sidecar's bearer token appears nowhere."""

import asyncio
import json
import logging
import subprocess
import sys
from importlib import resources

import jsonschema
import pytest

from tests.helpers import get_json
from tests.istio_fixtures import dump_files, load_dump
from xdsproxy.debug.model import _resource
from xdsproxy.harness.dump import dynamic_config
from xdsproxy.harness.http import request_via_sidecar
from xdsproxy.harness.lazymesh import lazy_mesh, sidecar_identity
from xdsproxy.harness.stack import eventually

pytestmark = pytest.mark.envoy

TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2lkZWNhci10b2tlbg.very-secret-signature"
A = "svc-3.ns-1.svc.cluster.local"
SCHEMAS = json.loads(resources.files("xdsproxy.debug").joinpath("schemas.json").read_text())


def _validate(instance: object, name: str) -> None:
    schema = {**SCHEMAS[name], "counts": SCHEMAS["counts"]}
    jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())


async def test_debug_views_status_and_no_token_anywhere(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with lazy_mesh(delta=False) as mesh:
        identity = sidecar_identity("app-0", "127.0.0.2")
        identity.grpc_metadata = {"authorization": f"Bearer {TOKEN}", "clusterid": "Kubernetes"}
        sidecar = await mesh.add_sidecar(identity, delta=False)
        listen = identity.proxy_config["proxyListenPort"]
        reply = await asyncio.to_thread(
            request_via_sidecar, listen, ("10.96.0.13", mesh.port), A, "127.0.0.2"
        )
        assert reply.status == 200
        cluster = f"outbound|{mesh.port}|v2|{A}"
        await eventually(lambda: cluster in dynamic_config(sidecar.config_dump())["clusters"])
        port = mesh.proxy.admin.port
        public = mesh.proxy.debug.port
        node_id = identity.node_id

        # The endpoint the Service exposes serves no sidecar's config: only the loopback
        # admin listener does.
        for path in ("/debug/nodes", f"/debug/nodes/{node_id}", "/debug/workloads"):
            assert (await asyncio.to_thread(get_json, public, path))[0] == 404
        assert (await asyncio.to_thread(get_json, public, "/readyz"))[0] == 200

        code, nodes = await asyncio.to_thread(get_json, port, "/debug/nodes")
        assert code == 200 and len(nodes) == 2
        for row in nodes:
            _validate(row, "node")
        mine = next(r for r in nodes if r["node"] == node_id)
        assert mine["workload"] == "ns-0/app" and mine["protocol"] == "SotW"
        assert sorted(r["role"] for r in nodes) == ["egress", "sidecar"]
        cds = mine["types"]["CDS"]
        assert cds["pushed"]["resources"] < cds["upstream"]["resources"]

        code, detail = await asyncio.to_thread(get_json, port, f"/debug/nodes/{node_id}")
        assert code == 200
        _validate(detail, "node")
        learned = [d for d in detail["dependencies"] if d["origin"] == "learned"]
        assert [(d["host"], d["port"]) for d in learned] == [(A, mesh.port)]
        assert any(
            d["origin"] == "always" and d["host"] == "PassthroughCluster"
            for d in detail["dependencies"]
        )

        code, workloads = await asyncio.to_thread(get_json, port, "/debug/workloads")
        assert code == 200
        for row in workloads:
            _validate(row, "workload")
        assert next(w for w in workloads if w["workload"] == "ns-0/app")["learned"] == 1

        views = {}
        for view in ("pushed", "upstream"):
            code, dump = await asyncio.to_thread(
                get_json, port, f"/debug/config_dump?node={node_id}&view={view}"
            )
            assert code == 200
            _validate(dump, "config_dump")
            views[view] = {r["name"] for r in dump["types"]["CDS"]}
        assert cluster in views["pushed"]
        # Pushed: a subset of upstream, plus the ALS cluster xdsproxy adds for usage logging.
        assert views["pushed"] - {"xdsproxy-als"} < views["upstream"]

        for path, expected in (
            (f"/debug/config_dump?node={node_id}&view=bogus", 400),
            ("/debug/config_dump", 400),
            ("/debug/nodes/sidecar~nobody", 404),
            ("/debug/config_dump?node=sidecar~nobody", 404),
        ):
            code, error = await asyncio.to_thread(get_json, port, path)
            assert code == expected, path
            _validate(error, "error")

        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "xdsproxy.cli", "status", "--debug", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        header, *lines = result.stdout.splitlines()
        assert header.split()[:5] == ["NAME", "CDS", "LDS", "EDS", "RDS"]
        assert header.split()[-4:] == ["REPLICA", "ISTIOD", "VERSION", "SAVED"]
        line = next(ln for ln in lines if ln.startswith("app-0.ns-0 "))
        assert "SYNCED" in line and "clusters" in line and "%" in line
        assert "lazy egress nodes connected: 1" in result.stdout
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "xdsproxy.cli",
                "status",
                "--debug",
                f"http://127.0.0.1:{port}/",
                "app-0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0 and A in result.stdout and "learned" in result.stdout
        assert f"node:      {node_id}" in result.stdout

        # The token reached nothing xdsproxy shows or logs.
        outputs = [json.dumps(nodes), json.dumps(detail), json.dumps(workloads)]
        outputs.append(str(await asyncio.to_thread(get_json, port, "/metrics")))
        for view in ("pushed", "upstream"):
            outputs.append(
                json.dumps(
                    await asyncio.to_thread(
                        get_json, port, f"/debug/config_dump?node={node_id}&view={view}"
                    )
                )
            )
        for text in [*outputs, caplog.text]:
            assert TOKEN not in text and "very-secret-signature" not in text


def test_unknown_status_endpoint_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xdsproxy.cli", "status", "--debug", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "cannot reach the admin endpoint" in result.stderr


def test_istio_only_types_are_shown_as_type_and_size() -> None:
    dump = load_dump(dump_files()[0])
    shown = [
        _resource(name, body)
        for name, body in dump.resources["type.googleapis.com/envoy.config.listener.v3.Listener"]
    ]
    opaque = [r for r in shown if "opaque" in r]
    assert opaque, "listeners with Istio-only filters should be opaque"
    for row in opaque:
        assert row["opaque"]["size"] > 0 and row["opaque"]["type_url"].endswith("Listener")
    decoded = [r for r in shown if "resource" in r]
    for row in decoded:
        assert row["resource"]["@type"].endswith("Listener")
