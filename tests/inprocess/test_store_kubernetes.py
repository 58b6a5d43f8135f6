"""The Kubernetes store against the in-process API server stand-in (not a real cluster: none
can run here): CRUD through the official client, 409 retries, watch, and 410 Gone."""

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from kubernetes import client

from xdsproxy.harness.kubeapi import KubeApiStandIn
from xdsproxy.harness.stack import eventually
from xdsproxy.istio.names import ServicePort
from xdsproxy.model import WorkloadKey
from xdsproxy.store.base import Touch
from xdsproxy.store.kubernetes import KubernetesStore, resource_name

NS = "istio-system"
W = WorkloadKey("ns-0", "app")
A = ServicePort("a.ns-1.svc.cluster.local", 8080)


@pytest.fixture
def api():
    with KubeApiStandIn() as server:
        yield server


def _store(api: KubeApiStandIn) -> KubernetesStore:
    configuration = client.Configuration(host=api.url)
    return KubernetesStore(NS, client.ApiClient(configuration), watch_timeout=1)


async def test_add_touch_forget_load_through_the_real_client(api) -> None:
    store = _store(api)
    await store.start()
    await store.add(W, A, 100.0)
    await store.add(W, A, 150.0)
    await store.touch([Touch(W, A, 200.0)])
    edges = (await store.load())[W]
    assert edges[A].first_seen == 100.0 and edges[A].last_seen == 200.0
    obj = api.state.objects[(NS, resource_name(W))]
    assert obj["spec"]["workload"] == {"namespace": "ns-0", "name": "app"}
    assert obj["status"]["learned"] == [
        {
            "host": A.host,
            "port": 8080,
            "firstSeen": "1970-01-01T00:01:40.000000Z",
            "lastSeen": "1970-01-01T00:03:20.000000Z",
        }
    ]
    await store.forget(W, [A])
    assert (await store.load())[W] == {}
    await store.close()


