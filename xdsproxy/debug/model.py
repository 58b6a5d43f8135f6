"""What the debug endpoint shows, as plain JSON-ready dicts built from live sessions. Nothing
here reads gRPC metadata, so no token can reach the output."""

import time
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import DecodeError

from xdsproxy.istio.names import ServicePort, outbound_cluster, service_fqdn
from xdsproxy.istio.node import IstioNode, NodeIdError, parse_node
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.contract import is_egress
from xdsproxy.scope.explain import DIRECT, EGRESS, WITHHELD, explain
from xdsproxy.scope.scope import HostPattern, Scope
from xdsproxy.scope.sidecar_resource import NoSelector, sidecar_resource
from xdsproxy.server.ads import AdsProxy, Session
from xdsproxy.server.lazy import LazyRuntime
from xdsproxy.wire import typeurls
from xdsproxy.wire.registry import load_envoy_types
from xdsproxy.wire.typeurls import short_name
from xdsproxy.xds.view import Selection


class NotFound(LookupError):
    pass


class BadRequest(ValueError):
    pass


def workload_key(text: str) -> WorkloadKey:
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise BadRequest(f"workload {text!r}: give NAMESPACE/NAME")
    return WorkloadKey(namespace, name)


def service_query(text: str) -> tuple[str, int | None]:
    """`HOST[:PORT]` -> (host, port or None), refused as `HostPattern` refuses it."""
    try:
        pattern = HostPattern.parse(text)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if pattern.namespace != "*" or any(c in pattern.host for c in "*?["):
        raise BadRequest(f"{text!r}: give one service, HOST or HOST:PORT, no namespace or glob")
    return pattern.host, pattern.port


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _istio(session: Session) -> IstioNode | None:
    node = session.stream.node
    try:
        return parse_node(node) if node is not None else None
    except NodeIdError:
        return None


def _role(istio: IstioNode | None) -> str:
    """`egress` for the lazy egress, `gateway` for a router, `sidecar`, or `other`."""
    if istio is None:
        return "other"
    if istio.proxy_type != "sidecar":
        return "gateway"
    return "egress" if is_egress(istio.labels) else "sidecar"


def _workload(session: Session) -> WorkloadKey | None:
    istio = _istio(session)
    return istio.workload_key if istio else None


