"""`sqlite:///PATH`: the embedded default. WAL mode, one transaction per call, committed (and
synced, `synchronous=FULL`) before `add` returns. Calls run in a worker thread so a slow disk
never stalls the event loop."""

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from xdsproxy.istio.names import ServicePort
from xdsproxy.model import Edge, WorkloadKey
from xdsproxy.store.base import (
    ChangeCallback,
    Edges,
    ForgetCallback,
    StaticCallback,
    StoreError,
    Touch,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edges (
    namespace  TEXT    NOT NULL,
    workload   TEXT    NOT NULL,
    host       TEXT    NOT NULL,
    port       INTEGER NOT NULL,
    first_seen REAL    NOT NULL,
    last_seen  REAL    NOT NULL,
    PRIMARY KEY (namespace, workload, host, port)
)
"""


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(_SCHEMA)
        return db

    async def _run(self, work, *args):
        async with self._lock:  # one writer at a time; sqlite3 connections are not re-entrant
            try:
                if self._db is None:
                    self._db = await asyncio.to_thread(self._connect)
                return await asyncio.to_thread(work, self._db, *args)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    async def start(
        self,
        on_change: ChangeCallback | None = None,
        on_static: StaticCallback | None = None,
        on_forget: ForgetCallback | None = None,
    ) -> None:
        await self._run(lambda db: None)

    async def load(self) -> dict[WorkloadKey, Edges]:
        def read(db: sqlite3.Connection) -> dict[WorkloadKey, Edges]:
            out: dict[WorkloadKey, Edges] = {}
            for ns, workload, host, port, first, last in db.execute("SELECT * FROM edges"):
                out.setdefault(WorkloadKey(ns, workload), {})[ServicePort(host, port)] = Edge(
                    first, last
                )
            return out

        return await self._run(read)

    async def add(
        self, workload: WorkloadKey, service: ServicePort, seen: float, by: str = ""
    ) -> None:
        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO edges VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                    "SET last_seen = max(last_seen, excluded.last_seen)",
                    (workload.namespace, workload.workload, service.host, service.port, seen, seen),
                )

        await self._run(write)

    async def touch(self, updates: Iterable[Touch]) -> None:
        rows = [
            (u.last_seen, u.workload.namespace, u.workload.workload, u.service.host, u.service.port)
            for u in updates
        ]
        if not rows:
            return

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "UPDATE edges SET last_seen = max(last_seen, ?) "
                    "WHERE namespace = ? AND workload = ? AND host = ? AND port = ?",
                    rows,
                )

        await self._run(write)

    async def forget(
        self, workload: WorkloadKey, services: Iterable[ServicePort], at: float | None = None
    ) -> None:
        rows = [(workload.namespace, workload.workload, s.host, s.port) for s in services]

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "DELETE FROM edges WHERE namespace = ? AND workload = ? AND host = ? "
                    "AND port = ?",
                    rows,
                )

        await self._run(write)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)
