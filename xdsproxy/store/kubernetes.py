"""`kubernetes://NAMESPACE`: one `LazyScope` custom resource per workload, shared by replicas.

`spec` holds the workload and its static hosts; `status.learned` the learned hosts with
`firstSeen`, `lastSeen` and who learned each (`learnedBy`); `status.forgotten` the hosts an
operator forgot (`xdsproxy scope forget`) with when, so that every replica drops its copy
learned before then and no late write brings one back (kept for an hour). Writes replace the
status subresource with the resourceVersion read, and retry on 409 Conflict, so concurrent
replicas never lose each other's edges. A watch from the listed resourceVersion delivers edges
other replicas learned; on 410 Gone the store lists again and carries on from there. Remote
changes only widen scopes and move last seen forward (an operator's forget aside): every
replica ages by itself, with the evidence all of them write.

The official `kubernetes` client is synchronous; calls run in worker threads.
"""

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from xdsproxy.istio.names import ServicePort
from xdsproxy.model import Edge, WorkloadKey
from xdsproxy.store.base import (
    ChangeCallback,
    Edges,
    ForgetCallback,
    Forgotten,
    StaticCallback,
    StoreError,
    Touch,
)

log = logging.getLogger("xdsproxy.store.kubernetes")

GROUP, VERSION, PLURAL, KIND = "xdsproxy.io", "v1alpha1", "lazyscopes", "LazyScope"
_RETRIES = 20
_TOMBSTONE_SECONDS = 3600.0