def test_stale_resource_version_is_a_409(api) -> None:
    body = {
        "apiVersion": "xdsproxy.io/v1alpha1",
        "kind": "LazyScope",
        "metadata": {"name": "x"},
        "spec": {},
    }
    base = f"{api.url}/apis/xdsproxy.io/v1alpha1/namespaces/{NS}/lazyscopes"
    request = urllib.request.Request(
        base, json.dumps(body).encode(), method="POST", headers={"content-type": "application/json"}
    )
    created = json.loads(urllib.request.urlopen(request).read())
    stale = dict(created, metadata=dict(created["metadata"], resourceVersion="1"), status={})
    request = urllib.request.Request(
        f"{base}/x/status",
        json.dumps(stale).encode(),
        method="PUT",
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as conflict:
        urllib.request.urlopen(request)
    assert conflict.value.code == 409


async def test_concurrent_replicas_lose_no_edge(api) -> None:
    first, second = _store(api), _store(api)
    services = [ServicePort(f"s{i}.ns.svc.cluster.local", 80) for i in range(24)]
    await asyncio.gather(
        *(
            (first if i % 2 else second).add(W, service, float(i))
            for i, service in enumerate(services)
        )
    )
    assert set((await first.load())[W]) == set(services)
    assert api.state.conflicts > 0, "the test should have provoked 409s"


async def test_watch_delivers_another_replicas_edge_within_a_second(api) -> None:
    writer, reader = _store(api), _store(api)
    seen: asyncio.Queue = asyncio.Queue()
    await reader.start(lambda workload, edges: seen.put_nowait((workload, set(edges))))
    await reader.load()
    await writer.add(W, A, 1.0)

    async def until_seen() -> None:
        while True:
            workload, edges = await seen.get()  # the create (no status yet), then the edge
            if workload == W and A in edges:
                return

    await asyncio.wait_for(until_seen(), 1.0)
    await reader.close()


async def test_gone_watch_lists_again(api) -> None:
    writer, reader = _store(api), _store(api)
    seen: list = []
    await reader.start(lambda workload, edges: seen.append(set(edges)))
    await reader.load()
    api.drop_watches()
    api.compact()
    services = [ServicePort(f"late{i}.ns.svc.cluster.local", 80) for i in range(3)]
    for service in services:
        await writer.add(W, service, 1.0)
    api.compact()  # the events the reader missed are gone: it must get 410 and list again
    api.resume_watches()
    for _ in range(100):
        if reader.relists and any(set(services) <= s for s in seen):
            break
        await asyncio.sleep(0.05)
    assert reader.relists >= 1
    assert any(set(services) <= s for s in seen)
    await reader.close()


def _put_spec(api: KubeApiStandIn, name: str, hosts: list[str]) -> None:
    base = f"{api.url}/apis/xdsproxy.io/v1alpha1/namespaces/{NS}/lazyscopes"
    current = api.state.objects.get((NS, name))
    body = {
        "apiVersion": "xdsproxy.io/v1alpha1",
        "kind": "LazyScope",
        "metadata": {
            "name": name,
            **({"resourceVersion": current["metadata"]["resourceVersion"]} if current else {}),
        },
        "spec": {"workload": {"namespace": "ns-0", "name": "app"}, "hosts": hosts},
    }
    url, method = (f"{base}/{name}", "PUT") if current else (base, "POST")
    request = urllib.request.Request(
        url, json.dumps(body).encode(), method=method, headers={"content-type": "application/json"}
    )
    urllib.request.urlopen(request).read()


async def test_operator_written_static_hosts_apply_and_follow_edits(api) -> None:
    from xdsproxy.scope.egress import EgressSettings
    from xdsproxy.server.lazy import LazyRuntime

    _put_spec(api, "ns-0.app", ["ns-1/*", "not a pattern/"])
    runtime = LazyRuntime(
        ServicePort("e.istio-system.svc.cluster.local", 80), EgressSettings(), store=_store(api)
    )
    await runtime.start()
    try:
        for _ in range(40):
            if runtime.scope(W).covers(A):
                break
            await asyncio.sleep(0.05)
        assert runtime.scope(W).origin(A) == "static"
        _put_spec(api, "ns-0.app", ["ns-2/*"])
        for _ in range(40):
            if not runtime.scope(W).covers(A):
                break
            await asyncio.sleep(0.05)
        assert not runtime.scope(W).covers(A)
        assert runtime.scope(W).covers(ServicePort("x.ns-2.svc.cluster.local", 80))
    finally:
        await runtime.stop()


async def test_api_errors_say_what_is_likely_missing(api) -> None:
    """A 404 on the LazyScope path means the CRD is not installed: say so in one line."""
    from xdsproxy.store.base import StoreError

    store = KubernetesStore(NS, client.ApiClient(client.Configuration(host=api.url + "/none")))
    await store.start()
    with pytest.raises(StoreError, match="LazyScope CRD"):
        await store.load()
    await store.close()


async def test_an_operators_forget_is_kept_and_wins_over_older_writes(api) -> None:
    """`status.forgotten`: another replica's edge from before the forget is refused, a touch
    never brings it back, a sighting after the forget does, and every replica hears of it."""
    writer, reader = _store(api), _store(api)
    heard: list[tuple[WorkloadKey, dict]] = []
    await reader.start(on_forget=lambda w, f: heard.append((w, f)))
    await reader.load()
    try:
        await writer.add(W, A, 100.0, by="xdsproxy-a")
        assert (await writer.load())[W][A].learned_by == "xdsproxy-a"
        await writer.forget(W, [A], at=200.0)
        assert A not in (await writer.load())[W]
        await writer.add(W, A, 150.0)  # a sighting from before the forget, written late
        await writer.touch([Touch(W, A, 250.0)])
        assert A not in (await writer.load())[W]
        await eventually(lambda: heard and heard[-1] == (W, {A: 200.0}), timeout=5)
        await writer.add(W, A, 300.0)  # used again after the forget: learned again
        assert A in (await writer.load())[W]
        obj = api.state.objects[(NS, resource_name(W))]
        assert "forgotten" not in obj["status"]
    finally:
        await reader.close()
        await writer.close()
