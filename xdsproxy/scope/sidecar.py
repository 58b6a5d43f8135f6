"""The view a scoped sidecar gets of its upstream config.

Per type:
- CDS: every cluster that is not `outbound|...` (inbound, Passthrough, BlackHole, ...), the
  egress cluster, the outbound clusters (all subsets) of in-scope services, and the closure of
  clusters that kept listeners and kept route vhosts reference. TCP services are therefore in
  scope by default: their listeners reference their clusters.
- EDS: as Envoy asks; it only asks for clusters it holds.
- LDS: unchanged, so every HTTP port still reaches the catch-all (plus, when usage logging is
  on, a sampled access logger on outbound HTTP listeners: see `usage`).
- RDS: each table keeps its in-scope vhosts and ends with a catch-all to the egress.
Unchanged resources keep their exact upstream bytes; only route tables are re-encoded.

Selections are memoized by (scope state, upstream resources): the sidecars of one workload
share a scope, and identical upstream responses decode to the same shared tuples (see
`wire.codec`), so a push to many replicas computes each scoped CDS and RDS once.
"""

from collections.abc import Callable

from cachetools import LRUCache

from xdsproxy.istio.names import outbound_cluster
from xdsproxy.scope.egress import ALS_CLUSTER, EgressSettings, als_cluster
from xdsproxy.scope.failopen import FailOpen
from xdsproxy.scope.listeners import listener_refs
from xdsproxy.scope.routes import kept_vhosts, parse_table, sidecar_table
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.usage import FLUSH_SECONDS, with_usage_logger
from xdsproxy.wire import typeurls
from xdsproxy.xds.view import Selection, UpstreamView

_CDS_INPUTS = frozenset({typeurls.LISTENER, typeurls.ROUTE})
_EMPTY: Selection = ((), ())
# The newest selection per (scope, type): replicas ask for the same one within a push, and an
# older generation is replaced rather than kept (under churn every push is a new generation).
_SELECTIONS: LRUCache[tuple[int, str], tuple[tuple, Selection]] = LRUCache(maxsize=8192)


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
    ) -> None:
        self.scope = scope
        self.fail_open = fail_open
        self.egress_cluster = egress_cluster
        # Sampled usage logging (see `usage`): on when there is somewhere to log to.
        self.usage = usage if usage_sample_percent > 0 else None
        self.usage_sample_percent = usage_sample_percent
        self.usage_flush_seconds = usage_flush_seconds

    def depends_on(self, type_url: str) -> frozenset[str]:
        return _CDS_INPUTS if type_url == typeurls.CLUSTER else frozenset()

    def select(self, type_url: str, upstream: UpstreamView) -> Selection:
        current = upstream.get(type_url, _EMPTY)
        if self.fail_open is not None and self.fail_open.active:
            return current  # Istio's full config, as without xdsproxy (see `failopen`)
        if type_url == typeurls.CLUSTER:
            inputs = (current, *(upstream.get(t, _EMPTY) for t in sorted(_CDS_INPUTS)))
            return self._memo(type_url, inputs, lambda: self._clusters(current, upstream))
        if type_url == typeurls.ROUTE:
            return self._memo(type_url, (current,), lambda: self._routes(current))
        if type_url == typeurls.LISTENER and self.usage is not None:
            names, bodies = current
            sample, flush = self.usage_sample_percent, self.usage_flush_seconds
            return names, tuple(with_usage_logger(body, sample, flush) for body in bodies)
        return current

    def _memo(
        self, type_url: str, inputs: tuple[Selection, ...], compute: Callable[[], Selection]
    ) -> Selection:
        """A selection is a function of the scope's state, this view's settings and the
        upstream resources it reads: key on exactly those."""
        settings = (self.egress_cluster, self.usage, self.usage_sample_percent)
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
                kept_vhosts(parse_table(body), self.scope.covers),
                self.egress_cluster,
                key.namespace,
                key.workload,
            )
            for body in bodies
        )
        return names, rewritten

    def references(self, type_url: str, selection: Selection) -> frozenset[str]:
        if type_url == typeurls.LISTENER:
            return frozenset().union(*(listener_refs(body).clusters for body in selection[1]))
        if type_url == typeurls.ROUTE:
            return frozenset().union(*(parse_table(body).referenced for body in selection[1]))
        return frozenset()

    def referenced_clusters(self, upstream: UpstreamView) -> set[str]:
        """Clusters the pushed listeners and route tables can send to."""
        referenced: set[str] = set()
        for body in upstream.get(typeurls.LISTENER, ((), ()))[1]:
            referenced |= listener_refs(body).clusters
        for body in upstream.get(typeurls.ROUTE, ((), ()))[1]:
            parsed = parse_table(body)
            for index in kept_vhosts(parsed, self.scope.covers):
                referenced |= parsed.clusters[index]
        return referenced

    def _clusters(self, current: Selection, upstream: UpstreamView) -> Selection:
        names, bodies = current
        referenced = self.referenced_clusters(upstream)
        referenced.add(self.egress_cluster)
        covers = self.scope.covers
        keep = []
        for index, name in enumerate(names):
            parsed = outbound_cluster(name)
            if parsed is None or name in referenced or covers(parsed[0]):
                keep.append(index)
        if self.usage is not None:
            kept_names = [names[i] for i in keep] + [ALS_CLUSTER]
            kept_bodies = [bodies[i] for i in keep] + [als_cluster(self.usage)]
            return tuple(kept_names), tuple(kept_bodies)
        if len(keep) == len(names):
            return current
        return tuple(names[i] for i in keep), tuple(bodies[i] for i in keep)
