"""List and watch every Pod with the official Kubernetes client, into a `PodDirectory`.

Runs where the store is Kubernetes (several replicas): any replica can then attribute an
access log entry to a sidecar connected to another. Lists, then watches from the list's
resourceVersion; on 410 Gone (compacted) lists again. Needs `list` and `watch` on pods
cluster-wide, which `deploy/base/rbac.yaml` grants. The client is synchronous: the watch runs
in a daemon thread and hands each event to the event loop, where the directory lives.
"""

import asyncio
import json
import logging
import threading
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from xdsproxy.learn.pods import PodDirectory
from xdsproxy.store.kubernetes import api_client

log = logging.getLogger("xdsproxy.pods")


class PodWatch:
    def __init__(
        self,
        directory: PodDirectory,
        api: client.ApiClient | None = None,
        watch_timeout: int = 60,
    ) -> None:
        self.directory = directory
        self.watch_timeout = watch_timeout
        self.relists = 0
        self._client = api
        self._core: client.CoreV1Api | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resource_version = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _api(self) -> client.CoreV1Api:
        if self._core is None:
            self._core = client.CoreV1Api(self._client or api_client())
        return self._core

    def _list(self) -> list[dict[str, Any]]:
        response = self._api().list_pod_for_all_namespaces(_preload_content=False)
        listing = json.loads(response.data)
        self._resource_version = listing["metadata"]["resourceVersion"]
        return listing.get("items") or []

    async def start(self) -> None:
        """The first list, before attribution relies on it; then the watch, in a thread."""
        self._loop = asyncio.get_running_loop()
        try:
            pods = await asyncio.to_thread(self._list)
        except (ApiException, HTTPError, OSError) as exc:
            # Attribution falls back to connected nodes; the watch thread keeps trying.
            log.warning("cannot list pods; retrying", extra={"error": str(exc)})
        else:
            self.directory.replace(pods)
        self._thread = threading.Thread(target=self._run, daemon=True, name="pod-watch")
        self._thread.start()

    def _hand_over(self, work, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(work, *args)

    def _relist(self) -> None:
        self.relists += 1
        self._hand_over(self.directory.replace, self._list())

    def _run(self) -> None:
        while not self._stop.is_set():
            # Raw dicts (return_type=object): no model validation that one odd pod could fail
            # for ever, and no per-event model objects in a cluster of thousands of pods.
            stream = watch.Watch(return_type=object)
            try:
                if not self._resource_version:
                    self._relist()
                for event in stream.stream(
                    self._api().list_pod_for_all_namespaces,
                    resource_version=self._resource_version,
                    timeout_seconds=self.watch_timeout,
                ):
                    if self._stop.is_set():
                        break
                    pod = event["raw_object"]
                    self._resource_version = pod["metadata"]["resourceVersion"]
                    self._hand_over(self.directory.apply, event["type"], pod)
            except ApiException as exc:
                if exc.status == 410:  # compacted: list again and go on from there
                    self._resource_version = ""
                else:
                    log.warning("pod watch failed", extra={"error": str(exc)})
                    self._stop.wait(1.0)
            except (HTTPError, OSError, ValueError) as exc:
                log.warning("pod watch failed", extra={"error": str(exc)})
                self._stop.wait(1.0)
            finally:
                stream.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A daemon thread blocked in a watch read ends with the process at the latest.
            await asyncio.to_thread(self._thread.join, 1.0)
