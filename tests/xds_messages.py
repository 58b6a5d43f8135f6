"""Builders for xDS messages used by the protocol tests."""

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from google.protobuf.any_pb2 import Any

from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import encode_delta_resource, encode_delta_response, encode_sotw_response
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import Event, UpstreamApplied
from xdsproxy.xds.sotw import SotwStream
from xdsproxy.xds.view import NOTHING, Selection

NODE_ID = "sidecar~10.0.0.1~app-7d9f8c6b5d-abcde.ns-0~ns-0.svc.cluster.local"


def node(node_id: str = NODE_ID) -> Node:
    result = Node(id=node_id)
    result.metadata.update({"NAMESPACE": "ns-0", "WORKLOAD_NAME": "app"})
    return result


def cluster_any(name: str) -> bytes:
    packed = Any()
    packed.Pack(Cluster(name=name, type=Cluster.EDS))
    return packed.SerializeToString()


def sotw_request(
    type_url: str = typeurls.CLUSTER,
    names: tuple[str, ...] = (),
    version: str = "",
    nonce: str = "",
    error: str = "",
    with_node: bool = False,
) -> bytes:
    request = DiscoveryRequest(
        type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
    )
    if error:
        request.error_detail.code = 3
        request.error_detail.message = error
    if with_node:
        request.node.CopyFrom(node())
    return request.SerializeToString()


def sotw_response(
    names: list[str], version: str, nonce: str, type_url: str = typeurls.CLUSTER
) -> bytes:
    return encode_sotw_response(version, type_url, nonce, [cluster_any(n) for n in names])


def delta_request(
    type_url: str = typeurls.CLUSTER,
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    nonce: str = "",
    error: str = "",
    initial: dict[str, str] | None = None,
    with_node: bool = False,
) -> bytes:
    request = DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error:
        request.error_detail.code = 3
        request.error_detail.message = error
    if with_node:
        request.node.CopyFrom(node())
    return request.SerializeToString()


def delta_response(
    names: list[str],
    nonce: str,
    removed: tuple[str, ...] = (),
    type_url: str = typeurls.CLUSTER,
    version: str = "",
) -> bytes:
    bodies = [encode_delta_resource(n, cluster_any(n), version) for n in names]
    return encode_delta_response("sys-1", type_url, nonce, bodies, removed)


class KeepPrefix:
    """A narrowing view for tests: forwards only resources whose name starts with a prefix.

    `prefixes` may be widened at run time (as a learn widens a scope). Optionally CDS depends
    on LDS: a listener named `needs:<cluster>` pulls that cluster in. `local` types are served
    from `local_resources`.
    """

    transparent = False

    def __init__(
        self,
        *prefixes: str,
        cds_follows_lds: bool = False,
        local: dict[str, list[tuple[str, bytes]]] | None = None,
        narrows: frozenset[str] | None = None,
    ) -> None:
        self.prefixes = list(prefixes)
        self.narrows = narrows  # the types it filters (None: every type)
        self.cds_follows_lds = cds_follows_lds
        self.local_resources = local or {}
        self.local_types = frozenset(self.local_resources)

    def depends_on(self, type_url):
        if self.cds_follows_lds and type_url == typeurls.CLUSTER:
            return frozenset({typeurls.LISTENER})
        return frozenset()

    def references(self, type_url, selection):
        """A listener `needs:<cluster>` names that cluster; `route:<cluster>` tables too."""
        if type_url not in (typeurls.LISTENER, typeurls.ROUTE):
            return frozenset()
        return frozenset(n.split(":", 1)[1] for n in selection[0] if ":" in n)

    def select(self, type_url, upstream):
        if type_url in self.local_types:
            entries = self.local_resources[type_url]
            return Selection(tuple(n for n, _ in entries), tuple(b for _, b in entries))
        names, bodies = current = upstream.get(type_url, NOTHING)
        if self.narrows is not None and type_url not in self.narrows:
            return current
        wanted = set()
        if type_url == typeurls.CLUSTER and self.cds_follows_lds:
            listeners = upstream.get(typeurls.LISTENER, NOTHING).names
            wanted = {n.split(":", 1)[1] for n in listeners if n.startswith("needs:")}
        kept = [
            (n, b)
            for n, b in zip(names, bodies, strict=True)
            if n in wanted or any(n.startswith(p) for p in self.prefixes)
        ]
        if len(kept) == len(names):
            return current
        return Selection(tuple(n for n, _ in kept), tuple(b for _, b in kept))


def receive_upstream(stream: SotwStream | DeltaStream, data: bytes) -> list[Event]:
    """The stream's events for an upstream response, less the `UpstreamApplied` that always
    ends them (checked here: it carries what the stream now holds from the upstream)."""
    *events, applied = stream.receive_upstream(data)
    assert isinstance(applied, UpstreamApplied), applied
    assert applied.upstream == stream.upstream(applied.type_url)
    assert applied.size == len(data)
    return events
