"""`memory://`: edges live as long as the process. For tests and throwaway runs."""

from collections.abc import Iterable

from xdsproxy.istio.names import ServicePort
from xdsproxy.model import Edge, WorkloadKey
from xdsproxy.store.base import ChangeCallback, Edges, ForgetCallback, StaticCallback, Touch


class MemoryStore:
    def __init__(self) -> None:
        self._edges: dict[WorkloadKey, Edges] = {}

    async def start(
        self,
        on_change: ChangeCallback | None = None,
        on_static: StaticCallback | None = None,
        on_forget: ForgetCallback | None = None,
    ) -> None:
        pass

    async def load(self) -> dict[WorkloadKey, Edges]:
        return {
            w: {
                s: Edge(e.first_seen, e.last_seen, learned_by=e.learned_by)
                for s, e in edges.items()
            }
            for w, edges in self._edges.items()
        }

    async def add(
        self, workload: WorkloadKey, service: ServicePort, seen: float, by: str = ""
    ) -> None:
        edges = self._edges.setdefault(workload, {})
        if service not in edges:
            edges[service] = Edge(seen, seen, learned_by=by)

    async def touch(self, updates: Iterable[Touch]) -> None:
        for update in updates:
            edge = self._edges.get(update.workload, {}).get(update.service)
            if edge is not None:
                edge.last_seen = max(edge.last_seen, update.last_seen)

    async def forget(
        self, workload: WorkloadKey, services: Iterable[ServicePort], at: float | None = None
    ) -> None:
        edges = self._edges.get(workload, {})
        for service in services:
            edges.pop(service, None)

    async def close(self) -> None:
        pass
