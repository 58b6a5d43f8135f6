"""The store interface and the edge record every backend keeps.

A store holds, per workload, the learned dependencies with first and last seen (seconds since
the epoch). `add` returns once the edge is durable, so an edge is committed before the push
that uses it. `touch` takes a batch of last-seen updates (never one write per log entry).
Backends shared by several replicas call the `on_change` callback for edges another replica
wrote, so they reach sidecars connected here too.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from xdsproxy.istio.names import ServicePort
from xdsproxy.model import Edge, WorkloadKey

Edges = dict[ServicePort, Edge]
ChangeCallback = Callable[[WorkloadKey, Edges], None]
# A workload's static hosts kept in the store (the LazyScope spec), as written by operators.
StaticCallback = Callable[[WorkloadKey, tuple[str, ...]], None]
# Dependencies an operator forgot, with when: each replica drops its copy learned before then.
Forgotten = dict[ServicePort, float]
ForgetCallback = Callable[[WorkloadKey, Forgotten], None]


class StoreError(RuntimeError):
    """The backend could not do what was asked; what was committed before stays committed."""


@dataclass(frozen=True, slots=True)
class Touch:
    workload: WorkloadKey
    service: ServicePort
    last_seen: float


class Store(Protocol):
    async def start(
        self,
        on_change: ChangeCallback | None = None,
        on_static: StaticCallback | None = None,
        on_forget: ForgetCallback | None = None,
    ) -> None: ...

    async def load(self) -> dict[WorkloadKey, Edges]: ...

    async def add(
        self, workload: WorkloadKey, service: ServicePort, seen: float, by: str = ""
    ) -> None:
        """`by` names who taught it (a replica, or an operator through one) where kept."""
        ...

    async def touch(self, updates: Iterable[Touch]) -> None: ...

    async def forget(
        self, workload: WorkloadKey, services: Iterable[ServicePort], at: float | None = None
    ) -> None:
        """Drop edges. `at` marks an operator's forget: a shared store keeps it, so that other
        replicas drop their copies and no late write of an older sighting brings it back."""
        ...

    async def close(self) -> None: ...


def open_store(url: str, kube_client: object = None) -> Store:
    """`memory://`, `sqlite:///PATH` or `kubernetes://NAMESPACE` (with `kube_client`, an
    ApiClient, when given; else in-cluster or kubeconfig)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(
            f"store URL {url!r} must look like memory://, sqlite:///PATH or kubernetes://NAMESPACE"
        )
    if scheme == "memory":
        from xdsproxy.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"store URL {url!r}: sqlite needs an absolute path, sqlite:///PATH")
        from xdsproxy.store.sqlite import SqliteStore

        return SqliteStore(rest)
    if scheme == "kubernetes":
        if not rest:
            raise ValueError(f"store URL {url!r}: kubernetes needs a namespace")
        from xdsproxy.store.kubernetes import KubernetesStore

        return KubernetesStore(rest, kube_client)
    raise ValueError(f"store URL {url!r}: unknown scheme {scheme!r}")