class DebugModel:
    """`replica` names this process in rows merged from several replicas (the pod name in a
    cluster); `istiod` is the upstream it dials."""

    def __init__(
        self, proxy: AdsProxy, runtime: LazyRuntime | None, replica: str = "", istiod: str = ""
    ) -> None:
        self.proxy = proxy
        self.runtime = runtime
        self.replica = replica or "local"
        self.istiod = istiod

    def _session(self, node_id: str) -> Session:
        for session in self.proxy.sessions.values():
            if session.node_id == node_id:
                return session
        raise NotFound(f"no connected node {node_id!r}")

    def node_row(self, session: Session) -> dict[str, Any]:
        istio = _istio(session)
        types = {}
        for type_url, status in session.stream.status().items():
            types[short_name(type_url)] = {
                "type_url": type_url,
                "state": status.state,
                "upstream": {
                    "resources": status.upstream_resources,
                    "bytes": status.upstream_bytes,
                    "version": status.upstream_version,
                },
                "pushed": {
                    "resources": status.pushed_resources,
                    "bytes": status.pushed_bytes,
                    "version": status.pushed_version,
                },
                "acked_version": status.acked_version,
                "last_nack": status.last_nack or None,
                "nacks": status.nack_count,
                "held_back": None,
            }
        now = time.monotonic()
        for type_url, hold in session.stream.holds().items():
            # A push waiting for its inputs or for clusters to warm (docs/protocol.md R9, R11)
            types[short_name(type_url)]["held_back"] = {
                "why": hold.why.value,
                "seconds": round(now - hold.since, 3),
                "istiods": bool(hold.upstream_nonce),
                "until": sorted(hold.until)[:20],
            }
        cds = types.get("CDS")
        withheld = cds["upstream"]["resources"] - cds["pushed"]["resources"] if cds else 0
        return {
            "node": session.node_id,
            "role": _role(istio),
            "workload": f"{istio.namespace}/{istio.workload}" if istio else None,
            "pod": f"{istio.pod}.{istio.namespace}" if istio else None,
            "istio_version": istio.istio_version if istio else "",
            "replica": self.replica,
            "istiod": self.istiod,
            "protocol": session.protocol,
            "connected_since": _time(session.connected_at),
            "types": types,
            "saved": {
                "clusters": max(0, withheld),
                # Never below zero: the egress is pushed more than Istiod sends it (its SRDS).
                "bytes": max(
                    0, sum(t["upstream"]["bytes"] - t["pushed"]["bytes"] for t in types.values())
                ),
            },
        }

    def nodes(self) -> list[dict[str, Any]]:
        return sorted(
            (self.node_row(s) for s in self.proxy.sessions.values()), key=lambda row: row["node"]
        )

    def node(self, node_id: str) -> dict[str, Any]:
        session = self._session(node_id)
        row = self.node_row(session)
        row["dependencies"] = self._dependencies(session)
        return row

    def _dependencies(self, session: Session) -> list[dict[str, Any]]:
        workload = _workload(session)
        out: list[dict[str, Any]] = []
        if self.runtime is not None and workload is not None:
            scope = self.runtime.scope(workload)
            for service, edge in sorted(scope.learned.items()):
                out.append(
                    {
                        "host": service.host,
                        "port": service.port,
                        "origin": "learned",
                        "first_seen": _time(edge.first_seen),
                        "last_seen": _time(edge.last_seen),
                    }
                )
            for pattern in scope.static:
                host = (
                    pattern.host
                    if pattern.namespace == "*"
                    else (f"{pattern.namespace}/{pattern.host}")
                )
                out.append({"host": host, "port": pattern.port, "origin": "static"})
        for name in session.stream.pushed(typeurls.CLUSTER).names:
            if outbound_cluster(name) is None:
                out.append({"host": name, "port": None, "origin": "always"})
        return out

    def workloads(self) -> list[dict[str, Any]]:
        connected: dict[WorkloadKey, list[str]] = {}
        for session in self.proxy.sessions.values():
            if (workload := _workload(session)) is not None:
                connected.setdefault(workload, []).append(session.node_id)
        keys = set(connected) | (set(self.runtime.scopes) if self.runtime else set())
        rows = []
        for key in sorted(keys):
            scope = self.runtime.scopes.get(key) if self.runtime else None
            rows.append(
                {
                    "workload": str(key),
                    "nodes": sorted(connected.get(key, [])),
                    "learned": len(scope.learned) if scope else 0,
                    "static": [str(p.host) for p in scope.static] if scope else [],
                    "scope_version": scope.version if scope else 0,
                }
            )
        return rows

    # -- scopes (`xdsproxy scope`) ---------------------------------------------------------

    def _lazy(self) -> LazyRuntime:
        if self.runtime is None:
            raise NotFound("this replica runs in passthrough mode: no workload has a scope")
        return self.runtime

    def _services(self, key: WorkloadKey, host: str, port: int | None) -> list[ServicePort]:
        """The services `host` names: those Istiod sent here and those in the workload's
        scope; with a port, that one service even if neither knows it."""
        known = self._lazy().learner.services_named(host, port, key)
        if known:
            return known
        if port is None:
            raise NotFound(
                f"Istiod has sent this replica no service {host!r}; give HOST:PORT to add it "
                "anyway, or check the name with `xdsproxy config clusters`"
            )
        return [ServicePort(service_fqdn(host), port)]

    def _sessions_of(self, key: WorkloadKey) -> list[Session]:
        return [s for s in self.proxy.sessions.values() if _workload(s) == key]

    def why(self, workload: str, service: str) -> dict[str, Any]:
        key = workload_key(workload)
        host, port = service_query(service)
        runtime = self._lazy()
        learner = runtime.learner
        services = self._services(key, host, port)
        scope = runtime.scopes.get(key) or Scope(key)
        sessions = self._sessions_of(key)
        clusters, referrers = _pushed_clusters(sessions[0], services) if sessions else ({}, {})
        return {
            "workload": str(key),
            "replica": self.replica,
            "sidecars": sorted(s.node_id for s in sessions),
            "known": bool(learner.services_named(host, port)),
            "services": explain(
                scope, services, lambda s: learner.dropped.get((key, s)), clusters, referrers
            ),
        }

    async def add(self, workload: str, service: str) -> dict[str, Any]:
        key = workload_key(workload)
        services = self._services(key, *service_query(service))
        added = await self._lazy().learner.add_dependencies(key, services)
        return {
            "workload": str(key),
            "replica": self.replica,
            "services": list(map(str, services)),
            "added": added,
        }

    async def forget(self, workload: str, service: str) -> dict[str, Any]:
        key = workload_key(workload)
        runtime = self._lazy()
        services = self._services(key, *service_query(service))
        removed = await runtime.learner.forget_dependencies(key, services)
        return {
            "workload": str(key),
            "replica": self.replica,
            "services": list(map(str, services)),
            "removed": removed,
        }

    def export(self, workload: str | None) -> dict[str, Any]:
        """Istio Sidecar resources holding each workload's current scope; workloads whose
        labels are unknown here are listed as skipped, with why."""
        runtime = self._lazy()
        keys = [workload_key(workload)] if workload else sorted(runtime.scopes)
        now = _time(runtime.clock())
        resources, skipped = [], []
        for key in keys:
            scope = runtime.scopes.get(key)
            if scope is None:
                raise NotFound(f"no scope for workload {key} on this replica")
            try:
                resources.append(
                    sidecar_resource(scope, runtime.labels_of(key), runtime.egress, now)
                )
            except NoSelector as exc:
                skipped.append({"workload": str(key), "why": str(exc)})
        return {"replica": self.replica, "resources": resources, "skipped": skipped}

    def config_dump(self, node_id: str, view: str, only: str = "") -> dict[str, Any]:
        """Every resource of the node's subscribed types, or of `only` (`CDS`, `LDS`...)."""
        if view not in ("upstream", "pushed"):
            raise ValueError("view must be upstream or pushed")
        stream = self._session(node_id).stream
        types = [t for t in stream.status() if not only or short_name(t) == only]
        out: dict[str, Any] = {"node": node_id, "view": view, "types": {}}
        for type_url in types:
            names, bodies = (
                stream.upstream(type_url) if view == "upstream" else (stream.pushed(type_url))
            )
            out["types"][short_name(type_url)] = [
                _resource(name, body) for name, body in zip(names, bodies, strict=True)
            ]
        return out


