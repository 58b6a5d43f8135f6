"""What the debug endpoint shows, as plain JSON-ready dicts built from live sessions. Nothing
here reads gRPC metadata, so no token can reach the output."""

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import DecodeError

from xdsproxy.istio.names import outbound_cluster
from xdsproxy.istio.node import IstioNode, NodeIdError, parse_node
from xdsproxy.scope.egress import is_egress
from xdsproxy.scope.scope import WorkloadKey
from xdsproxy.server.ads import AdsProxy, Session
from xdsproxy.server.lazy import LazyRuntime
from xdsproxy.wire import typeurls
from xdsproxy.wire.registry import load_envoy_types
from xdsproxy.wire.typeurls import short_name


class NotFound(LookupError):
    pass


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
    return WorkloadKey(istio.namespace, istio.workload) if istio else None


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
                "bytes": sum(t["upstream"]["bytes"] - t["pushed"]["bytes"] for t in types.values()),
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
        for name in session.stream.pushed(typeurls.CLUSTER)[0]:
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

    def config_dump(self, node_id: str, view: str) -> dict[str, Any]:
        if view not in ("upstream", "pushed"):
            raise ValueError("view must be upstream or pushed")
        stream = self._session(node_id).stream
        out: dict[str, Any] = {"node": node_id, "view": view, "types": {}}
        for type_url in stream.status():
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
