"""A workload's scope: what it has been seen using, plus static rules, plus what is always kept."""

import fnmatch
from dataclasses import dataclass, field

from xdsproxy.istio.names import ServicePort


@dataclass(frozen=True, slots=True, order=True)
class WorkloadKey:
    """Scope is per workload (namespace + workload name), so a new replica starts warm."""

    namespace: str
    workload: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.workload}"


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A static rule entry: `ns/*`, `*/name.ns.svc.cluster.local`, `FQDN` or `FQDN:PORT`."""

    namespace: str  # "*" for any
    host: str  # glob over the FQDN; "*" for any
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> "HostPattern":
        text = text.strip()
        namespace, slash, rest = text.partition("/")
        if not slash:
            namespace, rest = "*", text
        if not namespace or not rest:
            raise ValueError(
                f"host pattern {text!r} must look like ns/*, */FQDN, FQDN or FQDN:PORT"
            )
        host, colon, port = rest.rpartition(":")
        if colon and port.isdigit():
            return cls(namespace, host, int(port))
        return cls(namespace, rest, None)

    def matches(self, service: ServicePort) -> bool:
        if self.port is not None and service.port != self.port:
            return False
        if self.namespace != "*":
            parts = service.host.split(".")
            if len(parts) < 2 or parts[1] != self.namespace:
                return False
        return fnmatch.fnmatchcase(service.host, self.host)


@dataclass(slots=True)
class Edge:
    first_seen: float
    last_seen: float


@dataclass(slots=True)
class Scope:
    """Mutable; `version` bumps on every change so caches of rewritten config can key on it."""

    key: WorkloadKey
    learned: dict[ServicePort, Edge] = field(default_factory=dict)
    static: tuple[HostPattern, ...] = ()
    version: int = 0

    def covers(self, service: ServicePort) -> bool:
        return service in self.learned or any(p.matches(service) for p in self.static)

    def origin(self, service: ServicePort) -> str | None:
        if service in self.learned:
            return "learned"
        if any(p.matches(service) for p in self.static):
            return "static"
        return None

    def learn(self, service: ServicePort, now: float) -> bool:
        """Record use; True when the dependency is new (and the scope widened)."""
        edge = self.learned.get(service)
        if edge is not None:
            edge.last_seen = max(edge.last_seen, now)
            return False
        self.learned[service] = Edge(now, now)
        self.version += 1
        return True

    def set_static(self, patterns: tuple[HostPattern, ...]) -> None:
        if patterns != self.static:
            self.static = patterns
            self.version += 1
