"""The debug HTTP endpoints: health, readiness and Prometheus metrics (`--debug-listen`), plus
every sidecar's status, config and scope (`--admin-listen`, loopback by default), plus the
scope writes `xdsproxy scope add|forget` make when `--admin-writes` turns them on. A
deliberately small asyncio HTTP/1.1 server: one response per connection, JSON or Prometheus
text, POST only for the writes."""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from xdsproxy.debug.model import BadRequest, DebugModel, NotFound
from xdsproxy.store.base import StoreError

log = logging.getLogger("xdsproxy.debug")

Handler = Callable[[dict[str, str]], Awaitable[tuple[int, str, bytes]]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    503: "Service Unavailable",
}
_MAX_BODY = 64 * 1024
_WRITES = ("/admin/scope/add", "/admin/scope/forget")


def json_body(code: int, body: object) -> tuple[int, str, bytes]:
    return code, "application/json", json.dumps(body, indent=1).encode()


@dataclass
class Readiness:
    """What `/readyz` reports; each check says whether it holds and why not."""

    checks: dict[str, Callable[[], tuple[bool, str]]]

    def report(self) -> tuple[bool, dict[str, str]]:
        results = {name: check() for name, check in self.checks.items()}
        return all(ok for ok, _ in results.values()), {
            name: "ok" if ok else why for name, (ok, why) in results.items()
        }


class DebugServer:
    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        readiness: Readiness,
        model: DebugModel | None = None,
        writes: bool = False,
    ) -> None:
        self.listen = listen
        self.writes = writes
        self.registry = registry
        self.readiness = readiness
        self.model = model
        self.routes: dict[str, Handler] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }
        if model is not None:
            self.routes.update(
                {
                    "/debug/nodes": self._nodes,
                    "/debug/workloads": self._workloads,
                    "/debug/config_dump": self._config_dump,
                    "/debug/scope/why": self._why,
                    "/debug/scope/export": self._export,
                }
            )
        self.posts: dict[str, Handler] = {}
        if model is not None and writes:
            self.posts = dict(zip(_WRITES, (self._add, self._forget), strict=True))
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        host, _, port = self.listen.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host.strip("[]"), int(port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _healthz(self, _query: dict[str, str]) -> tuple[int, str, bytes]:
        return json_body(200, {"status": "ok"})

    async def _readyz(self, _query: dict[str, str]) -> tuple[int, str, bytes]:
        ready, checks = self.readiness.report()
        return json_body(200 if ready else 503, {"ready": ready, "checks": checks})

    async def _metrics(self, _query: dict[str, str]) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    async def _nodes(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.model is not None
        node = query.get("id")
        if node is None:
            return json_body(200, self.model.nodes())
        try:
            return json_body(200, self.model.node(node))
        except NotFound as exc:
            return json_body(404, {"error": str(exc)})

    async def _workloads(self, _query: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.model is not None
        return json_body(200, self.model.workloads())

    async def _config_dump(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.model is not None
        if "node" not in query:
            return json_body(400, {"error": "the node query parameter is required"})
        return await _answer(
            asyncio.to_thread(
                self.model.config_dump,
                query["node"],
                query.get("view", "pushed"),
                query.get("type", ""),
            )
        )

    async def _why(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.model is not None
        if "workload" not in query or "service" not in query:
            return json_body(
                400, {"error": "the workload and service query parameters are required"}
            )
        return await _answer(_now(self.model.why, query["workload"], query["service"]))

    async def _export(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.model is not None
        return await _answer(_now(self.model.export, query.get("workload") or None))

    async def _add(self, body: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.model is not None
        return await _answer(self.model.add(body.get("workload", ""), body.get("service", "")))

    async def _forget(self, body: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.model is not None
        return await _answer(self.model.forget(body.get("workload", ""), body.get("service", "")))

    async def _post(self, path: str, head: bytes, reader: asyncio.StreamReader):
        handler = self.posts.get(path)
        if handler is None and self.model is not None and path in _WRITES:
            return json_body(403, {"error": "scope writes are off: start xdsproxy --admin-writes"})
        if handler is None:
            return json_body(404, {"error": f"no such endpoint: {path}"})
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if not 0 < length <= _MAX_BODY:
            return json_body(
                413 if length else 400, {"error": "a JSON body up to 64 KiB is required"}
            )
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
        if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
            return json_body(400, {"error": "the body must be a JSON object of strings"})
        return await handler(body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path, _, query_text = target.partition("?")
            pairs = (p.split("=", 1) for p in query_text.split("&") if "=" in p)
            query = {key: unquote(value) for key, value in pairs}
            if path.startswith("/debug/nodes/") and self.model is not None:
                path, query["id"] = "/debug/nodes", unquote(path.removeprefix("/debug/nodes/"))
            handler = self.routes.get(path)
            if method == "POST":
                code, kind, body = await self._post(path, head, reader)
            elif method != "GET":
                code, kind, body = json_body(405, {"error": "only GET and POST are served"})
            elif handler is None:
                code, kind, body = json_body(404, {"error": f"no such endpoint: {path}"})
            else:
                code, kind, body = await handler(query)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            # ValueError: a bad request line, Content-Length or JSON body
            code, kind, body = json_body(400, {"error": "malformed request"})
        except Exception:
            log.exception("debug handler failed")
            code, kind, body = json_body(500, {"error": "internal error"})
        writer.write(
            f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\ncontent-type: {kind}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _now(work, *args):
    """Model reads that need no thread: they run on the loop, where the runtime lives."""
    return work(*args)


async def _answer(work: Awaitable[object]) -> tuple[int, str, bytes]:
    """A model call's result as JSON; its NotFound and BadRequest as 404 and 400."""
    try:
        return json_body(200, await work)
    except NotFound as exc:
        return json_body(404, {"error": str(exc)})
    except (BadRequest, ValueError) as exc:
        return json_body(400, {"error": str(exc)})
    except StoreError as exc:
        return json_body(503, {"error": f"the store refused the change: {exc}"})
