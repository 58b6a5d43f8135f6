"""The debug HTTP endpoint (`--debug-listen`, loopback by default): health, readiness and
Prometheus metrics. A deliberately small asyncio HTTP/1.1 server: GET only, one response per
connection, JSON or Prometheus text."""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from xdsproxy.debug.model import DebugModel, NotFound

log = logging.getLogger("xdsproxy.debug")

Handler = Callable[[dict[str, str]], Awaitable[tuple[int, str, bytes]]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


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
    ) -> None:
        self.listen = listen
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
                }
            )
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
        try:
            dump = await asyncio.to_thread(
                self.model.config_dump, query["node"], query.get("view", "pushed")
            )
        except NotFound as exc:
            return json_body(404, {"error": str(exc)})
        except ValueError as exc:
            return json_body(400, {"error": str(exc)})
        return json_body(200, dump)

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
            if method != "GET":
                code, kind, body = json_body(405, {"error": "only GET is served"})
            elif handler is None:
                code, kind, body = json_body(404, {"error": f"no such endpoint: {path}"})
            else:
                code, kind, body = await handler(query)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
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
