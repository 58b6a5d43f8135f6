"""The view a scoped sidecar gets of its upstream config.

Per type:
- CDS: every cluster that is not `outbound|...` (inbound, Passthrough, BlackHole, ...), the
  egress cluster, the outbound clusters (all subsets) of in-scope services, and the closure of
  clusters that kept route vhosts and listeners' inline routes reference. An out-of-scope
  cluster that only listeners' TCP proxies name (a TCP port, a sniffed port's default chain)
  becomes a same-name placeholder into the tunnel to the egress (see `tunnel`); on a sidecar
  without the tunnel (Istio before 1.18), and for a headless service (an ORIGINAL_DST cluster:
  only the caller knows the pod address), it stays as Istio sent it.
- EDS: as Envoy asks; it only asks for clusters it holds (placeholders are STATIC).
- LDS: Istio's listeners unchanged, so every port still reaches the catch-all or the tunnel,
  plus the tunnel's internal listener (and, when usage logging is on, a sampled access logger
  on outbound HTTP listeners: see `usage`). In compact mode (see `compact`), the `VIP_PORT`
  listeners of out-of-scope services are left out, with their clusters, and `virtualOutbound`
  and the `0.0.0.0_PORT` HTTP listeners tunnel the mesh's service ranges to the egress.
- RDS: each table keeps its in-scope vhosts and ends with a catch-all to the egress.
Unchanged resources keep their exact upstream bytes; only route tables are re-encoded.

Selections are memoized by (scope state, upstream resources): the sidecars of one workload
share a scope, and identical upstream responses decode to the same shared tuples (see
`wire.codec`), so a push to many replicas computes each scoped CDS and RDS once.
"""

from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from xdsproxy import caches
from xdsproxy.istio.names import ServicePort, outbound_cluster
from xdsproxy.scope import inputs
from xdsproxy.scope.compact import (
    CompactMode,
    service_listener,
    takes_mesh_chains,
    with_mesh_chains,
)
from xdsproxy.scope.egress import ALS_CLUSTER, EgressSettings, als_cluster
from xdsproxy.scope.failopen import FailOpen
from xdsproxy.scope.listeners import listener_refs
from xdsproxy.scope.routes import (
    kept_table_clusters,
    kept_vhosts,
    parse_table,
    sidecar_table,
)
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.tunnel import TUNNEL_LISTENER, placeholder_cluster, tunnel_listener
from xdsproxy.scope.usage import FLUSH_SECONDS, with_usage_logger
from xdsproxy.wire import typeurls
from xdsproxy.xds.ordering import is_original_dst
from xdsproxy.xds.view import NOTHING, Selection, UpstreamView

_CDS_UPSTREAM = frozenset({typeurls.LISTENER, typeurls.ROUTE})
# In compact mode a listener is left out only if it is a service VIP's (an EDS cluster).
_COMPACT_LDS_UPSTREAM = frozenset({typeurls.CLUSTER})
# Every input each type's selection reads (see `inputs`); EDS and the rest read none.
_INPUTS = {
    typeurls.CLUSTER: _CDS_UPSTREAM | {inputs.SCOPE, inputs.FAIL_OPEN, inputs.TUNNEL},
    typeurls.ROUTE: frozenset({inputs.SCOPE, inputs.FAIL_OPEN}),
    typeurls.LISTENER: frozenset({inputs.FAIL_OPEN, inputs.TUNNEL}),
}
_COMPACT_LDS_INPUTS = _INPUTS[typeurls.LISTENER] | _COMPACT_LDS_UPSTREAM | {inputs.SCOPE}
# The newest selection per (scope, type): replicas ask for the same one within a push, and an
# older generation is replaced rather than kept (under churn every push is a new generation).
_SELECTIONS: LRUCache[tuple[int, str], tuple[tuple, Selection]] = caches.lru("sidecar_selection")


