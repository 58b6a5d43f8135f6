"""Lazy mode's runtime: scopes per workload, the egress's shared tables, and re-pushes.

Everything here runs on the event loop thread; the views and scopes it hands out are pure.
"""

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from cachetools import LRUCache
from envoy.config.core.v3.base_pb2 import Node

from xdsproxy.debug.metrics import Metrics
from xdsproxy.istio.names import ServicePort, cluster_name, outbound_cluster, service_fqdn
from xdsproxy.istio.node import IstioNode, NodeIdError, parse_node
from xdsproxy.learn.attribution import AccessRecord, Learned, attribute
from xdsproxy.learn.pending import PendingEntries
from xdsproxy.learn.pods import PodDirectory
from xdsproxy.logs import RateLimitedLog
from xdsproxy.model import WorkloadKey
from xdsproxy.scope import inputs
from xdsproxy.scope.compact import CompactMode
from xdsproxy.scope.egress import EgressSettings, EgressView, is_egress
from xdsproxy.scope.failopen import FailOpen, ready_endpoints
from xdsproxy.scope.mesh import MeshTables
from xdsproxy.scope.registry import Scopes
from xdsproxy.scope.rules import Rules
from xdsproxy.scope.scope import HostPattern, Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.scope.tunnel import TUNNEL_UNSUPPORTED, supports_tunnel
from xdsproxy.server.ads import Session
from xdsproxy.store.base import Edges, Store, StoreError, Touch
from xdsproxy.store.memory import MemoryStore
from xdsproxy.wire import typeurls
from xdsproxy.xds.events import Nacked, UpstreamApplied
from xdsproxy.xds.view import UNSCOPED, ResourceView

log = logging.getLogger("xdsproxy.lazy")