def api_client() -> client.ApiClient:
    """The pod's service account in a cluster, else the kubeconfig (KUBECONFIG or ~/.kube)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def explain(exc: ApiException) -> str:
    """One line for an API error, with the likely fix for the usual ones."""
    hints = {
        401: "unauthorized: the service account token was refused",
        403: "forbidden: is the RBAC of deploy/base/rbac.yaml applied to this service account?",
        404: "not found: is the LazyScope CRD (deploy/base/crd-lazyscope.yaml) installed?",
    }
    return hints.get(exc.status, f"HTTP {exc.status} {exc.reason}")


def resource_name(workload: WorkloadKey) -> str:
    """`ns.workload`: both are DNS labels, so the join is a valid object name."""
    return f"{workload.namespace}.{workload.workload}"


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def edges_of(obj: dict[str, Any]) -> tuple[WorkloadKey, Edges] | None:
    spec = obj.get("spec") or {}
    target = spec.get("workload") or {}
    if not target.get("namespace") or not target.get("name"):
        return None
    edges: Edges = {}
    for entry in (obj.get("status") or {}).get("learned") or []:
        try:
            service = ServicePort(str(entry["host"]), int(entry["port"]))
            edges[service] = Edge(
                _seconds(entry["firstSeen"]),
                _seconds(entry["lastSeen"]),
                learned_by=str(entry.get("learnedBy", "")),
            )
        except (KeyError, ValueError, TypeError):
            log.warning(
                "skipping a malformed learned entry", extra={"object": obj["metadata"]["name"]}
            )
    return WorkloadKey(target["namespace"], target["name"]), edges


def forgotten_of(obj: dict[str, Any]) -> Forgotten:
    out: Forgotten = {}
    for entry in (obj.get("status") or {}).get("forgotten") or []:
        try:
            out[ServicePort(str(entry["host"]), int(entry["port"]))] = _seconds(entry["at"])
        except (KeyError, ValueError, TypeError):
            log.warning(
                "skipping a malformed forgotten entry", extra={"object": obj["metadata"]["name"]}
            )
    return out


def _status(edges: Edges, forgotten: Forgotten) -> dict[str, Any]:
    learned = []
    for s, e in sorted(edges.items()):
        entry = {
            "host": s.host,
            "port": s.port,
            "firstSeen": _time(e.first_seen),
            "lastSeen": _time(e.last_seen),
        }
        if e.learned_by:
            entry["learnedBy"] = e.learned_by
        learned.append(entry)
    status: dict[str, Any] = {"learnedCount": len(edges), "learned": learned}
    if forgotten:
        status["forgotten"] = [
            {"host": s.host, "port": s.port, "at": _time(at)} for s, at in sorted(forgotten.items())
        ]
    return status


class KubernetesStore:
    def __init__(
        self,
        namespace: str,
        api_client: client.ApiClient | None = None,
        watch_timeout: int = 60,
    ) -> None:
        self.namespace = namespace
        self.watch_timeout = watch_timeout
        self._client = api_client
        self._api: client.CustomObjectsApi | None = None
        self._on_change: ChangeCallback | None = None
        self._on_static: StaticCallback | None = None
        self._on_forget: ForgetCallback | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resource_version = ""
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.relists = 0

    def _custom(self) -> client.CustomObjectsApi:
        if self._api is None:
            if self._client is None:
                self._client = api_client()
            self._api = client.CustomObjectsApi(self._client)
        return self._api

    async def _call(self, work, *args):
        try:
            return await asyncio.to_thread(work, *args)
        except ApiException as exc:
            raise StoreError(f"kubernetes://{self.namespace}: {explain(exc)}") from exc
        except (HTTPError, OSError) as exc:
            raise StoreError(f"kubernetes://{self.namespace}: {exc}") from exc

    # -- reading ---------------------------------------------------------------------------

    def _list(self) -> dict[WorkloadKey, Edges]:
        listing = self._custom().list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL
        )
        self._resource_version = listing["metadata"]["resourceVersion"]
        out: dict[WorkloadKey, Edges] = {}
        for obj in listing.get("items", []):
            self._emit_static(obj)
            self._emit_forgotten(obj)
            parsed = edges_of(obj)
            if parsed:
                out[parsed[0]] = parsed[1]
        return out

    async def start(
        self,
        on_change: ChangeCallback | None = None,
        on_static: StaticCallback | None = None,
        on_forget: ForgetCallback | None = None,
    ) -> None:
        self._on_change = on_change
        self._on_static = on_static
        self._on_forget = on_forget
        self._loop = asyncio.get_running_loop()

    async def load(self) -> dict[WorkloadKey, Edges]:
        edges = await self._call(self._list)
        listening = (self._on_change, self._on_static, self._on_forget)
        if any(c is not None for c in listening) and self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, daemon=True, name="lazyscope-watch"
            )
            self._watcher.start()
        return edges

    def _emit(self, workload: WorkloadKey, edges: Edges) -> None:
        if self._on_change is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_change, workload, edges)

    def _emit_forgotten(self, obj: dict[str, Any]) -> None:
        parsed = edges_of(obj)
        forgotten = forgotten_of(obj)
        if parsed and forgotten and self._on_forget is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_forget, parsed[0], forgotten)

    def _emit_static(self, obj: dict[str, Any]) -> None:
        spec = obj.get("spec") or {}
        target = spec.get("workload") or {}
        if self._on_static is None or self._loop is None or not target.get("name"):
            return
        hosts = tuple(str(h) for h in spec.get("hosts") or [])
        workload = WorkloadKey(str(target.get("namespace", "")), str(target["name"]))
        self._loop.call_soon_threadsafe(self._on_static, workload, hosts)

    def _watch(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self._custom().list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    resource_version=self._resource_version,
                    timeout_seconds=self.watch_timeout,
                ):
                    if self._stop.is_set():
                        break
                    obj = event["object"]
                    self._resource_version = obj["metadata"]["resourceVersion"]
                    parsed = edges_of(obj)
                    if parsed and event["type"] in ("ADDED", "MODIFIED"):
                        self._emit_static(obj)
                        self._emit_forgotten(obj)
                        self._emit(*parsed)
            except ApiException as exc:
                if exc.status == 410:  # compacted: list again and go on from there
                    self.relists += 1
                    try:
                        for workload, edges in self._list().items():
                            self._emit(workload, edges)
                    except (ApiException, HTTPError, OSError) as again:
                        log.warning("re-list failed", extra={"error": str(again)})
                        self._stop.wait(1.0)
                else:
                    log.warning("watch failed", extra={"error": str(exc)})
                    self._stop.wait(1.0)
            except (HTTPError, OSError) as exc:
                log.warning("watch failed", extra={"error": str(exc)})
                self._stop.wait(1.0)
            finally:
                stream.stop()

    # -- writing ---------------------------------------------------------------------------

    def _update(self, workload: WorkloadKey, change: Callable[[Edges, Forgotten], bool]) -> None:
        """Read, change the learned and forgotten entries, write back with the resourceVersion
        read; on 409 read again and redo the change."""
        api, name = self._custom(), resource_name(workload)
        for attempt in range(_RETRIES):
            try:
                obj = api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "metadata": {"name": name},
                    "spec": {
                        "workload": {"namespace": workload.namespace, "name": workload.workload},
                        "hosts": [],
                    },
                }
                with contextlib.suppress(ApiException):
                    api.create_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, PLURAL, body
                    )
                continue
            parsed = edges_of(obj)
            edges = parsed[1] if parsed else {}
            forgotten = forgotten_of(obj)
            if not change(edges, forgotten):
                return
            obj["status"] = _status(edges, forgotten)
            try:
                api.replace_namespaced_custom_object_status(
                    GROUP, VERSION, self.namespace, PLURAL, name, obj
                )
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
            # Another replica wrote first: back off with jitter so contenders spread out.
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))
        raise StoreError(f"{name}: still conflicting after {_RETRIES} attempts")

    async def add(
        self, workload: WorkloadKey, service: ServicePort, seen: float, by: str = ""
    ) -> None:
        def change(edges: Edges, forgotten: Forgotten) -> bool:
            if service in edges or forgotten.get(service, -1.0) >= seen:
                return False  # known, or seen before an operator forgot it: the forget wins
            forgotten.pop(service, None)
            edges[service] = Edge(seen, seen, learned_by=by)
            return True

        await self._call(self._update, workload, change)

    async def touch(self, updates: Iterable[Touch]) -> None:
        by_workload: dict[WorkloadKey, dict[ServicePort, float]] = {}
        for update in updates:
            seen = by_workload.setdefault(update.workload, {})
            seen[update.service] = max(seen.get(update.service, 0.0), update.last_seen)
        for workload, seen in by_workload.items():

            def change(
                edges: Edges, forgotten: Forgotten, seen: dict[ServicePort, float] = seen
            ) -> bool:
                changed = False
                for service, when in seen.items():
                    edge = edges.get(service)
                    if edge is None:
                        # Aged out elsewhere while still in use here: put back, unless an
                        # operator forgot it (only a new learn brings that back).
                        if service not in forgotten:
                            edges[service] = Edge(when, when)
                            changed = True
                    elif when > edge.last_seen:
                        edge.last_seen = when
                        changed = True
                return changed

            await self._call(self._update, workload, change)

    async def forget(
        self, workload: WorkloadKey, services: Iterable[ServicePort], at: float | None = None
    ) -> None:
        gone = set(services)

        def change(edges: Edges, forgotten: Forgotten) -> bool:
            removed = [s for s in gone if edges.pop(s, None) is not None]
            if at is None:
                return bool(removed)
            for service in gone:
                forgotten[service] = max(at, forgotten.get(service, 0.0))
            for service, when in list(forgotten.items()):
                if when < at - _TOMBSTONE_SECONDS:
                    del forgotten[service]
            return True

        await self._call(self._update, workload, change)

    async def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            # A daemon thread blocked in a watch read ends with the process at the latest.
            await asyncio.to_thread(self._watcher.join, 1.0)
