"""What every layer speaks of: a workload, and an edge of its scope. No imports from xdsproxy,
so the wire, scope, learn and store layers and the servers can all use them."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class WorkloadKey:
    """Scope is per workload (namespace + workload name), so a new replica starts warm."""

    namespace: str
    workload: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.workload}"


@dataclass(slots=True)
class Edge:
    """Wall-clock first and last seen (persisted), and the monotonic time of the last evidence
    seen by this process, which is what ageing uses: a wall-clock jump must not age anything."""

    first_seen: float
    last_seen: float
    evidence: float = 0.0
    learned_by: str = ""  # the replica whose egress entry taught it, where known
