"""The lazy runtime's state: commit before push, batched last seen, ageing, clock jumps, and a
store that fails."""

from tests.helpers import StandInSession, sidecar_node
from xdsproxy.istio.names import ServicePort
from xdsproxy.learn.attribution import AccessRecord
from xdsproxy.model import Edge, WorkloadKey
from xdsproxy.scope.egress import EgressSettings
from xdsproxy.scope.scope import HostPattern
from xdsproxy.server.lazy import LazyRuntime
from xdsproxy.store.base import StoreError
from xdsproxy.store.memory import MemoryStore

W = WorkloadKey("ns-0", "app")
A = ServicePort("a.ns-1.svc.cluster.local", 8080)
CLUSTER = f"outbound|8080||{A.host}"


class Clock:
    def __init__(self) -> None:
        self.wall, self.mono = 1_800_000_000.0, 1000.0


class FlakyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.calls: list[str] = []

    async def add(self, workload, service, seen, by=""):
        self.calls.append("add")
        if self.failing:
            raise StoreError("disk full")
        await super().add(workload, service, seen, by)

    async def touch(self, updates):
        updates = list(updates)
        self.calls.append(f"touch:{len(updates)}")
        if self.failing:
            raise StoreError("disk full")
        await super().touch(updates)

    async def forget(self, workload, services, at=None):
        self.calls.append("forget")
        await super().forget(workload, services, at)


async def runtime(store=None, ttl: float = 100.0) -> tuple[LazyRuntime, Clock, list]:
    clock = Clock()
    rt = LazyRuntime(
        ServicePort("egress.istio-system.svc.cluster.local", 80),
        EgressSettings(),
        store=store or MemoryStore(),
        ttl=ttl,
        clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
    )
    rt.learner.known_services.add(A)
    session = StandInSession(sidecar_node("10.0.0.1", "app"))
    rt.opened(session)
    await rt.store.start()
    return rt, clock, session.refreshed


def _record() -> AccessRecord:
    return AccessRecord("10.0.0.1", "ns-0", "app", upstream_cluster=CLUSTER)


async def test_learn_commits_before_the_push() -> None:
    store = FlakyStore()
    rt, clock, pushed = await runtime(store)
    await rt.learner.observe(_record(), clock.wall)
    assert store.calls == ["add"] and len(pushed) == 1
    assert A in (await store.load())[W]


async def test_repeated_use_is_batched_not_written_per_entry() -> None:
    store = FlakyStore()
    rt, clock, _ = await runtime(store)
    await rt.learner.observe(_record(), clock.wall)
    for _ in range(50):
        clock.wall += 1
        await rt.learner.observe(_record(), clock.wall)
        rt.learner.observe_usage(_record(), "10.0.0.1")
    assert store.calls == ["add"]
    await rt.learner.flush()
    assert store.calls == ["add", "touch:1"]
    assert (await store.load())[W][A].last_seen == clock.wall


async def test_unused_dependency_ages_out_and_is_repushed() -> None:
    store = FlakyStore()
    rt, clock, pushed = await runtime(store, ttl=100)
    await rt.learner.observe(_record(), clock.wall)
    clock.mono += 60
    await rt.learner.age()
    assert rt.scope(W).covers(A)
    rt.learner.observe_usage(
        _record(), "10.0.0.1"
    )  # direct use seen by the sidecar's sampled logger
    clock.mono += 90
    await rt.learner.age()
    assert rt.scope(W).covers(A)
    clock.mono += 101
    await rt.learner.age()
    assert not rt.scope(W).covers(A)
    assert "forget" in store.calls and W not in {w for w, e in (await store.load()).items() if e}
    assert len(pushed) == 2  # the learn, then the narrowing


async def test_static_rules_never_age() -> None:
    rt, clock, _ = await runtime(ttl=10)
    rt.scope(W).set_static((HostPattern.parse("ns-1/*"),))
    clock.mono += 10_000
    await rt.learner.age()
    assert rt.scope(W).covers(A)


async def test_wall_clock_jumps_do_not_age_anything() -> None:
    rt, clock, _ = await runtime(ttl=100)
    await rt.learner.observe(_record(), clock.wall)
    for jump in (+10_000_000, -20_000_000):
        clock.wall += jump
        await rt.learner.age()
        assert rt.scope(W).covers(A)


async def test_restart_ages_from_stored_last_seen_bounded_by_ttl() -> None:
    store = MemoryStore()
    stale = ServicePort("stale.ns-1.svc.cluster.local", 80)
    future = ServicePort("future.ns-1.svc.cluster.local", 80)
    clock = Clock()
    await store.add(W, A, clock.wall - 10)
    await store.add(W, stale, clock.wall - 1_000)
    await store.add(W, future, clock.wall + 5_000)  # the wall clock went back while down
    rt = LazyRuntime(
        ServicePort("e.istio-system.svc.cluster.local", 80),
        EgressSettings(),
        store=store,
        ttl=100,
        clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
    )
    await rt.start()
    try:
        assert rt.store_healthy and {A, stale, future} <= set(rt.scope(W).learned)
        clock.mono += 1
        await rt.learner.age()
        assert set(rt.scope(W).learned) == {A, future}
    finally:
        await rt.stop()


async def test_failing_store_serves_from_memory_then_catches_up() -> None:
    store = FlakyStore()
    rt, clock, pushed = await runtime(store)
    store.failing = True
    await rt.learner.observe(_record(), clock.wall)
    assert rt.scope(W).covers(A) and len(pushed) == 1  # still learned and pushed
    assert not rt.store_healthy
    assert rt.metrics.value("xdsproxy_store_errors_total") == 1
    store.failing = False
    await rt.learner.flush()
    assert rt.store_healthy and A in (await store.load())[W]


async def test_edges_from_another_replica_only_widen() -> None:
    rt, clock, pushed = await runtime()
    rt.learner.apply_remote(W, {A: Edge(clock.wall, clock.wall)})
    assert rt.scope(W).covers(A) and len(pushed) == 1
    rt.learner.apply_remote(W, {A: Edge(clock.wall, clock.wall)})  # our own write coming back
    rt.learner.apply_remote(W, {})  # a late event from before the learn
    assert rt.scope(W).covers(A) and len(pushed) == 1
