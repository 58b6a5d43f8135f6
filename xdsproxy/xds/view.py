"""The hook through which a policy decides what a stream forwards, and what it serves itself."""

from collections.abc import Mapping
from typing import NamedTuple, Protocol


class Selection(NamedTuple):
    """Resources of one type, in order: their names and their serialized `Any`s. Equal to the
    plain pair; shared between streams, so compared by identity where that is enough."""

    names: tuple[str, ...]
    bodies: tuple[bytes, ...]


NOTHING = Selection((), ())

# type URL -> the latest the upstream sent of that type on this stream.
UpstreamView = Mapping[str, Selection]


class ResourceView(Protocol):
    #: True only when `select` returns the upstream's own resources for every type, which lets
    #: a stream relay upstream messages byte for byte without computing a selection.
    transparent: bool

    def select(self, type_url: str, upstream: UpstreamView) -> Selection:
        """The resources of `type_url` to push, given everything the upstream sent so far.

        Returning `upstream[type_url]` itself means "forward unchanged".
        """
        ...

    def depends_on(self, type_url: str) -> frozenset[str]:
        """Every input the selection of `type_url` reads besides its own upstream content: other
        types (their type URLs) and inputs of the view's own, by name (`scope/inputs.py`).
        A stream recomputes a type when one of them changes (docs/protocol.md R27)."""
        ...

    #: Types xdsproxy serves itself (the caller routes, SRDS, on the lazy egress): requests
    #: for them are answered locally and never reach the upstream.
    local_types: frozenset[str]

    def references(self, type_url: str, selection: Selection) -> frozenset[str]:
        """The clusters a selection of `type_url` names (listeners, route tables), for the
        make-before-break order (`xds.ordering`); empty for types that name none."""
        ...


class Unscoped:
    """Forward every type unchanged: what passthrough mode, gateways and nodes that are not
    Istio's get."""

    transparent = True

    def select(self, type_url: str, upstream: UpstreamView) -> Selection:
        return upstream.get(type_url, NOTHING)

    local_types: frozenset[str] = frozenset()

    def depends_on(self, type_url: str) -> frozenset[str]:
        return frozenset()

    def references(self, type_url: str, selection: Selection) -> frozenset[str]:
        return frozenset()  # relays Istiod as it is: Istiod's own order holds


UNSCOPED = Unscoped()
