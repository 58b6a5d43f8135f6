"""Every process-wide cache, in one place, with its bound and why it pays.

Each is keyed by content (bytes Istiod sent, names, settings) or by the identity of a shared,
immutable value, so an entry is never wrong, only evicted. The modules take their caches from
here by name (`memo`, `lru`); `clear()` empties them all, for tests and benchmarks that measure
from a cold start. Caches held by one object (a runtime's, a scope's) are not listed: they go
with it.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cachetools import LRUCache


@dataclass(frozen=True)
class Bound:
    size: int
    unit: str  # "entries", or "bytes" (weighed by the cache's getsizeof)
    why: str


CACHES: dict[str, Bound] = {
    "outbound_cluster": Bound(262_144, "entries", "cluster names parsed on every push"),
    "listener_refs": Bound(16_384, "entries", "the clusters each Istio listener names"),
    "route_decode": Bound(256, "entries", "route tables decoded for rewriting"),
    "route_table": Bound(4096, "entries", "route tables parsed into vhosts and clusters"),
    "static_kept_vhosts": Bound(4096, "entries", "vhosts a table keeps for static rules"),
    "tables_index": Bound(256, "entries", "a sidecar's route tables indexed by service"),
    "cluster_index": Bound(256, "entries", "a CDS response's clusters indexed by service"),
    "route_shell": Bound(256, "entries", "route tables without their vhosts, to copy from"),
    "sidecar_table": Bound(65_536, "entries", "a route table narrowed to one scope"),
    "egress_table": Bound(1024, "entries", "the egress's caller route tables"),
    "caller_route_clusters": Bound(16_384, "entries", "the clusters each caller route names"),
    "caller_route": Bound(16_384, "entries", "the egress's caller routes (SRDS entries)"),
    "egress_caller_routes": Bound(16, "entries", "all caller routes, per input state"),
    "egress_als_cluster": Bound(64, "entries", "the ALS cluster, per egress settings"),
    "egress_original_dst": Bound(1, "entries", "the egress's ORIGINAL_DST cluster"),
    "egress_listener": Bound(64, "entries", "the egress listener, per egress settings"),
    "usage_logger": Bound(16_384, "entries", "listeners with the usage access logger added"),
    "mesh_chains": Bound(4096, "entries", "virtualOutbound with compact mode's tunnel chains"),
    "tunnel_listener": Bound(4096, "entries", "the internal tunnel listener per workload"),
    "placeholder_cluster": Bound(65_536, "entries", "placeholder clusters, per service"),
    "ready_endpoints": Bound(256, "entries", "the egress's ready endpoint count per EDS body"),
    "cluster_type": Bound(16_384, "entries", "a cluster's discovery type, per body"),
    "named_by_selection": Bound(4096, "entries", "what a shared selection names"),
    "sidecar_selection": Bound(8192, "entries", "the newest selection per scope and type"),
    "selection_by_name": Bound(64, "entries", "the upstream's clusters by name, per response"),
    "sotw_merged": Bound(4096, "entries", "SotW EDS and RDS state merged across responses"),
    "delta_selection": Bound(4096, "entries", "a shared held map as a selection"),
    "shared_transitions": Bound(2048, "entries", "updates of shared maps, held weakly"),
    "request_names": Bound(16 * 1024 * 1024, "bytes", "SotW request names, one copy each"),
    "decoded_responses": Bound(32 * 1024 * 1024, "bytes", "responses decoded, by content"),
}

_CLEARS: dict[str, Callable[[], None]] = {}


def memo(name: str) -> Callable[[Callable], Callable]:
    """`functools.lru_cache` with the bound listed under `name`."""

    def wrap(function: Callable) -> Callable:
        cached = lru_cache(maxsize=CACHES[name].size)(function)
        _CLEARS[name] = cached.cache_clear
        return cached

    return wrap


def lru(name: str, getsizeof: Callable[[Any], int] | None = None) -> LRUCache:
    """A `cachetools.LRUCache` with the bound listed under `name` (weighed by `getsizeof`
    where the bound is in bytes)."""
    bound = CACHES[name]
    if (bound.unit == "bytes") != (getsizeof is not None):
        raise ValueError(f"cache {name!r} is bounded in {bound.unit}")
    cache: LRUCache = LRUCache(maxsize=bound.size, getsizeof=getsizeof)
    _CLEARS[name] = cache.clear
    return cache


def by_identity(name: str) -> Callable[[Callable], Callable]:
    """Memoize a function of shared values that never change (selections, responses' tuples,
    parsed tables) by their identities, with the bound listed under `name`: hashing them would
    cost a pass over them. The entry keeps its arguments, so an id reused by a new object is
    never taken for the old one's."""

    def wrap(function: Callable) -> Callable:
        cache = lru(name)

        @functools.wraps(function)
        def memoized(*args: Any) -> Any:
            key = tuple(map(id, args))
            found = cache.get(key)
            if found is not None and all(a is b for a, b in zip(found[0], args, strict=True)):
                return found[1]
            result = function(*args)
            cache[key] = (args, result)
            return result

        return memoized

    return wrap


def registered() -> frozenset[str]:
    return frozenset(_CLEARS)


def clear() -> None:
    """Empty every cache (a cold start, for tests and benchmarks)."""
    for clear_one in _CLEARS.values():
        clear_one()