class SidecarView:
    transparent = False
    local_types: frozenset[str] = frozenset()

    def __init__(
        self,
        scope: Scope,
        egress_cluster: str,
        usage: EgressSettings | None = None,
        usage_sample_percent: float = 0.0,
        usage_flush_seconds: int = FLUSH_SECONDS,
        fail_open: FailOpen | None = None,
        tunnel: bool = False,
        compact: CompactMode | None = None,
    ) -> None:
        self.scope = scope
        # Compact mode: out-of-scope services' listeners are left out, per listener kind (None:
        # all kept, as Istio sent them).
        self.compact = compact
        # Out-of-scope TCP goes through the egress tunnel; off for a sidecar whose bootstrap
        # lacks the internal-listener extension (then its TCP services stay in scope).
        self.tunnel = tunnel
        self.fail_open = fail_open
        self.egress_cluster = egress_cluster
        # Sampled usage logging (see `usage`): on when there is somewhere to log to.
        self.usage = usage if usage_sample_percent > 0 else None
        self.usage_sample_percent = usage_sample_percent
        self.usage_flush_seconds = usage_flush_seconds

    def depends_on(self, type_url: str) -> frozenset[str]:
        if type_url == typeurls.LISTENER and self.compact is not None:
            return _COMPACT_LDS_INPUTS
        return _INPUTS.get(type_url, frozenset())

    def select(self, type_url: str, upstream: UpstreamView) -> Selection:
        current = upstream.get(type_url, NOTHING)
        if self.fail_open is not None and self.fail_open.active:
            return current  # Istio's full config, as without xdsproxy (see `failopen`)
        if self.compact is not None and not self.compact.ranges.networks:
            clusters = dict(zip(*upstream.get(typeurls.CLUSTER, NOTHING), strict=True))
            self.compact.ranges.settle(
                refs.address
                for refs in map(listener_refs, upstream.get(typeurls.LISTENER, NOTHING)[1])
                if service_listener(refs, clusters)
            )
        if type_url == typeurls.CLUSTER:
            read = (current, *(upstream.get(t, NOTHING) for t in sorted(_CDS_UPSTREAM)))
            return self._memo(type_url, read, lambda: self._clusters(current, upstream))
        if type_url == typeurls.ROUTE:
            return self._memo(type_url, (current,), lambda: self._routes(current))
        if type_url == typeurls.LISTENER:
            read = (current, upstream.get(typeurls.CLUSTER, NOTHING) if self.compact else NOTHING)
            return self._memo(type_url, read, lambda: self._listeners(current, upstream))
        return current

    def _listeners(self, current: Selection, upstream: UpstreamView) -> Selection:
        names, bodies = current
        if self._networks():
            names, bodies = self._compact(names, bodies, self._left_out(upstream))
        if self.usage is not None:
            sample, flush = self.usage_sample_percent, self.usage_flush_seconds
            bodies = tuple(with_usage_logger(body, sample, flush) for body in bodies)
        if self.tunnel:
            key = self.scope.key
            names = (*names, TUNNEL_LISTENER)
            bodies = (*bodies, tunnel_listener(self.egress_cluster, key.namespace, key.workload))
        return Selection(names, bodies)

    def _compact(self, names: tuple, bodies: tuple, left_out: frozenset[bytes]) -> Selection:
        key = self.scope.key
        chains = (self.egress_cluster, key.namespace, key.workload, self._networks())
        kept_names: list[str] = []
        kept_bodies: list[bytes] = []
        for name, body in zip(names, bodies, strict=True):
            if body in left_out:
                continue
            refs = listener_refs(body)
            kept_names.append(name)
            if takes_mesh_chains(name, refs.address):
                body = with_mesh_chains(body, *chains)
            kept_bodies.append(body)
        return Selection(tuple(kept_names), tuple(kept_bodies))

    def _networks(self) -> tuple:
        return self.compact.ranges.networks if self.compact is not None else ()

    def _left_out(self, upstream: UpstreamView) -> frozenset[bytes]:
        """Compact mode: the listeners of out-of-scope services' VIPs in the mesh ranges."""
        if not self._networks():
            return frozenset()
        clusters = dict(zip(*upstream.get(typeurls.CLUSTER, NOTHING), strict=True))
        left_out = set()
        for body in upstream.get(typeurls.LISTENER, NOTHING)[1]:
            refs = listener_refs(body)
            service = service_listener(refs, clusters)
            if service and self.compact.leaves_out(refs) and not self.scope.covers(service):
                left_out.add(body)
        return frozenset(left_out)

    def _memo(
        self, type_url: str, inputs: tuple[Selection, ...], compute: Callable[[], Selection]
    ) -> Selection:
        """A selection is a function of the scope's state, this view's settings and the
        upstream resources it reads: key on exactly those."""
        settings = (
            self.egress_cluster,
            self.usage,
            self.usage_sample_percent,
            self.tunnel,
            self.compact,
            self._networks(),
        )
        key = (self.scope.version, settings, inputs)
        slot = (self.scope.uid, type_url)
        found = _SELECTIONS.get(slot)
        if found is not None and found[0] == key:
            return found[1]
        selection = compute()
        _SELECTIONS[slot] = (key, selection)
        return selection

    def _routes(self, current: Selection) -> Selection:
        names, bodies = current
        key = self.scope.key
        rewritten = tuple(
            sidecar_table(
                body,
                kept_vhosts(parse_table(body), self.scope),
                self.egress_cluster,
                key.namespace,
                key.workload,
            )
            for body in bodies
        )
        return Selection(names, rewritten)

    def references(self, type_url: str, selection: Selection) -> frozenset[str]:
        if type_url == typeurls.LISTENER:
            return frozenset().union(*(listener_refs(body).clusters for body in selection.bodies))
        if type_url == typeurls.ROUTE:
            return frozenset().union(*(parse_table(body).referenced for body in selection.bodies))
        return frozenset()

    def _clusters(self, current: Selection, upstream: UpstreamView) -> Selection:
        """Clusters of in-scope services, and those what the sidecar keeps names (its kept
        listeners and vhosts); a TCP service's out of scope becomes a placeholder. Found from
        indexes of the upstream's clusters and tables, so a learn costs O(scope), not O(mesh)."""
        names, bodies = current
        index = cluster_index(current)
        direct = {self.egress_cluster}
        tcp: set[str] = set()
        left_out = self._left_out(upstream)
        for body in upstream.get(typeurls.LISTENER, NOTHING)[1]:
            if body in left_out:
                continue  # compact mode: its service has neither listener nor cluster
            refs = listener_refs(body)
            direct |= refs.clusters - refs.tcp_clusters
            tcp |= refs.tcp_clusters
        direct |= kept_table_clusters(upstream.get(typeurls.ROUTE, NOTHING)[1], self.scope)
        position = index.position
        keep = set(index.plain)
        keep.update(position[name] for name in direct if name in position)
        for service in self.scope.learned:
            keep.update(index.by_service.get(service, ()))
        if self.scope.static:
            for service, indexes in index.by_service.items():
                if self.scope.covers(service):  # static matches memoized by the scope
                    keep.update(indexes)
        placeholders = {position[name] for name in tcp if name in position} - keep
        kept = sorted(keep | placeholders)
        if not placeholders and self.usage is None and len(kept) == len(names):
            return current
        kept_names: list[str] = []
        kept_bodies: list[bytes] = []
        for i in kept:
            name, body = names[i], bodies[i]
            if i in placeholders and self.tunnel and not is_original_dst(body):
                parsed = outbound_cluster(name)
                assert parsed is not None  # a TCP listener's cluster is a service's
                body = placeholder_cluster(name, parsed.service)
            kept_names.append(name)
            kept_bodies.append(body)
        if self.usage is not None:
            kept_names.append(ALS_CLUSTER)
            kept_bodies.append(als_cluster(self.usage))
        return Selection(tuple(kept_names), tuple(kept_bodies))


@dataclass(frozen=True, slots=True)
class ClusterIndex:
    """A CDS response's clusters by position: those of no service (kept by every scope), each
    service's, and every name's."""

    plain: tuple[int, ...]
    by_service: dict[ServicePort, tuple[int, ...]]
    position: dict[str, int]


@caches.by_identity("cluster_index")
def cluster_index(clusters: Selection) -> ClusterIndex:
    """Shared by every stream holding the same response's selection."""
    names = clusters[0]
    plain: list[int] = []
    by_service: dict[ServicePort, list[int]] = {}
    for i, name in enumerate(names):
        parsed = outbound_cluster(name)
        if parsed is None:
            plain.append(i)
        else:
            by_service.setdefault(parsed.service, []).append(i)
    return ClusterIndex(
        tuple(plain),
        {s: tuple(i) for s, i in by_service.items()},
        {name: i for i, name in enumerate(names)},
    )
