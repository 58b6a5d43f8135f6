"""Lazy mode's runtime: it wires the jobs together and turns what they report into pushes.

- `istio.sessions`: the Istio node of every open stream, parsed once;
- `scope.registry`: each workload's scope and static rules (pure);
- `learn.learner`: attribution, the store, last seen and ageing; it reports each scope change;
- `scope.mesh`: the namespaces' route tables the egress's caller routes read;
- fail-open and the tunnel fallback.

What changes a view's input (a scope, fail-open, the tunnel, the mesh's tables) is told to the
streams whose views read it (`Session.refresh`), and each recomputes only what reads it.
Everything here runs on the event loop thread; the views and scopes it hands out are pure.
"""

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable

from cachetools import LRUCache

from xdsproxy.debug.metrics import Metrics
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.istio.node import IstioNode, NodeIdError, parse_node
from xdsproxy.istio.sessions import Sessions
from xdsproxy.learn.directory import MeshDirectory
from xdsproxy.learn.learner import Learner
from xdsproxy.learn.pods import PodDirectory
from xdsproxy.logs import RateLimitedLog
from xdsproxy.model import WorkloadKey
from xdsproxy.scope import inputs
from xdsproxy.scope.compact import CompactMode
from xdsproxy.scope.contract import is_egress
from xdsproxy.scope.egress import EgressSettings, EgressView
from xdsproxy.scope.failopen import FailOpen, ready_endpoints
from xdsproxy.scope.mesh import MeshTables
from xdsproxy.scope.registry import Scopes
from xdsproxy.scope.rules import Rules
from xdsproxy.scope.scope import HostPattern, Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.scope.tunnel import TUNNEL_UNSUPPORTED, supports_tunnel
from xdsproxy.server.ads import Session
from xdsproxy.store.base import Store, StoreError
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
        self.egress_cluster = cluster_name(egress)
        self.settings = settings
        # Scopes and their static patterns (pure); `scopes` is its map, read by the debug views.
        self.registry = Scopes(rules)
        self.scopes = self.registry.by_workload
        self.als_allow = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in als_allow)
        self.clock = clock
        self.monotonic = monotonic
        self.metrics = metrics or Metrics()
        self.sessions: Sessions[Session] = Sessions()
        self.learner = Learner(
            self.registry,
            MeshDirectory(self.sessions, pods),
            store or MemoryStore(),
            scope_changed=self._repush,
            clock=clock,
            monotonic=monotonic,
            metrics=self.metrics,
            ttl=ttl,
            replica=replica,
        )
        self.fail_open = fail_open or FailOpen()
        # Compact lazy sidecars (see scope/compact.py): one mode and set of ranges for every view.
        self.compact = compact
        self._fail_open_timer: asyncio.TimerHandle | None = None
        self.tables = MeshTables()
        self.flush_interval = flush_interval
        self.usage_sample_percent = usage_sample_percent
        self.usage_flush_seconds = usage_flush_seconds
        self._maintainer: asyncio.Task[None] | None = None
        self._warn = RateLimitedLog(log)
        self._tasks: set[asyncio.Task] = set()
        # Nodes that NACKed the tunnel listener (no internal-listener extension), so that a
        # reconnect does not offer it again. Bounded: a node id names one pod.
        self._no_tunnel: LRUCache[str, bool] = LRUCache(maxsize=65536)

    @property
    def store(self) -> Store:
        return self.learner.store

    @property
    def store_healthy(self) -> bool:
        return self.learner.store_healthy

    # -- scopes ----------------------------------------------------------------------------

    def scope(self, key: WorkloadKey, labels: dict[str, str] | None = None) -> Scope:
        return self.registry.get(key, labels)

    def labels_of(self, key: WorkloadKey) -> dict[str, str]:
        return self.registry.labels_of(key)

    def set_rules(self, rules: Rules) -> None:
        """New static rules (the rules file changed): every scope they change is re-pushed."""
        for key in self.registry.set_rules(rules):
            self._repush(key)

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
            self._repush(workload)

    def _repush(self, workload: WorkloadKey, changed: str = inputs.SCOPE) -> None:
        for session in self.sessions.of(workload):
            session.refresh(frozenset({changed}))

    # -- streams ---------------------------------------------------------------------------

    def view_for(self, node) -> ResourceView:
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
        if istio.proxyless:
            # docs/protocol.md R29. gRPC's own xDS client cannot follow the catch-all to the
            # egress (it ignores `request_headers_to_add`), and its tables are named by
            # cluster, not port: relayed as Istiod sent it.
            return UNSCOPED
        if is_egress(istio.labels):
            return EgressView(self.settings, self.tables)
        # Compact mode only where the tunnel is known to work: an older Envoy would reject the
        # mesh chains' tunnelling config, and its out-of-scope VIPs would then go nowhere.
        tunnel = (
            supports_tunnel(istio.istio_version) is not False and istio.id not in self._no_tunnel
        )
        return SidecarView(
            self.scope(istio.workload_key, istio.labels),
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
        self.sessions.open(session, istio)
        self.metrics.egress_nodes.set(len(self.sessions.egress))
        return self._view(istio)

    def closed(self, session: Session) -> None:
        self.sessions.close(session)
        self.metrics.egress_nodes.set(len(self.sessions.egress))

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
        if self.sessions.node(session) is not None:
            session.refresh(frozenset({inputs.TUNNEL}))

    def upstream_applied(self, session: Session, applied: UpstreamApplied) -> None:
        """Istiod's config as a stream just stored it: the services it names (held access log
        entries wait for them), the egress's endpoints (fail-open), and a namespace's route
        tables (the egress's caller routes read them)."""
        istio = self.sessions.node(session)
        if istio is None:
            return
        type_url = applied.type_url
        if type_url == typeurls.CLUSTER:
            self._note_services(applied.upstream.names)
        if type_url == typeurls.ENDPOINT and self.fail_open.mode != "never":
            self._note_egress_endpoints(applied.upstream)
        routes_changed = (
            type_url == typeurls.ROUTE
            and session not in self.sessions.egress
            and self.tables.record(istio.namespace, applied.upstream)
        )
        if routes_changed:
            for egress in list(self.sessions.egress):
                egress.refresh(frozenset({inputs.MESH_ROUTE_TABLES}))

    def _note_services(self, names: tuple[str, ...]) -> None:
        released, new = self.learner.note_services(names)
        for held in released:
            self._spawn(self.learner.observe(held.record, held.started))
        if new and (problem := self.egress_problem()):
            self._warn.warning("egress", problem)

    def egress_problem(self) -> str:
        """Why `--egress` cannot work, once Istiod's clusters are known: every catch-all would
        route to a cluster that does not exist."""
        known = self.learner.known_services
        if not known or self.egress in known:
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

    # -- fail-open -------------------------------------------------------------------------
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
        for workload in self.sessions.workloads():
            self._repush(workload, inputs.FAIL_OPEN)

    # -- access logs -----------------------------------------------------------------------

    def als_role(self, ip: str) -> str | None:
        """`egress` for a connected egress node or an `--als-allow` network (its entries
        teach), `sidecar` for a connected sidecar (its sampled entries only refresh last seen),
        None for anyone else."""
        nodes = self.sessions.at(ip)
        if any(is_egress(node.labels) for node in nodes):
            return "egress"
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if any(address in network for network in self.als_allow):
            return "egress"
        return "sidecar" if nodes else None

    # -- state -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every scope from the store before the first stream is served."""
        learner = self.learner
        await self.store.start(learner.apply_remote, self.apply_static, learner.apply_forgotten)
        await learner.load()
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
            await self.learner.flush()
        await self.store.close()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.learner.maintain()
