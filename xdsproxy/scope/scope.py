"""A workload's scope: what it has been seen using, plus static rules, plus what is always kept."""

import fnmatch
import itertools
from dataclasses import dataclass, field, replace

from xdsproxy.istio.names import ServicePort, is_port
from xdsproxy.model import Edge, WorkloadKey


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A static rule entry: `ns/*`, `*/name.ns.svc.cluster.local`, `FQDN` or `FQDN:PORT`."""

    namespace: str  # "*" for any
    host: str  # glob over the FQDN; "*" for any
    port: int | None = None
    # Where it was written (`rules.yaml:7`, a LazyScope's spec), for `xdsproxy scope why`.
    source: str = field(default="", compare=False)

    def __str__(self) -> str:
        text = self.host if self.namespace == "*" else f"{self.namespace}/{self.host}"
        return f"{text}:{self.port}" if self.port is not None else text

    def written_at(self, source: str) -> "HostPattern":
        return replace(self, source=source)

    @classmethod
    def parse(cls, text: str) -> "HostPattern":
        """Refuses what can never match a service: a second `/` (`a/b/c`), a port that is not
        a number in 1-65535 (`svc:http`), or no host at all (`8080`, `:8080`)."""
        text = text.strip()
        shape = "must look like ns/*, */FQDN, FQDN or FQDN:PORT"
        namespace, slash, rest = text.partition("/")
        if not slash:
            namespace, rest = "*", text
        if not namespace or not rest or "/" in rest:
            raise ValueError(f"host pattern {text!r} {shape}")
        host, colon, port = rest.rpartition(":")
        if not colon:
            host, port = rest, ""
        elif not is_port(port) or not 0 < int(port) < 65536:
            raise ValueError(f"host pattern {text!r}: the port {port!r} is not 1-65535")
        if not host or is_port(host) or ":" in host:
            raise ValueError(f"host pattern {text!r} names no host; it {shape}")
        return cls(namespace, host, int(port) if port else None)

    @property
    def whole_mesh(self) -> bool:
        return self.namespace == "*" and self.host == "*" and self.port is None

    def matches(self, service: ServicePort) -> bool:
        if self.port is not None and service.port != self.port:
            return False
        if self.namespace != "*":
            parts = service.host.split(".")
            if len(parts) < 2 or parts[1] != self.namespace:
                return False
        return fnmatch.fnmatchcase(service.host, self.host)


_SCOPE_IDS = itertools.count(1)


@dataclass(slots=True)
class Scope:
    """Mutable; `version` bumps on every change, so (`uid`, `version`) names one state of
    one scope for caches of config scoped by it."""

    key: WorkloadKey
    learned: dict[ServicePort, Edge] = field(default_factory=dict)
    static: tuple[HostPattern, ...] = ()
    version: int = 0
    uid: int = field(default_factory=_SCOPE_IDS.__next__)
    _static_matches: dict[ServicePort, bool] = field(default_factory=dict, repr=False)

    def covers(self, service: ServicePort) -> bool:
        """Asked of every cluster on every push: learned set first, static matches memoized."""
        if service in self.learned:
            return True
        if not self.static:
            return False
        matched = self._static_matches.get(service)
        if matched is None:
            matched = self._static_matches[service] = any(p.matches(service) for p in self.static)
        return matched

    def origin(self, service: ServicePort) -> str | None:
        if service in self.learned:
            return "learned"
        if any(p.matches(service) for p in self.static):
            return "static"
        return None

    def learn(self, service: ServicePort, now: float, monotonic: float = 0.0, by: str = "") -> bool:
        """Record use; True when the dependency is new (and the scope widened)."""
        edge = self.learned.get(service)
        if edge is not None:
            edge.last_seen = max(edge.last_seen, now)
            edge.evidence = max(edge.evidence, monotonic)
            return False
        self.learned[service] = Edge(now, now, monotonic, by)
        self.version += 1
        return True

    def restore(self, edges: dict[ServicePort, Edge]) -> bool:
        """Take edges from the store (at start, or written by another replica); True when
        the scope widened."""
        added = False
        for service, edge in edges.items():
            current = self.learned.get(service)
            if current is None:
                self.learned[service] = Edge(
                    edge.first_seen, edge.last_seen, edge.evidence, edge.learned_by
                )
                added = True
            else:
                current.learned_by = current.learned_by or edge.learned_by
                current.last_seen = max(current.last_seen, edge.last_seen)
                current.evidence = max(current.evidence, edge.evidence)
        if added:
            self.version += 1
        return added

    def forget(self, services: list[ServicePort]) -> bool:
        removed = [s for s in services if self.learned.pop(s, None) is not None]
        if removed:
            self.version += 1
        return bool(removed)

    def expired(self, monotonic: float, ttl: float) -> list[ServicePort]:
        """Learned dependencies with no evidence of use for longer than `ttl`. Static rules
        never age."""
        return sorted(s for s, e in self.learned.items() if monotonic - e.evidence > ttl)

    def set_static(self, patterns: tuple[HostPattern, ...]) -> None:
        if patterns != self.static:
            self.static = patterns
            self._static_matches.clear()
            self.version += 1
