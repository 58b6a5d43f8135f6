"""An in-process STAND-IN for the Kubernetes API server, for the LazyScope custom resource and
the cluster-wide list and watch of Pods (`/api/v1/pods`), and the lists of ServiceCIDRs and of
a namespace's EndpointSlices (by `kubernetes.io/service-name` label) only.

No Kubernetes API server can run on these machines, so the Kubernetes store is tested against
this. It implements what the store uses, as the real API server does it: list with a
resourceVersion, get, create (409 AlreadyExists), replace of the object and of its status
subresource with optimistic concurrency (409 Conflict on a stale resourceVersion), and watch
from a resourceVersion with ADDED/MODIFIED/DELETED events, answering 410 Gone (as an ERROR
event) once that version has been compacted away. Pods are written by the test itself
(`apply_pod`, `delete_pod`), as the kubelet and controllers would. It is not a Kubernetes API
server: no authentication, no admission, no field selectors, two resource types.
"""

import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

GROUP, VERSION, PLURAL, KIND = "xdsproxy.io", "v1alpha1", "lazyscopes", "LazyScope"
_PATH = re.compile(
    rf"^/apis/{re.escape(GROUP)}/{VERSION}/namespaces/(?P<ns>[^/]+)/{PLURAL}"
    r"(?:/(?P<name>[^/?]+))?(?P<status>/status)?$"
)
_PODS_PATH = "/api/v1/pods"
_SERVICE_CIDRS_PATH = "/apis/networking.k8s.io/v1/servicecidrs"
_SLICES_PATH = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/endpointslices$")


class _State:
    def __init__(self, history: int) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 1
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # LazyScopes and Pods
        self.history = history
        self.changed = threading.Condition()
        self.conflicts = 0
        self.watch_generation = 0  # bumping it ends every open watch
        self.accepting_watches = threading.Event()
        self.accepting_watches.set()
        # The ServiceCIDR objects' ranges; None answers 404, as a cluster before 1.33 does.
        self.service_cidrs: list[str] | None = None
        self.endpoint_slices: list[dict[str, Any]] = []  # see `endpoint_slice`

    def commit(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.changed:
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.events.append((self.version, kind, copy.deepcopy(obj)))
            del self.events[: max(0, len(self.events) - self.history)]
            self.changed.notify_all()
            return obj

    def oldest(self) -> int:
        return self.events[0][0] if self.events else self.version


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class _Handler(BaseHTTPRequestHandler):
    server: "KubeApiStandIn"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _route(self) -> tuple[re.Match[str] | None, dict[str, str]]:
        path, _, query = self.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        return _PATH.match(path), params

    def do_GET(self) -> None:
        match, params = self._route()
        state = self.server.state
        if self.path.partition("?")[0] == _PODS_PATH:
            return self._pods(params)
        if self.path.partition("?")[0] == _SERVICE_CIDRS_PATH:
            return self._service_cidrs()
        if slices := _SLICES_PATH.match(self.path.partition("?")[0]):
            return self._endpoint_slices(slices["ns"], params)
        if match is None:
            return self._send(404, _status(404, "NotFound", self.path))
        ns, name = match["ns"], match["name"]
        if name:
            obj = state.objects.get((ns, name))
            if obj is None:
                return self._send(404, _status(404, "NotFound", f"{PLURAL} {name!r} not found"))
            return self._send(200, obj)
        if params.get("watch") in ("true", "1"):
            since = int(params.get("resourceVersion") or state.version)
            return self._watch(ns, since, float(params.get("timeoutSeconds") or 300))
        with state.changed:
            items = [copy.deepcopy(o) for (n, _), o in sorted(state.objects.items()) if n == ns]
            version = state.version
        self._send(
            200,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": f"{KIND}List",
                "metadata": {"resourceVersion": str(version)},
                "items": items,
            },
        )

    def _service_cidrs(self) -> None:
        cidrs = self.server.state.service_cidrs
        if cidrs is None:
            return self._send(404, _status(404, "NotFound", self.path))
        item = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": cidrs},
        }
        self._send(
            200,
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "ServiceCIDRList",
                "metadata": {"resourceVersion": "1"},
                "items": [item],
            },
        )

    def _endpoint_slices(self, namespace: str, params: dict[str, str]) -> None:
        """Only the equality selector `kubernetes.io/service-name=NAME` is understood."""
        selector = unquote(params.get("labelSelector", ""))
        key, _, value = selector.partition("=")
        items = [
            copy.deepcopy(item)
            for item in self.server.state.endpoint_slices
            if item["metadata"]["namespace"] == namespace
            and (not selector or item["metadata"].get("labels", {}).get(key) == value)
        ]
        self._send(
            200,
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": str(self.server.state.version)},
                "items": items,
            },
        )

    def _pods(self, params: dict[str, str]) -> None:
        state = self.server.state
        if params.get("watch") in ("true", "1"):
            since = int(params.get("resourceVersion") or state.version)
            return self._watch(None, since, float(params.get("timeoutSeconds") or 300))
        with state.changed:
            items = [copy.deepcopy(o) for _, o in sorted(state.pods.items())]
            version = state.version
        self._send(
            200,
            {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": str(version)},
                "items": items,
            },
        )

    def _watch(self, ns: str | None, since: int, timeout: float) -> None:
        """Events of one namespace's LazyScopes, or (ns None) of every Pod."""
        state = self.server.state
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        state.accepting_watches.wait(30)
        generation = state.watch_generation
        try:
            with state.changed:
                if since < state.oldest() - 1:
                    chunk(
                        {
                            "type": "ERROR",
                            "object": _status(
                                410,
                                "Expired",
                                f"too old resource version: {since} ({state.oldest()})",
                            ),
                        }
                    )
                    self.wfile.write(b"0\r\n\r\n")
                    return
            deadline = time.monotonic() + timeout
            while (
                not self.server.closing
                and time.monotonic() < deadline
                and generation == state.watch_generation
            ):
                with state.changed:
                    pending = [e for e in state.events if e[0] > since]
                    if not pending:
                        state.changed.wait(0.2)
                        continue
                for version, kind, obj in pending:
                    since = version
                    is_pod = obj.get("kind") == "Pod"
                    if (ns is None and is_pod) or (
                        not is_pod and obj["metadata"]["namespace"] == ns
                    ):
                        chunk({"type": kind, "object": obj})
            self.wfile.write(b"0\r\n\r\n")  # the server ends a watch after timeoutSeconds
        except (BrokenPipeError, ConnectionResetError):
            return

    def do_POST(self) -> None:
        match, _ = self._route()
        if match is None or match["name"]:
            return self._send(405, _status(405, "MethodNotAllowed", self.path))
        state, obj = self.server.state, self._body()
        ns, name = match["ns"], obj.get("metadata", {}).get("name", "")
        with state.changed:
            if (ns, name) in state.objects:
                return self._send(409, _status(409, "AlreadyExists", f"{name!r} exists"))
            obj.pop("status", None)  # the status subresource is ignored on create
            obj["metadata"].update({"namespace": ns, "uid": f"uid-{name}"})
            state.objects[(ns, name)] = state.commit("ADDED", obj)
            self._send(201, obj)

    def do_PUT(self) -> None:
        match, _ = self._route()
        if match is None or not match["name"]:
            return self._send(405, _status(405, "MethodNotAllowed", self.path))
        state, body = self.server.state, self._body()
        key = (match["ns"], match["name"])
        with state.changed:
            current = state.objects.get(key)
            if current is None:
                return self._send(404, _status(404, "NotFound", f"{match['name']!r} not found"))
            if (
                body.get("metadata", {}).get("resourceVersion")
                != current["metadata"]["resourceVersion"]
            ):
                state.conflicts += 1
                return self._send(
                    409,
                    _status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes "
                        "to the latest version and try again",
                    ),
                )
            updated = copy.deepcopy(current)
            if match["status"]:
                updated["status"] = body.get("status", {})
            else:
                updated["spec"] = body.get("spec", {})
            state.objects[key] = state.commit("MODIFIED", updated)
            self._send(200, updated)

    def do_DELETE(self) -> None:
        match, _ = self._route()
        state = self.server.state
        key = (match["ns"], match["name"]) if match and match["name"] else None
        with state.changed:
            if key is None or key not in state.objects:
                return self._send(404, _status(404, "NotFound", self.path))
            obj = state.objects.pop(key)
            state.commit("DELETED", obj)
            self._send(200, obj)


class KubeApiStandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, history: int = 1000) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = _State(history)
        self.closing = False
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def apply_pod(self, pod: dict[str, Any]) -> None:
        """Create or replace a Pod, as the kubelet and controllers would."""
        pod = copy.deepcopy(pod)
        pod.setdefault("apiVersion", "v1")
        pod["kind"] = "Pod"
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self.state.changed:
            kind = "MODIFIED" if key in self.state.pods else "ADDED"
            self.state.pods[key] = self.state.commit(kind, pod)

    def add_endpoint_slice(
        self,
        namespace: str,
        service: str,
        endpoints: list[tuple[str, str, bool]],
        ports: dict[str, int],
    ) -> None:
        """An EndpointSlice of `service`, as its controller writes it: endpoints as
        (address, pod name, ready), ports by name."""
        index = len(self.state.endpoint_slices)
        self.state.endpoint_slices.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{service}-{index}",
                    "namespace": namespace,
                    "labels": {"kubernetes.io/service-name": service},
                },
                "addressType": "IPv4",
                "endpoints": [
                    {
                        "addresses": [address],
                        "conditions": {"ready": ready},
                        "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace},
                    }
                    for address, pod, ready in endpoints
                ],
                "ports": [
                    {"name": name, "port": port, "protocol": "TCP"} for name, port in ports.items()
                ],
            }
        )

    def delete_pod(self, namespace: str, name: str) -> None:
        with self.state.changed:
            pod = self.state.pods.pop((namespace, name))
            self.state.commit("DELETED", pod)

    def compact(self) -> None:
        """Forget every past event, as etcd compaction does: older watches get 410 Gone."""
        with self.state.changed:
            self.state.events.clear()

    def drop_watches(self) -> None:
        """End every open watch and hold new ones back until `resume_watches`."""
        self.state.accepting_watches.clear()
        with self.state.changed:
            self.state.watch_generation += 1

    def resume_watches(self) -> None:
        self.state.accepting_watches.set()

    def __enter__(self) -> "KubeApiStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing = True
        self.shutdown()
        self.server_close()


def write_kubeconfig(path: Path, url: str) -> None:
    """A kubeconfig that points the official client (and kubectl) at the stand-in."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "standin",
                "clusters": [{"name": "standin", "cluster": {"server": url}}],
                "users": [{"name": "standin", "user": {}}],
                "contexts": [
                    {"name": "standin", "context": {"cluster": "standin", "user": "standin"}}
                ],
            }
        )
    )
