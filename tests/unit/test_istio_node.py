"""Istio node ids and metadata."""

import pytest
from envoy.config.core.v3.base_pb2 import Node

from tests.istio_fixtures import dump_files, load_dump
from xdsproxy.istio.node import NodeIdError, parse_node


def _node(node_id: str, **metadata) -> Node:
    node = Node(id=node_id)
    node.metadata.update(metadata)
    return node


def test_metadata_wins() -> None:
    parsed = parse_node(
        _node(
            "sidecar~10.1.2.3~reviews-v1-5d8f9c7b6-x2x9z.bookinfo~bookinfo.svc.cluster.local",
            NAMESPACE="bookinfo",
            WORKLOAD_NAME="reviews-v1",
            INSTANCE_IPS="10.1.2.3,fd00::3",
            LABELS={"app": "reviews"},
        )
    )
    assert (parsed.namespace, parsed.workload, parsed.ip) == ("bookinfo", "reviews-v1", "10.1.2.3")
    assert parsed.instance_ips == ("10.1.2.3", "fd00::3")
    assert parsed.labels == {"app": "reviews"}


def test_workload_falls_back_to_pod_name_without_replica_suffixes() -> None:
    parsed = parse_node(
        _node("sidecar~10.1.2.3~reviews-v1-5d8f9c7b6-x2x9z.bookinfo~bookinfo.svc.cluster.local")
    )
    assert (parsed.namespace, parsed.workload) == ("bookinfo", "reviews-v1")
    stateful = parse_node(_node("sidecar~10.1.2.3~db-0.data~data.svc.cluster.local"))
    assert stateful.workload == "db-0"


@pytest.mark.parametrize("bad", ["", "sidecar", "web~1~a.b~c", "sidecar~~a.b~c", "a~b~c~d~e"])
def test_bad_ids_are_rejected(bad: str) -> None:
    with pytest.raises(NodeIdError):
        parse_node(_node(bad))


@pytest.mark.parametrize("path", dump_files(), ids=lambda p: p.name.split("_")[0])
def test_real_nodes_parse(path) -> None:
    dump = load_dump(path)
    node = Node(id=dump.node["id"])
    node.metadata.update(dump.node.get("metadata", {}))
    parsed = parse_node(node)
    assert parsed.proxy_type == "sidecar"
    assert parsed.namespace == dump.node["metadata"]["NAMESPACE"]
    assert parsed.workload


@pytest.mark.parametrize("text", ["²", "٣", "8080²", "", "80a"])
def test_ports_are_ascii_digits_only(text: str) -> None:
    from xdsproxy.istio.names import outbound_cluster, route_table_port, vhost_service

    assert outbound_cluster(f"outbound|{text}||a.ns.svc.cluster.local") is None
    assert vhost_service(f"a.ns.svc.cluster.local:{text}") is None
    assert route_table_port(text) is None
