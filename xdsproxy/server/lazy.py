"""Lazy mode's runtime: scopes per workload, the egress's shared tables, and re-pushes.

Everything here runs on the event loop thread; the views and scopes it hands out are pure.
"""

import ipaddress
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from envoy.config.core.v3.base_pb2 import Node

from xdsproxy.debug.metrics import Metrics
from xdsproxy.istio.names import ServicePort, cluster_name, outbound_cluster
from xdsproxy.istio.node import IstioNode, NodeIdError, parse_node
from xdsproxy.learn.attribution import AccessRecord, Learned, attribute
from xdsproxy.logs import RateLimitedLog
from xdsproxy.scope.egress import EgressSettings, EgressView, is_egress
from xdsproxy.scope.mesh import MeshTables
from xdsproxy.scope.rules import Rules
from xdsproxy.scope.scope import Scope, WorkloadKey
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.server.ads import Session
from xdsproxy.wire import typeurls
from xdsproxy.xds.events import Event
from xdsproxy.xds.view import PASS_THROUGH, ResourceView

log = logging.getLogger("xdsproxy.lazy")


class LazyRuntime:
    def __init__(
        self,
        egress: ServicePort,
        settings: EgressSettings,
        rules: Rules | None = None,
        als_allow: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.egress_cluster = cluster_name(egress)
        self.settings = settings
        self.rules = rules or Rules()
        self.als_allow = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in als_allow)
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.scopes: dict[WorkloadKey, Scope] = {}
        self.tables = MeshTables()
        self.known_services: set[ServicePort] = set()
        self.rejections: Counter[str] = Counter()  # mirrored in metrics.als_rejections
        self.learns = 0
        # Seconds from the egress seeing the request to the re-push being queued, per learn.
        self.learn_latencies: list[float] = []
        self.deliver: Callable[[Session, list[Event]], None] = lambda session, events: None
        self._nodes: dict[int, IstioNode] = {}
        self._by_workload: dict[WorkloadKey, set[Session]] = defaultdict(set)
        self._egress: set[Session] = set()
        self._warn = RateLimitedLog(log)

    # -- streams ---------------------------------------------------------------------------

    def scope(self, key: WorkloadKey, labels: dict[str, str] | None = None) -> Scope:
        scope = self.scopes.get(key)
        if scope is None:
            scope = self.scopes[key] = Scope(key)
        if labels is not None:
            scope.set_static(self.rules.patterns_for(key.namespace, labels))
        return scope

    def view_for(self, node: Node) -> ResourceView:
        try:
            istio = parse_node(node)
        except NodeIdError:
            return PASS_THROUGH  # Istiod judges it; nothing to scope by
        if is_egress(istio.labels):
            return EgressView(self.settings, self.tables)
        key = WorkloadKey(istio.namespace, istio.workload)
        return SidecarView(self.scope(key, istio.labels), self.egress_cluster)

    def opened(self, session: Session) -> None:
        node = session.stream.node
        try:
            istio = parse_node(node) if node is not None else None
        except NodeIdError:
            return
        if istio is None:
            return
        self._nodes[session.id] = istio
        if is_egress(istio.labels):
            self._egress.add(session)
        else:
            self._by_workload[WorkloadKey(istio.namespace, istio.workload)].add(session)

    def closed(self, session: Session) -> None:
        istio = self._nodes.pop(session.id, None)
        if istio is None:
            return
        self._egress.discard(session)
        self._by_workload[WorkloadKey(istio.namespace, istio.workload)].discard(session)

    def upstream_applied(self, session: Session, type_url: str) -> None:
        istio = self._nodes.get(session.id)
        if istio is None:
            return
        if type_url == typeurls.CLUSTER:
            self._note_services(session.stream.upstream(typeurls.CLUSTER)[0])
        routes_changed = (
            type_url == typeurls.ROUTE
            and session not in self._egress
            and self.tables.record(istio.namespace, session.stream.upstream(typeurls.ROUTE))
        )
        if routes_changed:
            for egress in list(self._egress):
                self.deliver(egress, egress.stream.refresh())

    def _note_services(self, names: tuple[str, ...]) -> None:
        for name in names:
            parsed = outbound_cluster(name)
            if parsed is not None:
                self.known_services.add(parsed[0])

    # -- learning --------------------------------------------------------------------------

    def workloads_at(self, ip: str) -> frozenset[WorkloadKey]:
        return frozenset(
            WorkloadKey(node.namespace, node.workload)
            for session_id, node in self._nodes.items()
            if ip in node.instance_ips and not is_egress(node.labels)
        )

    def service_accounts(self, workload: WorkloadKey) -> frozenset[str]:
        return frozenset(
            node.service_account
            for node in self._nodes.values()
            if WorkloadKey(node.namespace, node.workload) == workload
        )

    def als_peer_allowed(self, ip: str) -> bool:
        if any(ip in node.instance_ips for node in self._nodes.values() if is_egress(node.labels)):
            return True
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.als_allow)

    def reject(self, reason: str) -> None:
        self.rejections[reason] += 1
        self.metrics.als_rejections.labels(reason).inc()

    def observe(self, record: AccessRecord, started: float) -> Learned | None:
        """Attribute one access log entry; widen and re-push the scope when it is new."""
        result = attribute(record, self, self.known_services.__contains__)
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
        now = self.clock()
        if scope.learn(result.service, started or now):
            self.learns += 1
            self.metrics.learns.inc()
            if started:
                self.learn_latencies.append(max(0.0, now - started))
                self.metrics.learn_latency.observe(max(0.0, now - started))
            log.info(
                "learned", extra={"workload": str(result.workload), "service": str(result.service)}
            )
            for session in list(self._by_workload.get(result.workload, ())):
                self.deliver(session, session.stream.refresh())
        return result
