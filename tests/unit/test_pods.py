"""Pods to workloads, as Istio names them (pure), and the pod list-and-watch against the
Kubernetes API stand-in (not a real API server: none can run here), 410 Gone included."""

import asyncio

from kubernetes import client

from xdsproxy.harness.kubeapi import KubeApiStandIn
from xdsproxy.harness.stack import eventually
from xdsproxy.learn.pods import PodDirectory, workload_name
from xdsproxy.model import WorkloadKey
from xdsproxy.server.podwatch import PodWatch


def _pod(name: str, ip: str = "10.0.0.1", owner: tuple[str, str] | None = None, **labels) -> dict:
    meta: dict = {"name": name, "namespace": "ns", "labels": labels}
    if owner is not None:
        meta["generateName"] = name.rsplit("-", 1)[0] + "-"
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": owner[0],
                "name": owner[1],
                "controller": True,
                "uid": "u",
            }
        ]
    return {
        "metadata": meta,
        "spec": {"serviceAccountName": "sa"},
        "status": {"phase": "Running", "podIP": ip},
    }


def test_workload_names_follow_istios_heuristics() -> None:
    rs = ("ReplicaSet", "reviews-v1-5d8f")
    assert workload_name(_pod("reviews-v1-5d8f-x1", owner=rs, **{"pod-template-hash": "5d8f"})) == (
        "reviews-v1"
    )
    rollout = {"rollouts-pod-template-hash": "5d8f"}
    assert workload_name(_pod("reviews-v1-5d8f-x1", owner=rs, **rollout)) == "reviews-v1"
    assert workload_name(_pod("reviews-v1-5d8f-x1", owner=rs)) == "reviews-v1-5d8f"
    assert workload_name(_pod("db-0", owner=("StatefulSet", "db"))) == "db"
    assert workload_name(_pod("backup-28401120-abcde", owner=("Job", "backup-28401120"))) == (
        "backup"
    )
    assert workload_name(_pod("once-abcde", owner=("Job", "once"))) == "once"
    dc = ("ReplicationController", "web-3")
    assert workload_name(_pod("web-3-abcde", owner=dc, deploymentconfig="web")) == "web"
    assert workload_name(_pod("standalone")) == "standalone"
    override = {"service.istio.io/workload-name": "named"}
    assert workload_name(_pod("reviews-v1-5d8f-x1", owner=rs, **override)) == "named"


def test_directory_follows_adds_moves_deletes_and_relists() -> None:
    directory = PodDirectory()
    a = _pod("a-1", "10.0.0.1", ("StatefulSet", "a"))
    directory.apply("ADDED", a)
    assert directory.workloads_at("10.0.0.1") == {WorkloadKey("ns", "a")}
    assert directory.service_accounts(WorkloadKey("ns", "a")) == {"sa"}
    moved = _pod("a-1", "10.0.0.2", ("StatefulSet", "a"))
    directory.apply("MODIFIED", moved)
    assert not directory.workloads_at("10.0.0.1")
    assert directory.workloads_at("10.0.0.2") == {WorkloadKey("ns", "a")}
    finished = {**moved, "status": {"phase": "Succeeded", "podIP": "10.0.0.2"}}
    directory.apply("MODIFIED", finished)
    assert not directory.workloads_at("10.0.0.2")  # its IP may be someone else's now
    host = {**a, "spec": {"hostNetwork": True}}
    directory.apply("MODIFIED", host)
    assert not directory.workloads_at("10.0.0.1")
    directory.apply("ADDED", a)
    directory.replace([_pod("b-1", "10.0.0.9", ("StatefulSet", "b"))])
    assert not directory.workloads_at("10.0.0.1")  # missing from the list: gone
    assert not directory.service_accounts(WorkloadKey("ns", "a"))
    assert directory.workloads_at("10.0.0.9") == {WorkloadKey("ns", "b")}


async def test_pod_watch_lists_watches_and_relists_after_410() -> None:
    with KubeApiStandIn() as api:
        api.apply_pod(_pod("a-1", "10.0.0.1", ("StatefulSet", "a")))
        directory = PodDirectory()
        watch = PodWatch(directory, client.ApiClient(client.Configuration(host=api.url)), 1)
        await watch.start()
        try:
            assert directory.synced and directory.workloads_at("10.0.0.1")
            api.apply_pod(_pod("b-1", "10.0.0.2", ("StatefulSet", "b")))
            await eventually(lambda: directory.workloads_at("10.0.0.2"), timeout=10)
            api.delete_pod("ns", "a-1")
            await eventually(lambda: not directory.workloads_at("10.0.0.1"), timeout=10)
            # Events missed while the watch was away and compacted: 410, then a re-list.
            api.drop_watches()
            api.apply_pod(_pod("c-1", "10.0.0.3", ("StatefulSet", "c")))
            api.delete_pod("ns", "b-1")
            api.compact()
            api.resume_watches()
            await eventually(lambda: watch.relists >= 1, timeout=10)
            await eventually(lambda: directory.workloads_at("10.0.0.3"), timeout=10)
            assert not directory.workloads_at("10.0.0.2")
        finally:
            await watch.stop()
            await asyncio.sleep(0)
