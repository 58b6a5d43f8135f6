"""What the workloads have been seen using: attribution, the store, last seen and ageing.

An access log entry from the lazy egress is attributed (`attribution`) to a workload and a
service; a new dependency is committed to the store before the scope widens, so a push never
uses an edge a restart would lose. Repeated use only moves last seen, batched to the store every
flush. Edges unused for the TTL age out; an operator adds and forgets through here too, and a
forget leaves a tombstone so a sighting from before it cannot bring the edge back. Edges other
replicas write arrive through the store's watch (`apply_remote`, `apply_forgotten`).

Each change of a scope is announced once, through `scope_changed(workload)`: the runtime
re-pushes that workload's sidecars.
"""

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from cachetools import LRUCache

from xdsproxy.debug.metrics import Metrics
from xdsproxy.istio.names import ServicePort, outbound_cluster, service_fqdn
from xdsproxy.learn.attribution import AccessRecord, Directory, Learned, attribute
from xdsproxy.learn.pending import Held, PendingEntries
from xdsproxy.logs import RateLimitedLog
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.registry import Scopes
from xdsproxy.store.base import Edges, Store, StoreError, Touch

log = logging.getLogger("xdsproxy.lazy")

Dependency = tuple[WorkloadKey, ServicePort]


class Learner:
    def __init__(
        self,
        scopes: Scopes,
        directory: Directory,
        store: Store,
        scope_changed: Callable[[WorkloadKey], None],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        metrics: Metrics,
        ttl: float = 0.0,
        replica: str = "",
    ) -> None:
        self.scopes = scopes
        self.directory = directory
        self.store = store
        self.scope_changed = scope_changed
        self.clock = clock
        self.monotonic = monotonic
        self.metrics = metrics
        self.ttl = ttl
        self.replica = replica  # recorded as who learned an edge (the pod name in a cluster)
        self.store_healthy = False  # until `load` has read the store
        self.known_services: set[ServicePort] = set()
        # Entries for services not known here yet, reconsidered when the service appears.
        self.pending = PendingEntries()
        self.rejections: Counter[str] = Counter()  # mirrored in metrics.als_rejections
        self.learns = 0
        # Seconds from the egress seeing the request to the re-push being queued, per learn.
        self.learn_latencies: list[float] = []
        # Why a dependency left a scope (aged out, or forgotten by an operator) and when, for
        # `xdsproxy scope why`; an operator's forget also refuses sightings from before it.
        # Bounded: a key names one workload and service.
        self.dropped: LRUCache[Dependency, tuple[str, float]] = LRUCache(maxsize=65536)
        self._touches: dict[Dependency, float] = {}
        self._unsaved: dict[Dependency, float] = {}
        self._expired_counted = 0
        self._warn = RateLimitedLog(log)

    # -- what Istiod sends -----------------------------------------------------------------

    def note_services(self, cluster_names: Iterable[str]) -> tuple[list[Held], bool]:
        """The services Istiod's clusters name: the held entries they release, and whether any
        service is new."""
        new = set()
        for name in cluster_names:
            parsed = outbound_cluster(name)
            if parsed is not None and parsed.service not in self.known_services:
                self.known_services.add(parsed.service)
                new.add(parsed.service)
        released = self.pending.take(new, self.monotonic())
        self._count_pending()
        return released, bool(new)

    def _count_pending(self) -> None:
        expired = self.pending.expired - self._expired_counted
        if expired:
            self._expired_counted = self.pending.expired
            self.reject("unknown_service_expired", expired)
        self.metrics.als_held.set(len(self.pending))

    # -- access log entries ----------------------------------------------------------------

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejections[reason] += count
        self.metrics.als_rejections.labels(reason).inc(count)

    async def observe(self, record: AccessRecord, started: float) -> Learned | None:
        """Attribute one egress access log entry; a new dependency is committed to the store,
        then the workload's scope widens."""
        result = attribute(record, self.directory, self.known_services.__contains__)
        if not isinstance(result, Learned) and result.service is not None:
            # A service whose config has not reached this replica yet: held, not lost.
            self.pending.hold(result.service, record, started, self.monotonic())
            self._count_pending()
            return None
        if not isinstance(result, Learned):
            self.reject(result.reason)
            self._warn.warning(
                result.reason,
                "access log entry not learned",
                extra={"reason": result.reason, "remote": record.remote_ip},
            )
            return None
        if result.claim_ignored:
            self.reject("forged_claim")
            self._warn.warning(
                "forged_claim",
                "source header disagrees with the connection",
                extra={"remote": record.remote_ip},
            )
        scope = self.scopes.get(result.workload)
        seen = started or self.clock()
        if result.service in scope.learned:
            self._touch(result.workload, result.service, seen)
            return result
        if self._forgotten_since(result.workload, result.service, seen):
            return None  # a request from before an operator forgot it
        await self._commit(result.workload, result.service, seen, self.replica)
        if scope.learn(result.service, seen, self.monotonic(), self.replica):
            self.learns += 1
            self.metrics.learns.inc()
            latency = max(0.0, self.clock() - started) if started else None
            if latency is not None:
                self.learn_latencies.append(latency)
                self.metrics.learn_latency.observe(latency)
            log.info(
                "learned",
                extra={
                    "workload": str(result.workload),
                    "service": str(result.service),
                    "scope": len(scope.learned),
                    "ms": round(latency * 1000, 1) if latency is not None else None,
                },
            )
            self.scope_changed(result.workload)
        return result

    def observe_usage(self, record: AccessRecord, peer: str) -> None:
        """A sampled entry from a sidecar's own traffic, streamed by the sidecar at `peer`:
        evidence that a learned dependency is still used. It refreshes last seen; it never
        adds a dependency."""
        parsed = outbound_cluster(record.upstream_cluster)
        if parsed is None:
            return
        for workload in self.directory.workloads_at(peer):
            self._touch(workload, parsed.service, self.clock())

    def _touch(self, workload: WorkloadKey, service: ServicePort, seen: float) -> None:
        edge = self.scopes.get(workload).learned.get(service)
        if edge is None:
            return
        edge.last_seen = max(edge.last_seen, seen)
        edge.evidence = self.monotonic()
        self._touches[(workload, service)] = edge.last_seen

    async def _commit(
        self, workload: WorkloadKey, service: ServicePort, seen: float, by: str
    ) -> None:
        """Durable before the push that uses it; if the store fails, serve from memory, report
        not ready, and retry from `flush`."""
        try:
            await self.store.add(workload, service, seen, by)
        except StoreError as exc:
            self._store_failed(exc)
            self._unsaved[(workload, service)] = seen

    def _store_failed(self, exc: Exception) -> None:
        self.store_healthy = False
        self.metrics.store_errors.inc()
        self._warn.warning(
            "store", "store unavailable; serving from memory", extra={"error": str(exc)}
        )

    # -- operators (`xdsproxy scope add|forget`, through the admin endpoint) ----------------

    def services_named(
        self, host: str, port: int | None, workload: WorkloadKey | None = None
    ) -> list[ServicePort]:
        """The services Istiod sent for `host` (FQDN, or `name.namespace`), on `port` if
        given, and those of `workload`'s learned scope."""
        fqdn = service_fqdn(host)
        scope = self.scopes.by_workload.get(workload) if workload else None
        candidates = self.known_services | set(scope.learned if scope else ())
        return sorted(
            s for s in candidates if s.host in (host, fqdn) and (port is None or s.port == port)
        )

    async def add_dependencies(self, workload: WorkloadKey, services: list[ServicePort]) -> int:
        """An operator's add: committed to the store (which carries it to every replica),
        then in scope here. Returns how many were new."""
        by = f"operator via {self.replica or 'local'}"
        now = self.clock()
        scope = self.scopes.get(workload)
        new = [s for s in services if s not in scope.learned]
        for service in new:
            self.dropped.pop((workload, service), None)
            await self.store.add(workload, service, now, by)  # StoreError: nothing changed
            # The store's own change event may have put it in scope already: learn is no-op.
            if scope.learn(service, now, self.monotonic(), by):
                self.scope_changed(workload)
        log.info("operator added", extra={"workload": str(workload), "added": len(new)})
        return len(new)

    async def forget_dependencies(self, workload: WorkloadKey, services: list[ServicePort]) -> int:
        """An operator's forget: recorded in the store with when (the other replicas drop
        their copies learned before then), and the scope here shrinks at once."""
        now = self.clock()
        learned = self.scopes.get(workload).learned
        removed = sum(s in learned for s in services)
        await self.store.forget(workload, services, at=now)  # StoreError: nothing changed
        self.apply_forgotten(workload, dict.fromkeys(services, now))  # the event may be first
        log.info("operator forgot", extra={"workload": str(workload), "removed": removed})
        return removed

    def apply_forgotten(self, workload: WorkloadKey, forgotten: dict[ServicePort, float]) -> None:
        """An operator's forget (recorded here or by another replica): drop what was learned
        before it, and remember it."""
        scope = self.scopes.get(workload)
        gone = []
        for service, at in forgotten.items():
            edge = scope.learned.get(service)
            if edge is not None and edge.first_seen > at:
                continue  # learned again since the forget
            self.dropped[(workload, service)] = ("forgotten", at)
            if edge is not None:
                gone.append(service)
                self._settled(workload, service)
        if scope.forget(gone):
            self.scope_changed(workload)

    def _forgotten_since(self, workload: WorkloadKey, service: ServicePort, seen: float) -> bool:
        reason, at = self.dropped.get((workload, service), ("", 0.0))
        return reason == "forgotten" and at >= seen

    def _settled(self, workload: WorkloadKey, service: ServicePort) -> None:
        """An edge left the scope: nothing of it is left to write."""
        self._touches.pop((workload, service), None)
        self._unsaved.pop((workload, service), None)

    # -- the store -------------------------------------------------------------------------

    async def load(self) -> None:
        """Every scope from the store, before the first stream is served."""
        for workload, edges in (await self.store.load()).items():
            self.scopes.get(workload).restore(self._aged(edges))
        self.store_healthy = True

    def apply_remote(self, workload: WorkloadKey, edges: Edges) -> None:
        """A replica (maybe this one) wrote this workload's edges: take what is new. Remote
        state only widens a scope and moves last seen forward; each replica ages by itself, so
        a late event can never pull an edge this replica just learned."""
        if self.scopes.get(workload).restore(self._aged(edges)):
            self.scope_changed(workload)

    def _aged(self, edges: Edges) -> Edges:
        """Evidence from the stored last seen, but never older than the TTL, whatever the wall
        clock did while this replica was down or the edge was elsewhere."""
        now, wall = self.monotonic(), self.clock()
        for edge in edges.values():
            edge.evidence = now - min(max(0.0, wall - edge.last_seen), self.ttl or 0.0)
        return edges

    async def flush(self) -> None:
        """Write batched last-seen updates and retry edges the store failed to take."""
        for (workload, service), seen in list(self._unsaved.items()):
            await self.store.add(workload, service, seen, self.replica)
            del self._unsaved[(workload, service)]
        if self._touches:
            batch, self._touches = self._touches, {}
            try:
                await self.store.touch(Touch(w, s, t) for (w, s), t in batch.items())
            except StoreError:
                for key, seen in batch.items():
                    self._touches[key] = max(seen, self._touches.get(key, 0.0))
                raise
        self.store_healthy = True

    async def age(self) -> None:
        """Drop learned dependencies unused for longer than the TTL."""
        if not self.ttl:
            return
        for workload, expired in list(self._expired()):
            for service in expired:
                self.dropped[(workload, service)] = ("aged out", self.clock())
                self._settled(workload, service)
            log.info(
                "aged out",
                extra={"workload": str(workload), "services": ",".join(map(str, expired))},
            )
            try:
                await self.store.forget(workload, expired)
            except StoreError as exc:
                self._store_failed(exc)
            self.scope_changed(workload)

    def _expired(self) -> Iterator[tuple[WorkloadKey, list[ServicePort]]]:
        now = self.monotonic()
        for workload, scope in list(self.scopes.by_workload.items()):
            expired = scope.expired(now, self.ttl)
            if expired:
                scope.forget(expired)
                yield workload, expired

    async def maintain(self) -> None:
        """One round of upkeep: flush, let held entries expire, age."""
        try:
            await self.flush()
        except StoreError as exc:
            self._store_failed(exc)
        self.pending.expire(self.monotonic())
        self._count_pending()
        await self.age()