def _resource(name: str, body: bytes) -> dict[str, Any]:
    """The resource as JSON; a resource holding types a stock Envoy (and so xds-protos) does
    not know, Istio's own included, is shown by type URL and size only."""
    load_envoy_types()
    try:
        packed = AnyMessage.FromString(body)
    except DecodeError:
        return {"name": name, "opaque": {"type_url": "", "size": len(body)}}
    try:
        resource = json_format.MessageToDict(packed, preserving_proto_field_name=True)
    except (TypeError, KeyError, DecodeError, json_format.Error):
        return {"name": name, "opaque": {"type_url": packed.type_url, "size": len(body)}}
    return {"name": name, "resource": resource}


def _pushed_clusters(
    session: Session, services: list[ServicePort]
) -> tuple[dict[ServicePort, dict[str, str]], dict[str, list[str]]]:
    """How each cluster of `services` went to the sidecar (Istio's own, a placeholder routing
    to the egress, or withheld), and which pushed listeners and route tables reference each."""
    stream = session.stream
    wanted = set(services)
    pushed = dict(zip(*stream.pushed(typeurls.CLUSTER), strict=True))
    clusters: dict[ServicePort, dict[str, str]] = {}
    for name, body in zip(*stream.upstream(typeurls.CLUSTER), strict=True):
        parsed = outbound_cluster(name)
        if parsed is None or parsed.service not in wanted:
            continue
        sent = pushed.get(name)
        how = WITHHELD if sent is None else DIRECT if sent == body else EGRESS
        clusters.setdefault(parsed.service, {})[name] = how
    names = {name for per in clusters.values() for name in per}
    referrers: dict[str, list[str]] = {}
    for type_url, kind in ((typeurls.LISTENER, "listener"), (typeurls.ROUTE, "route table")):
        for name, body in zip(*stream.pushed(type_url), strict=True):
            for cluster in stream.view.references(type_url, Selection((name,), (body,))) & names:
                referrers.setdefault(cluster, []).append(f"{kind} {name}")
    return clusters, referrers
