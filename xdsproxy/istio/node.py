"""Istio's node identity: `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local` plus metadata."""

from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3.base_pb2 import Node
from google.protobuf.json_format import MessageToDict

from xdsproxy.model import WorkloadKey

PROXY_TYPES = ("sidecar", "router")


class NodeIdError(ValueError):
    """A node id that is not in Istio's format."""


@dataclass(frozen=True, slots=True)
class IstioNode:
    id: str
    proxy_type: str
    ip: str
    pod: str
    namespace: str
    workload: str
    labels: dict[str, str] = field(default_factory=dict)
    instance_ips: tuple[str, ...] = ()
    service_account: str = ""
    cluster_id: str = ""
    proxy_config: dict[str, Any] = field(default_factory=dict)
    istio_version: str = ""
    generator: str = ""  # Istiod's config generator for the node; "grpc" for proxyless gRPC

    @property
    def proxyless(self) -> bool:
        """A proxyless gRPC client (`GENERATOR: grpc`): gRPC's own xDS client, not Envoy."""
        return self.generator == "grpc"

    @property
    def workload_key(self) -> WorkloadKey:
        return WorkloadKey(self.namespace, self.workload)


def parse_node(node: Node) -> IstioNode:
    """Read an Istio node; the workload falls back to the pod name without its replica suffixes
    when WORKLOAD_NAME is absent, as for pods not created by a controller."""
    parts = node.id.split("~")
    if len(parts) != 4 or parts[0] not in PROXY_TYPES or not all(parts[1:]):
        raise NodeIdError(
            f"node id {node.id!r} is not TYPE~IP~POD.NAMESPACE~DOMAIN with TYPE sidecar or router"
        )
    proxy_type, ip, pod_dot_ns, domain = parts
    metadata = MessageToDict(node.metadata) if node.HasField("metadata") else {}
    pod, _, id_namespace = pod_dot_ns.partition(".")
    namespace = str(metadata.get("NAMESPACE") or id_namespace or domain.split(".", 1)[0])
    workload = str(metadata.get("WORKLOAD_NAME") or _workload_from_pod(pod))
    instance_ips = str(metadata.get("INSTANCE_IPS", ""))
    labels = metadata.get("LABELS") or {}
    return IstioNode(
        id=node.id,
        proxy_type=proxy_type,
        ip=ip,
        pod=pod,
        namespace=namespace,
        workload=workload,
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        instance_ips=tuple(filter(None, instance_ips.split(","))) or (ip,),
        service_account=str(metadata.get("SERVICE_ACCOUNT", "")),
        cluster_id=str(metadata.get("CLUSTER_ID", "")),
        proxy_config=metadata.get("PROXY_CONFIG") or {},
        istio_version=str(metadata.get("ISTIO_VERSION", "")),
        generator=str(metadata.get("GENERATOR", "")),
    )


def _workload_from_pod(pod: str) -> str:
    """`reviews-v1-5d8f9c7b6-x2x9z` -> `reviews-v1`: drop the ReplicaSet hash and pod suffix."""
    parts = pod.split("-")
    if len(parts) >= 3 and len(parts[-1]) == 5 and len(parts[-2]) in (9, 10):
        return "-".join(parts[:-2])
    return pod
