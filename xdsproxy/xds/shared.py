"""Per-stream maps that streams in the same state share.

A Delta stream tracks, per type, what Istiod sent and what Envoy holds: maps of thousands of
names, and nearly the same for every sidecar of a mesh. So a stream's maps are immutable, and
an update is computed once for all the streams that apply the same update to the same map;
each stream keeps a reference. Updates are named by content (`DeltaResponse.resources_id` is
the same for identical resource bytes), so memory grows with the distinct states streams are
in, not with their number. A stream that diverges (a subscription of its own, a response that
was not cached) gets maps of its own, and nothing else changes.
"""

import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from typing import NoReturn, TypeVar

from cachetools import LRUCache

from xdsproxy import caches
from xdsproxy.xds.view import Selection

V = TypeVar("V")
Shared = TypeVar("Shared", bound="FrozenMap | frozenset")


class FrozenMap(dict[str, V]):
    """A dict that cannot change once built, so that streams can share it."""

    __slots__ = ("__weakref__",)

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a FrozenMap is shared between streams: build a new one")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]


class UpstreamMap(FrozenMap[tuple[bytes, bytes]]):
    """Name -> (serialized Delta `Resource`, the serialized `Any` inside it)."""

    __slots__ = ("_selection",)

    def selection(self) -> Selection:
        """Names and Anys, as a view takes them."""
        try:
            return self._selection
        except AttributeError:
            self._selection = Selection(tuple(self), tuple([any_ for _, any_ in self.values()]))
            return self._selection


# Where every stream starts, so that streams in step share from their first update.
EMPTY_SET: frozenset[str] = frozenset()
EMPTY_MAP: FrozenMap = FrozenMap()
EMPTY_UPSTREAM = UpstreamMap()


class Transitions:
    """Memoized updates of shared maps and sets, held weakly: a state lives only as long as a
    stream is in it."""

    def __init__(self, memo: LRUCache | None = None) -> None:
        self._memo: LRUCache[tuple, tuple[weakref.ref, weakref.ref]] = (
            LRUCache(2048) if memo is None else memo
        )
        self.computed = 0

    def apply(self, base: object, change: Hashable | None, compute: Callable[[], Shared]) -> Shared:
        """`compute()`, or the result another caller got for the same `change` to `base`.
        `change` must determine the result given `base`, and identify it by content only;
        None when it cannot be named (the result is then the caller's own)."""
        if change is None:
            return compute()
        key = (id(base), change)
        found = self._memo.get(key)
        if found is not None and found[0]() is base:
            result = found[1]()
            if result is not None:
                return result
        result = compute()
        self.computed += 1
        self._memo[key] = (weakref.ref(base), weakref.ref(result))
        return result


SHARED = Transitions(caches.lru("shared_transitions"))

M = TypeVar("M", FrozenMap, UpstreamMap)


def _updated(base: M, names: Iterable[str], values: Iterable, removed: Iterable[str]) -> M:
    result = dict(base)
    result.update(zip(names, values, strict=True))
    for name in removed:
        result.pop(name, None)
    return type(base)(result)


# The updates a Delta stream makes, each shared by every stream that makes it to the same map.


def updated(
    base: M,
    names: Sequence[str],
    values: Iterable,
    removed: Sequence[str],
    content: Hashable | None = None,
) -> M:
    """`base` with `names` set to `values` and `removed` gone. `content` names the names and
    values by content (a response's `resources_id`), so streams applying the same response
    share the result; None computes a map of the caller's own. `values` is read only when the
    result is computed, not when it is shared."""
    change = ("update", content, tuple(removed)) if content is not None else None
    return SHARED.apply(base, change, lambda: _updated(base, names, values, removed))


def without(base: M, names: tuple[str, ...]) -> M:
    """`base` without `names` (Envoy unsubscribed them)."""
    if not any(name in base for name in names):
        return base
    return SHARED.apply(base, ("drop", names), lambda: _updated(base, (), (), names))


def subscribed(base: frozenset[str], added: tuple[str, ...], dropped: tuple[str, ...]) -> frozenset:
    """A subscription with `added` in and `dropped` out."""
    if not (added or dropped):
        return base
    return SHARED.apply(
        base, ("subscribe", added, dropped), lambda: base.union(added).difference(dropped)
    )


def held_unknown(names: frozenset[str]) -> FrozenMap:
    """What a reconnecting Envoy says it holds: the names, their content unknown here."""
    return SHARED.apply(EMPTY_MAP, ("initial", names), lambda: FrozenMap(dict.fromkeys(names)))


# A SotW request's resource names, by their encoding: every sidecar asks EDS for the same
# thousands of clusters, and keeping one tuple of them (and one copy of the bytes the ACK
# fast path compares) saves each stream its own. Bounded by the bytes kept; an evicted list
# stays with the streams holding it.
_NAMES: LRUCache[bytes, tuple[bytes, tuple[str, ...]]] = caches.lru(
    "request_names", getsizeof=lambda entry: 2 * len(entry[0]) + 1
)


def shared_names(
    encoded: bytes, decode: Callable[[], tuple[str, ...]]
) -> tuple[bytes, tuple[str, ...]]:
    """The canonical copy of `encoded` and the names it holds."""
    found = _NAMES.get(encoded)
    if found is None:
        found = _NAMES[encoded] = (encoded, decode())
    return found


def merged(held: Selection, update: Selection, subscribed: Collection[str]) -> Selection:
    """What Envoy holds of a SotW type that is no wildcard once it applies `update` (Istiod's
    responses of EDS and RDS carry only what they change): `held` and `update`, the update's
    resources replacing those of the same name, all restricted to the names `subscribed`
    (Envoy drops what it stops watching). Streams in step share the result: the update's
    tuples are shared by every stream given the same response (`wire.codec`)."""
    return _merged(held, update.names, update.bodies, subscribed)


@caches.by_identity("sotw_merged")
def _merged(
    held: Selection, names: tuple[str, ...], bodies: tuple[bytes, ...], subscribed: Collection[str]
) -> Selection:
    wanted = subscribed if isinstance(subscribed, frozenset | set) else frozenset(subscribed)
    state = {n: b for n, b in zip(*held, strict=True) if n in wanted}
    state.update((n, b) for n, b in zip(names, bodies, strict=True) if n in wanted)
    result = Selection(tuple(state), tuple(state.values()))
    return held if result == held else result
