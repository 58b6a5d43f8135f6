"""Metrics an SRE can alert on: every series from start, build and process info, sidecars by
sync state, push latency and upstream errors from a live proxy with a real Envoy, a bounded
type label, and a Grafana dashboard that references only what the proxy exposes."""

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xdsproxy.debug.metrics import Metrics, metric_type
from xdsproxy.harness.stack import eventually, running_envoy, running_proxy, running_sim

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "xdsproxy-dashboard.json"


def _samples(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_every_series_exists_from_start() -> None:
    async with running_sim() as sim, running_proxy(sim.port, debug_listen="127.0.0.1:0") as proxy:
        samples = await asyncio.to_thread(_samples, proxy.debug.port)
    for name, labels in (
        ("xdsproxy_sidecars", {"type": "CDS", "state": "SYNCED"}),
        ("xdsproxy_sidecars", {"type": "other", "state": "NACK"}),
        ("xdsproxy_push_latency_seconds_count", {"type": "LDS"}),
        ("xdsproxy_upstream_errors_total", {"code": "UNAVAILABLE"}),
        ("xdsproxy_nacks_total", {"type": "RDS", "origin": "local"}),
        ("xdsproxy_als_rejections_total", {"reason": "forged_claim"}),
        ("xdsproxy_streams", {"protocol": "Delta"}),
        ("xdsproxy_learns_total", {}),
        ("xdsproxy_store_errors_total", {}),
    ):
        assert _value(samples, name, **labels) == 0.0, (name, labels)
    build = [k for k in samples if k[0] == "xdsproxy_build_info"]
    assert len(build) == 1 and ("version", "0.1.0") in build[0][1]
    assert _value(samples, "process_resident_memory_bytes") > 0


@pytest.mark.envoy
async def test_sync_state_push_latency_and_upstream_errors_from_a_live_proxy() -> None:
    async with running_sim() as sim, running_proxy(sim.port, debug_listen="127.0.0.1:0") as proxy:
        port = proxy.debug.port
        async with running_envoy(proxy.port):

            def synced() -> bool:
                samples = _samples(port)
                return _value(samples, "xdsproxy_sidecars", type="CDS", state="SYNCED") == 1

            await eventually(synced, timeout=20)
            samples = await asyncio.to_thread(_samples, port)
            assert _value(samples, "xdsproxy_push_latency_seconds_count", type="CDS") >= 1
            assert _value(samples, "xdsproxy_sidecars", type="CDS", state="STALE") == 0
            await sim.stop()  # Istiod goes away: the upstream stream ends in error

            def counted() -> bool:
                return _value(_samples(port), "xdsproxy_upstream_errors_total", code="UNAVAILABLE")

            assert await eventually(counted, timeout=20) >= 1


def test_the_type_label_is_bounded() -> None:
    """A peer may send any type URL: each new one must not become a new series."""
    assert metric_type("type.googleapis.com/envoy.config.cluster.v3.Cluster") == "CDS"
    assert metric_type("type.googleapis.com/made.up.Type1") == "other"
    metrics = Metrics()
    metrics.upstream_error("NOT_A_CODE")
    assert metrics.value("xdsproxy_upstream_errors_total", {"code": "OTHER"}) == 1


async def test_the_dashboard_references_only_metrics_the_proxy_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    referenced = {
        name
        for expr in exprs
        for name in re.findall(r"\b[a-z_]+(?=[{\[) ]|$)", expr)
        if name.startswith(("xdsproxy_", "process_"))
    }
    async with running_sim() as sim, running_proxy(sim.port, debug_listen="127.0.0.1:0") as proxy:
        exposed = {name for name, _ in await asyncio.to_thread(_samples, proxy.debug.port)}
    assert len(referenced) >= 15
    assert referenced <= exposed, referenced - exposed
    queried = " ".join(exprs)
    for family in ("xdsproxy_sidecars", "xdsproxy_push_latency_seconds_bucket"):
        assert family in queried
