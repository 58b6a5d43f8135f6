"""Make before break: the order in which a scoped stream changes what Envoy holds. Pure.

Envoy applies each response as it comes. A route or listener that names a cluster Envoy does
not have, or has not warmed (an EDS cluster warms when its endpoints arrive), answers 503 "no
cluster"; a cluster removed while a route still names it does the same. Istiod avoids both by
its push order on one stream. A scoped stream changes clusters and routes itself (a learn, an
ageing, a retargeted VirtualService pulling a different cluster into the closure), so it keeps
the rules itself (docs/protocol.md, "Make before break"):

- additions first: a listener or route table that names a cluster Envoy has not warmed is held
  back until Envoy has ACKed a CDS response holding it and, for an EDS cluster, an EDS
  response holding its endpoints;
- removals last: a cluster that a listener or route table Envoy may still hold names (pushed,
  or the last ACKed) stays in CDS until Envoy has ACKed the listener or table that stops
  naming it.

A view declares what its selections name (`references`); only clusters the upstream sends
count, so a stream never waits for a cluster that will not come.
"""

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol

from cachetools import LRUCache
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf.any_pb2 import Any
from google.protobuf.message import DecodeError

from xdsproxy import caches
from xdsproxy.xds.view import Selection

References = Callable[[str, Selection], frozenset[str]]


@caches.memo("cluster_type")
def cluster_type(any_bytes: bytes) -> int:
    """The cluster's discovery type (`Cluster.EDS`, `Cluster.ORIGINAL_DST`, ...); -1 if the
    bytes are no cluster."""
    cluster = Cluster()
    try:
        Any.FromString(any_bytes).Unpack(cluster)
    except DecodeError:
        return -1
    return cluster.type


def is_eds_cluster(any_bytes: bytes) -> bool:
    """A cluster that warms only once its endpoints arrive over EDS."""
    return cluster_type(any_bytes) == Cluster.EDS


def is_original_dst(any_bytes: bytes) -> bool:
    """A cluster that connects to the connection's own destination: Istio's for a headless
    service, whose listeners are per pod IP. Only the caller's sidecar knows that address, so
    such a service cannot go through the egress."""
    return cluster_type(any_bytes) == Cluster.ORIGINAL_DST


# What a selection names, by the selection's identity: selections are shared by every stream
# in the same state (the views memoize them), and hashing one would cost a pass over it.
_NAMED: LRUCache[tuple, tuple[Selection, frozenset[str]]] = caches.lru("named_by_selection")


def names_in(references: References, type_url: str, selection: Selection) -> frozenset[str]:
    key = (getattr(references, "__func__", references), type_url, id(selection))
    found = _NAMED.get(key)
    if found is not None and found[0] is selection:
        return found[1]
    named = references(type_url, selection)
    _NAMED[key] = (selection, named)
    return named


class _Named(Protocol):
    def named(self, references: References, type_url: str) -> frozenset[str]: ...


def named_by_envoy(references: References, records: Iterable[tuple[str, _Named]]) -> frozenset[str]:
    """Clusters that what Envoy may hold names: for each referencing type, the newest pushed
    selection, the newest ACKed one (Envoy holds one of them, or is moving between), and what
    a NACKed response may have left applied (`xds.holds.Record`)."""
    named: set[str] = set()
    for type_url, record in records:
        named |= record.named(references, type_url)
    return frozenset(named)


@caches.by_identity("selection_by_name")
def by_name(selection: Selection) -> dict[str, bytes]:
    """A selection's resources by name (shared by every stream holding the selection)."""
    return dict(zip(*selection, strict=True))


def keep_named(
    selection: Selection, upstream: Selection, held: Iterable[str], named: frozenset[str]
) -> Selection:
    """`selection` plus the upstream's clusters that Envoy holds and something it holds still
    names: their removal waits for that listener or route to be ACKed without them. Each kept
    cluster goes where the upstream has it, so the same set selected again later is the same
    selection (nothing to push)."""
    chosen = set(selection.names)
    held_names = set(held)
    extra = {
        name: body
        for name, body in zip(*upstream, strict=True)
        if name in named and name in held_names and name not in chosen
    }
    if not extra:
        return selection
    position = {name: i for i, name in enumerate(upstream.names)}
    pending = sorted(extra, key=position.__getitem__)
    names: list[str] = []
    bodies: list[bytes] = []
    for name, body in zip(*selection, strict=True):
        at = position.get(name)
        while at is not None and pending and position[pending[0]] < at:
            kept = pending.pop(0)
            names.append(kept)
            bodies.append(extra[kept])
        names.append(name)
        bodies.append(body)
    names += pending
    bodies += [extra[n] for n in pending]
    return Selection(tuple(names), tuple(bodies))


def cold(
    names: frozenset[str],
    upstream_clusters: Mapping[str, bytes],
    pushed_clusters: Mapping[str, bytes | None],
    acked_clusters: Collection[str],
    acked_endpoints: Collection[str],
) -> frozenset[str]:
    """Of the clusters `names`, those Envoy was pushed or the upstream sends that Envoy has not
    warmed. Whether a cluster waits for endpoints is read from what Envoy was pushed (a
    placeholder in the place of Istio's EDS cluster does not), else from the upstream's."""
    wanted = [n for n in names if n in pushed_clusters or n in upstream_clusters]
    if not wanted:
        return frozenset()

    def needs_endpoints(name: str) -> bool:
        body = pushed_clusters.get(name) or upstream_clusters.get(name)
        return body is not None and is_eds_cluster(body)

    return frozenset(
        n
        for n in wanted
        if n not in acked_clusters or (n not in acked_endpoints and needs_endpoints(n))
    )
