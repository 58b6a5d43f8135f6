"""Config xdsproxy synthesizes, checked by real Envoy 1.40 in `--mode validate`."""

import json
import subprocess

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener
from google.protobuf.any_pb2 import Any
from google.protobuf.json_format import MessageToDict

from tests.helpers import EGRESS, istio_node, scope_of, sim_upstream, upstreams
from xdsproxy.harness.envoy import envoy_binary, grpc_cluster
from xdsproxy.scope.egress import (
    EgressSettings,
    als_cluster,
    original_dst_cluster,
    synthesized_listener,
)
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.wire import typeurls

pytestmark = pytest.mark.envoy


def _dict(any_bytes: bytes, message_type) -> dict:
    message = message_type()
    Any.FromString(any_bytes).Unpack(message)
    return MessageToDict(message, preserving_proto_field_name=True)


def validate(tmp_path, listeners: list[dict], clusters: list[dict]) -> subprocess.CompletedProcess:
    bootstrap = {
        "node": {
            "id": "sidecar~127.0.0.1~egress-0.istio-system~istio-system.svc.cluster.local",
            "cluster": "lazy-egress",
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }
        },
        "static_resources": {
            "listeners": listeners,
            "clusters": [grpc_cluster("xds-grpc", 1), grpc_cluster("sds-grpc", 1), *clusters],
        },
    }
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    return subprocess.run(
        [
            envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--use-dynamic-base-id",
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("mtls", [True, False], ids=["mtls", "plaintext"])
def test_egress_listener_and_clusters_are_valid(tmp_path, mtls: bool) -> None:
    settings = EgressSettings(port=15081, als_host="127.0.0.1", als_port=15020, mtls=mtls)
    listener = _dict(synthesized_listener(settings), Listener)
    assert ("transport_socket" in listener["filter_chains"][0]) is mtls
    result = validate(
        tmp_path,
        [listener],
        [_dict(als_cluster(settings), Cluster), _dict(original_dst_cluster(), Cluster)],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sidecar_listeners_with_usage_logging_are_valid(tmp_path) -> None:
    settings = EgressSettings(als_host="127.0.0.1", als_port=15020)
    view = SidecarView(scope_of(()), EGRESS, settings, 1.0)
    names, bodies = view.select(typeurls.LISTENER, sim_upstream())
    listeners = [
        _dict(b, Listener) for n, b in zip(names, bodies, strict=True) if n.startswith("0.0.0.0_")
    ]
    assert listeners
    result = validate(tmp_path, listeners, [_dict(als_cluster(settings), Cluster)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_realistic_profile_listeners_are_valid(tmp_path) -> None:
    """The simulator's sniffed and TCP `VIP_PORT` listeners, as real Envoy takes them."""
    from xdsproxy.sim.istiod import Snapshot
    from xdsproxy.sim.mesh import generate

    snapshot = Snapshot(generate(20, profile="realistic"), "2026-11-22T10:00:00Z", None)
    node = istio_node("ns-0")
    listeners = snapshot.resources(typeurls.LISTENER, node)
    clusters = snapshot.resources(typeurls.CLUSTER, node)
    vip = [_dict(b, Listener) for n, b in listeners.items() if n.startswith("10.")]
    assert len(vip) >= 15
    referenced = [_dict(b, Cluster) for n, b in clusters.items() if n.startswith("outbound|")]
    result = validate(tmp_path, vip, referenced)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compact_mesh_chains_are_valid(tmp_path) -> None:
    """A compact sidecar's `virtualOutbound` and `0.0.0.0_PORT` HTTP listeners with the
    mesh-range chains (on the realistic profile), as real Envoy takes them."""
    from xdsproxy.scope.compact import MESH_CHAIN, MESH_HTTP_CHAIN, CompactMode, MeshRanges

    upstream = upstreams()["simulator, realistic profile"]
    egress = "outbound|80||lazy-egress.istio-system.svc.cluster.local"
    view = SidecarView(scope_of(()), egress, compact=CompactMode(MeshRanges(), sniffed=True))
    names, bodies = view.select(typeurls.LISTENER, upstream)
    chosen = [
        _dict(b, Listener)
        for n, b in zip(names, bodies, strict=True)
        if n == "virtualOutbound" or n.startswith("0.0.0.0_")
    ]
    chains = {c["name"] for listener in chosen for c in listener["filter_chains"] if "name" in c}
    assert {MESH_CHAIN, MESH_HTTP_CHAIN} <= chains
    clusters = dict(zip(*upstream[typeurls.CLUSTER], strict=True))
    needed = [
        _dict(clusters[n], Cluster)
        for n in ("PassthroughCluster", "BlackHoleCluster", egress)
        if n in clusters
    ]
    result = validate(tmp_path, chosen, needed)
    assert result.returncode == 0, result.stdout + result.stderr
