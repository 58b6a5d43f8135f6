"""Stores: semantics shared by every backend, SQLite durability under kill -9."""

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from xdsproxy.istio.names import ServicePort
from xdsproxy.model import WorkloadKey
from xdsproxy.store.base import Touch, open_store
from xdsproxy.store.memory import MemoryStore
from xdsproxy.store.sqlite import SqliteStore

W = WorkloadKey("ns-0", "app")
A = ServicePort("a.ns-1.svc.cluster.local", 8080)
B = ServicePort("b.ns-1.svc.cluster.local", 9080)


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    return MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "edges.db")


async def test_add_touch_forget_load(store) -> None:
    await store.start()
    await store.add(W, A, 100.0)
    await store.add(W, A, 150.0)  # already there: first seen stays
    await store.add(W, B, 120.0)
    await store.touch([Touch(W, A, 200.0), Touch(W, A, 180.0), Touch(W, ServicePort("x", 1), 5)])
    edges = (await store.load())[W]
    assert set(edges) == {A, B}
    assert edges[A].first_seen == 100.0 and edges[A].last_seen == 200.0
    await store.forget(W, [B])
    assert set((await store.load())[W]) == {A}
    await store.close()


async def test_sqlite_survives_reopen_in_wal_mode(tmp_path) -> None:
    path = tmp_path / "edges.db"
    first = SqliteStore(path)
    await first.add(W, A, 1.0)
    await first.close()
    second = SqliteStore(path)
    assert A in (await second.load())[W]
    await second.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_urls(tmp_path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store(f"sqlite://{tmp_path}/x.db"), SqliteStore)
    for bad in ("nowhere", "sqlite://relative.db", "kubernetes://", "redis://x"):
        with pytest.raises(ValueError):
            open_store(bad)


async def test_unwritable_sqlite_path_is_a_store_error(tmp_path) -> None:
    from xdsproxy.store.base import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError):
        await SqliteStore(blocker / "edges.db").add(W, A, 1.0)


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from xdsproxy.istio.names import ServicePort
    from xdsproxy.model import WorkloadKey
    from xdsproxy.store.sqlite import SqliteStore

    async def main():
        store = SqliteStore(sys.argv[1])
        i = 0
        while True:
            service = ServicePort(f"s{i}.ns.svc.cluster.local", 80)
            await store.add(WorkloadKey("ns", "w"), service, i)
            print(i, flush=True)  # printed only once committed
            i += 1

    asyncio.run(main())
    """
)


async def test_sqlite_kill_9_during_a_burst_loses_no_committed_edge(tmp_path) -> None:
    path = tmp_path / "edges.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    committed = -1
    deadline = time.monotonic() + 30
    assert writer.stdout is not None
    while committed < 200 and time.monotonic() < deadline:
        committed = int(await asyncio.to_thread(writer.stdout.readline))
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(10)
    assert committed >= 200, "the writer did not get going"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store = SqliteStore(path)
    hosts = {s.host for s in (await store.load())[WorkloadKey("ns", "w")]}
    await store.close()
    assert {f"s{i}.ns.svc.cluster.local" for i in range(committed + 1)} <= hosts