class LazyRuntime:
    def __init__(
        self,
        egress: ServicePort,
        settings: EgressSettings,
        rules: Rules | None = None,
        als_allow: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        store: Store | None = None,
        ttl: float = 0.0,
        flush_interval: float = 10.0,
        usage_sample_percent: float = 0.0,
        usage_flush_seconds: int = 30,
        pods: PodDirectory | None = None,
        fail_open: FailOpen | None = None,
        compact: CompactMode | None = None,
        replica: str = "",
    ) -> None:
        self.egress = egress
        self.replica = replica  # recorded as who learned an edge (the pod name in a cluster)
        self.egress_cluster = cluster_name(egress)
        self.settings = settings
        # Scopes and their static patterns (pure); `scopes` is its map, read by the debug views.
        self.registry = Scopes(rules)
        self.scopes = self.registry.by_workload
        self.als_allow = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in als_allow)
        self.clock = clock
        self.monotonic = monotonic
        self.metrics = metrics or Metrics()
        # Every pod of the cluster (with the Kubernetes store), so that entries for sidecars
        # connected to another replica are attributed here too; else connected nodes only.
        self.pods = pods
        self.fail_open = fail_open or FailOpen()
        # Compact lazy sidecars (see scope/compact.py): one mode and set of ranges for every view.
        self.compact = compact
        self._fail_open_timer: asyncio.TimerHandle | None = None
        self.tables = MeshTables()
        self.known_services: set[ServicePort] = set()
        self.rejections: Counter[str] = Counter()  # mirrored in metrics.als_rejections
        self.learns = 0
        # Entries for services not known here yet, reconsidered when the service appears.
        self.pending = PendingEntries()
        # Seconds from the egress seeing the request to the re-push being queued, per learn.
        self.learn_latencies: list[float] = []
        self.store: Store = store or MemoryStore()
        self.store_healthy = False  # until start() has loaded the store
        self.ttl = ttl
        self.flush_interval = flush_interval
        self.usage_sample_percent = usage_sample_percent
        self.usage_flush_seconds = usage_flush_seconds
        self._touches: dict[tuple[WorkloadKey, ServicePort], float] = {}
        self._unsaved: dict[tuple[WorkloadKey, ServicePort], float] = {}
        self._maintainer: asyncio.Task[None] | None = None
        self._nodes: dict[int, IstioNode] = {}
        self._by_workload: dict[WorkloadKey, set[Session]] = defaultdict(set)
        self._egress: set[Session] = set()
        self._warn = RateLimitedLog(log)
        self._tasks: set[asyncio.Task] = set()
        self._expired_counted = 0
        # Nodes that NACKed the tunnel listener (no internal-listener extension), so that a
        # reconnect does not offer it again. Bounded: a node id names one pod.
        self._no_tunnel: LRUCache[str, bool] = LRUCache(maxsize=65536)
        # Why a dependency left a scope (aged out, or forgotten by an operator) and when, for
        # `xdsproxy scope why`; an operator's forget also refuses sightings from before it.
        self.dropped: LRUCache[tuple[WorkloadKey, ServicePort], tuple[str, float]] = LRUCache(
            maxsize=65536
        )

    # -- streams ---------------------------------------------------------------------------

    def scope(self, key: WorkloadKey, labels: dict[str, str] | None = None) -> Scope:
        return self.registry.get(key, labels)

    def labels_of(self, key: WorkloadKey) -> dict[str, str]:
        return self.registry.labels_of(key)

    def set_rules(self, rules: Rules) -> None:
        """New static rules (the rules file changed): every scope they change is re-pushed."""
        for key in self.registry.set_rules(rules):
            self._repush(key, inputs.SCOPE)

    def apply_static(self, workload: WorkloadKey, hosts: tuple[str, ...]) -> None:
        """Static hosts from the store (a LazyScope's spec.hosts); bad entries are skipped."""
        patterns = []
        for host in hosts:
            try:
                patterns.append(HostPattern.parse(host).written_at(f"LazyScope {workload}"))
            except ValueError as exc:
                self._warn.warning(
                    "static",
                    "skipping a bad static host",
                    extra={"workload": str(workload), "error": str(exc)},
                )
        if self.registry.set_stored(workload, tuple(patterns)):
            self._repush(workload, inputs.SCOPE)

    def view_for(self, node: Node) -> ResourceView:
        """The view a node gets (streams get theirs from `opened`, which parses once)."""
        try:
            return self._view(parse_node(node))
        except NodeIdError:
            return UNSCOPED  # Istiod judges it; nothing to scope by

    def _view(self, istio: IstioNode) -> ResourceView:
        if istio.proxy_type != "sidecar":
            # docs/protocol.md R18. A gateway (`router~`) routes what its Gateway and
            # VirtualServices bind, not what a workload calls: scoping it would replace its
            # vhosts, and nothing would learn.
            return UNSCOPED
        if is_egress(istio.labels):
            return EgressView(self.settings, self.tables)
        key = WorkloadKey(istio.namespace, istio.workload)
        # Compact mode only where the tunnel is known to work: an older Envoy would reject the
        # mesh chains' tunnelling config, and its out-of-scope VIPs would then go nowhere.
        tunnel = (
            supports_tunnel(istio.istio_version) is not False and istio.id not in self._no_tunnel
        )
        return SidecarView(
            self.scope(key, istio.labels),
            self.egress_cluster,
            self.settings,
            self.usage_sample_percent,
            self.usage_flush_seconds,
            self.fail_open,
            tunnel=tunnel,
            compact=self.compact if tunnel else None,
        )

    def opened(self, session: Session) -> ResourceView:
        """Register the stream by its Istio node (parsed once, kept until it closes) and
        return its view."""
        node = session.stream.node
        try:
            istio = parse_node(node) if node is not None else None
        except NodeIdError:
            istio = None
        if istio is None:
            return UNSCOPED  # Istiod judges it; nothing to scope by
        self._nodes[session.id] = istio
        if is_egress(istio.labels):
            self._egress.add(session)
            self.metrics.egress_nodes.set(len(self._egress))
        else:
            self._by_workload[WorkloadKey(istio.namespace, istio.workload)].add(session)
        return self._view(istio)

    def closed(self, session: Session) -> None:
        istio = self._nodes.pop(session.id, None)
        if istio is None:
            return
        self._egress.discard(session)
        self.metrics.egress_nodes.set(len(self._egress))
        self._by_workload[WorkloadKey(istio.namespace, istio.workload)].discard(session)

    def nacked(self, session: Session, nack: Nacked) -> None:
        """A sidecar whose bootstrap lacks the internal-listener extension rejects the tunnel
        listener: give it Istio's TCP clusters instead, once (the NACK does not repeat)."""
        view = session.stream.view
        if (
            nack.type_url != typeurls.LISTENER
            or TUNNEL_UNSUPPORTED not in nack.message
            or not isinstance(view, SidecarView)
            or not view.tunnel
        ):
            return
        self._no_tunnel[session.node_id] = True
        view.tunnel, view.compact = False, None
        log.warning(
            "sidecar cannot tunnel TCP (no internal-listener bootstrap extension, Istio < "
            "1.18): its TCP services stay in scope, with their listeners",
            extra={"node": session.node_id},
        )
        # After the events of this answer are handled, not in the middle of them.
        asyncio.get_running_loop().call_soon(self._refresh_open, session)

    def _refresh_open(self, session: Session) -> None:
        if session.id in self._nodes:
            session.refresh(frozenset({inputs.TUNNEL}))

    def upstream_applied(self, session: Session, applied: UpstreamApplied) -> None:
        """Istiod's config as a stream just stored it: the services it names (held access log
        entries wait for them), the egress's endpoints (fail-open), and a namespace's route
        tables (the egress's scoped routes read them)."""
        istio = self._nodes.get(session.id)
        if istio is None:
            return
        type_url = applied.type_url
        if type_url == typeurls.CLUSTER:
            self._note_services(applied.upstream[0])
        if type_url == typeurls.ENDPOINT and self.fail_open.mode != "never":
            self._note_egress_endpoints(applied.upstream)
        routes_changed = (
            type_url == typeurls.ROUTE
            and session not in self._egress
            and self.tables.record(istio.namespace, applied.upstream)
        )
        if routes_changed:
            for egress in list(self._egress):
                egress.refresh(frozenset({inputs.MESH_ROUTE_TABLES}))

    def _note_egress_endpoints(self, endpoints: tuple[tuple[str, ...], tuple[bytes, ...]]) -> None:
        names, bodies = endpoints
        try:
            body = bodies[names.index(self.egress_cluster)]
        except ValueError:
            return  # this response left the egress's endpoints out
        if self.fail_open.observe(ready_endpoints(body), self.monotonic()):
            self._fail_open_switched()
        elif self.fail_open.ready_since is not None and self._fail_open_timer is None:
            self._fail_open_timer = asyncio.get_running_loop().call_later(
                self.fail_open.hold_down, self._fail_open_hold_down_over
            )

    def _fail_open_hold_down_over(self) -> None:
        self._fail_open_timer = None
        if self.fail_open.tick(self.monotonic()):
            self._fail_open_switched()
        elif self.fail_open.ready_since is not None:  # the egress flapped: the wait restarted
            remaining = self.fail_open.ready_since + self.fail_open.hold_down - self.monotonic()
            self._fail_open_timer = asyncio.get_running_loop().call_later(
                max(0.0, remaining), self._fail_open_hold_down_over
            )

    def _fail_open_switched(self) -> None:
        active = self.fail_open.active
        self.metrics.fail_open.set(1 if active else 0)
        log.warning(
            "fail-open: serving full config, the egress has no ready endpoint"
            if active
            else "fail-open over: scoping again, the egress has been ready for the hold-down",
            extra={"egress": self.egress_cluster},
        )
        for workload in list(self._by_workload):
            self._repush(workload, inputs.FAIL_OPEN)

    def _note_services(self, names: tuple[str, ...]) -> None:
        new = set()
        for name in names:
            parsed = outbound_cluster(name)
            if parsed is not None and parsed[0] not in self.known_services:
                self.known_services.add(parsed[0])
                new.add(parsed[0])
        for held in self.pending.take(new, self.monotonic()):
            self._spawn(self.observe(held.record, held.started))
        self._count_pending()
        if new and (problem := self.egress_problem()):
            self._warn.warning("egress", problem)

    def egress_problem(self) -> str:
        """Why `--egress` cannot work, once Istiod's clusters are known: every catch-all would
        route to a cluster that does not exist."""
        if not self.known_services or self.egress in self.known_services:
            return ""
        return (
            f"--egress {self.egress.host}:{self.egress.port}: Istiod sends no cluster "
            f"{self.egress_cluster}; give the FQDN:PORT of the lazy egress Service, e.g. "
            "lazy-egress.istio-system.svc.cluster.local:80"
        )

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_pending(self) -> None:
        expired = self.pending.expired - self._expired_counted
        if expired:
            self._expired_counted = self.pending.expired
            self.rejections["unknown_service_expired"] += expired
            self.metrics.als_rejections.labels("unknown_service_expired").inc(expired)
        self.metrics.als_held.set(len(self.pending))

    # -- learning --------------------------------------------------------------------------

    def workloads_at(self, ip: str) -> frozenset[WorkloadKey]:
        connected = frozenset(
            WorkloadKey(node.namespace, node.workload)
            for node in self._nodes.values()
            if ip in node.instance_ips and not is_egress(node.labels)
        )
        return connected | self.pods.workloads_at(ip) if self.pods is not None else connected

    def service_accounts(self, workload: WorkloadKey) -> frozenset[str]:
        connected = frozenset(
            node.service_account
            for node in self._nodes.values()
            if WorkloadKey(node.namespace, node.workload) == workload
        )
        if self.pods is None:
            return connected
        return connected | self.pods.service_accounts(workload)

    def als_role(self, ip: str) -> str | None:
        """`egress` for a connected egress node or an `--als-allow` network (its entries
        teach), `sidecar` for a connected sidecar (its sampled entries only refresh last seen),
        None for anyone else."""
        nodes = [node for node in self._nodes.values() if ip in node.instance_ips]
        if any(is_egress(node.labels) for node in nodes):
            return "egress"
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if any(address in network for network in self.als_allow):
            return "egress"
        return "sidecar" if nodes else None

    def reject(self, reason: str) -> None:
        self.rejections[reason] += 1
        self.metrics.als_rejections.labels(reason).inc()

    async def observe(self, record: AccessRecord, started: float) -> Learned | None:
        """Attribute one egress access log entry; a new dependency is committed to the store,
        then the workload's scope widens and is re-pushed to its connected nodes."""
        result = attribute(record, self, self.known_services.__contains__)
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
        scope = self.scope(result.workload)
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
            self._repush(result.workload)
        return result

    def _repush(self, workload: WorkloadKey, changed: str = inputs.SCOPE) -> None:
        for session in list(self._by_workload.get(workload, ())):
            session.refresh(frozenset({changed}))

    async def _commit(
        self, workload: WorkloadKey, service: ServicePort, seen: float, by: str
    ) -> None:
        """Durable before the push that uses it; if the store fails, serve from memory, report
        not ready, and retry from the maintenance loop."""
        try:
            await self.store.add(workload, service, seen, by)
        except StoreError as exc:
            self._store_failed(exc)
            self._unsaved[(workload, service)] = seen

    def _forgotten_since(self, workload: WorkloadKey, service: ServicePort, seen: float) -> bool:
        reason, at = self.dropped.get((workload, service), ("", 0.0))
        return reason == "forgotten" and at >= seen

    # -- operators (`xdsproxy scope add|forget`, through the admin endpoint) ----------------

    def services_named(
        self, host: str, port: int | None, workload: WorkloadKey | None = None
    ) -> list[ServicePort]:
        """The services Istiod sent for `host` (FQDN, or `name.namespace`), on `port` if
        given, and those of `workload`'s learned scope."""
        fqdn = service_fqdn(host)
        scope = self.scopes.get(workload) if workload else None
        candidates = self.known_services | set(scope.learned if scope else ())
        return sorted(
            s for s in candidates if s.host in (host, fqdn) and (port is None or s.port == port)
        )

    async def add_dependencies(self, workload: WorkloadKey, services: list[ServicePort]) -> int:
        """An operator's add: committed to the store (which carries it to every replica),
        then in scope and pushed here. Returns how many were new."""
        by = f"operator via {self.replica or 'local'}"
        now = self.clock()
        scope = self.scope(workload)
        new = [s for s in services if s not in scope.learned]
        for service in new:
            self.dropped.pop((workload, service), None)
            await self.store.add(workload, service, now, by)  # StoreError: nothing changed
            # The store's own change event may have put it in scope already: learn is no-op.
            if scope.learn(service, now, self.monotonic(), by):
                self._repush(workload)
        log.info("operator added", extra={"workload": str(workload), "added": len(new)})
        return len(new)

    async def forget_dependencies(self, workload: WorkloadKey, services: list[ServicePort]) -> int:
        """An operator's forget: recorded in the store with when (the other replicas drop
        their copies learned before then), and the scope here shrinks at once."""
        now = self.clock()
        learned = self.scope(workload).learned
        removed = sum(s in learned for s in services)
        await self.store.forget(workload, services, at=now)  # StoreError: nothing changed
        self._drop(workload, dict.fromkeys(services, now))  # the store's event may be first
        log.info("operator forgot", extra={"workload": str(workload), "removed": removed})
        return removed

    def apply_forgotten(self, workload: WorkloadKey, forgotten: dict[ServicePort, float]) -> None:
        """Another replica recorded an operator's forget: drop what was learned before it."""
        self._drop(workload, forgotten)

    def _drop(self, workload: WorkloadKey, forgotten: dict[ServicePort, float]) -> None:
        scope = self.scope(workload)
        gone = []
        for service, at in forgotten.items():
            edge = scope.learned.get(service)
            if edge is not None and edge.first_seen > at:
                continue  # learned again since the forget
            self.dropped[(workload, service)] = ("forgotten", at)
            if edge is not None:
                gone.append(service)
                self._touches.pop((workload, service), None)
                self._unsaved.pop((workload, service), None)
        if scope.forget(gone):
            self._repush(workload)

    def _store_failed(self, exc: Exception) -> None:
        self.store_healthy = False
        self.metrics.store_errors.inc()
        self._warn.warning(
            "store", "store unavailable; serving from memory", extra={"error": str(exc)}
        )

    def _touch(self, workload: WorkloadKey, service: ServicePort, seen: float) -> None:
        edge = self.scope(workload).learned.get(service)
        if edge is None:
            return
        edge.last_seen = max(edge.last_seen, seen)
        edge.evidence = self.monotonic()
        self._touches[(workload, service)] = edge.last_seen

    def observe_usage(self, record: AccessRecord, peer: str) -> None:
        """A sampled entry from a sidecar's own traffic, streamed by the sidecar at `peer`:
        evidence that a learned dependency is still used. It refreshes last seen; it never
        adds a dependency."""
        parsed = outbound_cluster(record.upstream_cluster)
        if parsed is None:
            return
        for workload in self.workloads_at(peer):
            self._touch(workload, parsed[0], self.clock())

    # -- state -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every scope from the store before the first stream is served."""
        await self.store.start(self.apply_remote, self.apply_static, self.apply_forgotten)
        for workload, edges in (await self.store.load()).items():
            now = self.monotonic()
            wall = self.clock()
            for edge in edges.values():
                # Age from the stored last-seen, but never by more than the TTL, whatever the
                # wall clock did while we were down.
                idle = min(max(0.0, wall - edge.last_seen), self.ttl or 0.0)
                edge.evidence = now - idle
            self.scope(workload).restore(edges)
        self.store_healthy = True
        self._maintainer = asyncio.create_task(self._maintain())

    async def stop(self) -> None:
        if self._fail_open_timer is not None:
            self._fail_open_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        with contextlib.suppress(StoreError):
            await self.flush()
        await self.store.close()

    def apply_remote(self, workload: WorkloadKey, edges: Edges) -> None:
        """A replica (maybe this one) wrote this workload's edges: take what is new and
        re-push. Remote state only widens a scope and moves last seen forward; each replica
        ages by itself, so a late event can never pull an edge this replica just learned."""
        scope = self.scope(workload)
        now, wall = self.monotonic(), self.clock()
        for edge in edges.values():
            edge.evidence = now - min(max(0.0, wall - edge.last_seen), self.ttl or 0.0)
        if scope.restore(edges):
            self._repush(workload)

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
        """Drop learned dependencies unused for longer than the TTL, and re-push."""
        if not self.ttl:
            return
        now = self.monotonic()
        for workload, scope in list(self.scopes.items()):
            expired = scope.expired(now, self.ttl)
            if not expired:
                continue
            scope.forget(expired)
            for service in expired:
                self.dropped[(workload, service)] = ("aged out", self.clock())
                self._touches.pop((workload, service), None)
                self._unsaved.pop((workload, service), None)
            log.info(
                "aged out",
                extra={"workload": str(workload), "services": ",".join(map(str, expired))},
            )
            try:
                await self.store.forget(workload, expired)
            except StoreError as exc:
                self._store_failed(exc)
            self._repush(workload)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except StoreError as exc:
                self._store_failed(exc)
            self.pending.expire(self.monotonic())
            self._count_pending()
            await self.age()
