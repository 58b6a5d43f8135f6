"""The Istio node of every open stream, parsed once when the stream opens and kept until it
closes: by workload (whose streams a scope change re-pushes), the lazy egress's streams, and by
IP (whose workload an access log entry came from). Pure; a session is any hashable handle."""

from collections import defaultdict
from collections.abc import Hashable
from typing import Generic, TypeVar

from xdsproxy.istio.node import IstioNode
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.contract import is_egress

S = TypeVar("S", bound=Hashable)


class Sessions(Generic[S]):
    def __init__(self) -> None:
        self._nodes: dict[S, IstioNode] = {}
        self._by_workload: dict[WorkloadKey, set[S]] = defaultdict(set)
        self.egress: set[S] = set()

    def open(self, session: S, node: IstioNode) -> None:
        self._nodes[session] = node
        if is_egress(node.labels):
            self.egress.add(session)
        else:
            self._by_workload[node.workload_key].add(session)

    def close(self, session: S) -> None:
        node = self._nodes.pop(session, None)
        if node is None:
            return
        self.egress.discard(session)
        streams = self._by_workload.get(node.workload_key)
        if streams is not None:
            streams.discard(session)
            if not streams:
                del self._by_workload[node.workload_key]

    def node(self, session: S) -> IstioNode | None:
        return self._nodes.get(session)

    def of(self, workload: WorkloadKey) -> list[S]:
        """The open streams of a workload's sidecars."""
        return list(self._by_workload.get(workload, ()))

    def workloads(self) -> list[WorkloadKey]:
        return list(self._by_workload)

    def at(self, ip: str) -> list[IstioNode]:
        """The connected nodes (sidecars and egress) with an instance IP `ip`."""
        return [node for node in self._nodes.values() if ip in node.instance_ips]

    def workloads_at(self, ip: str) -> frozenset[WorkloadKey]:
        # One pass: a sidecar's sampled access log entries ask this per entry.
        return frozenset(
            node.workload_key
            for node in self._nodes.values()
            if ip in node.instance_ips and not is_egress(node.labels)
        )

    def service_accounts(self, workload: WorkloadKey) -> frozenset[str]:
        return frozenset(
            node.service_account for node in self._nodes.values() if node.workload_key == workload
        )
