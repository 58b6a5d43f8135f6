"""Unfiltered route tables per (namespace, port), as sidecars of that namespace received them.

The lazy egress picks the caller's own table from here, so the first request gets the caller's
VirtualService routing. Tables are the exact upstream bytes, shared with the sidecar streams.
"""

from xdsproxy.istio.names import is_port, route_table_port
from xdsproxy.xds.view import Selection


class MeshTables:
    def __init__(self) -> None:
        self._tables: dict[str, dict[int, bytes]] = {}
        self.version = 0

    def record(self, namespace: str, routes: Selection) -> bool:
        """Keep the per-port tables of one sidecar's RDS; True when something changed."""
        tables = self._tables.setdefault(namespace, {})
        changed = False
        for name, body in zip(*routes, strict=True):
            if not is_port(name):
                continue
            port = route_table_port(name)
            assert port is not None
            if tables.get(port) != body:
                tables[port] = body
                changed = True
        if changed:
            self.version += 1
        return changed

    def table(self, namespace: str, port: int) -> bytes | None:
        return self._tables.get(namespace, {}).get(port)

    def namespaces(self) -> frozenset[str]:
        return frozenset(self._tables)
