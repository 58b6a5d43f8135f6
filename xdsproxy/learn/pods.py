"""Which workload an IP belongs to, from Pod objects, as Istio derives it. Pure logic.

With several replicas, the egress's access logs reach one replica while the calling sidecar
may be connected to another: the replica that receives the entry must still be able to tell
which workload (namespace, name as Istio names it, service account) sent it. Istiod knows this
from the Kubernetes API; so do we, from a list-and-watch of Pods (`server.podwatch`).
"""

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from xdsproxy.model import WorkloadKey

# The label that overrides the derived name (istio/api label.ServiceWorkloadName).
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"
# A CronJob's Jobs are named `<cronjob>-<8 to 10 digit timestamp>`.
_CRONJOB_JOB = re.compile(r"(.+)-\d{8,10}$")
_GONE_PHASES = frozenset({"Succeeded", "Failed"})  # their IPs may already be someone else's


def workload_name(pod: dict[str, Any]) -> str:
    """The workload name Istio gives a pod (pkg/kube/util.go, GetDeployMetaFromPod, and the
    label override of GetWorkloadMetaFromPod): the controlling Deployment (the ReplicaSet's
    name less its pod-template-hash) or Argo Rollout, the DeploymentConfig, the CronJob of a
    Job, any other controller's name; the pod's own name when it was not generated."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(WORKLOAD_NAME_LABEL):
        return str(labels[WORKLOAD_NAME_LABEL])
    name = str(meta.get("name", ""))
    if not meta.get("generateName"):
        return name
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    if owner is None:
        return name
    kind, owner_name = owner.get("kind", ""), str(owner.get("name", ""))
    if kind == "ReplicaSet":
        for label in ("pod-template-hash", "rollouts-pod-template-hash"):
            suffix = labels.get(label)
            if suffix and owner_name.endswith(suffix):
                return owner_name.removesuffix(f"-{suffix}")
    if kind == "ReplicationController" and labels.get("deploymentconfig"):
        return str(labels["deploymentconfig"])
    if kind == "Job" and (match := _CRONJOB_JOB.fullmatch(owner_name)):
        return match.group(1)
    return owner_name or name


def pod_ips(pod: dict[str, Any]) -> tuple[str, ...]:
    status = pod.get("status") or {}
    ips = [entry.get("ip") for entry in status.get("podIPs") or []]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return tuple(ip for ip in ips if ip)


@dataclass(frozen=True, slots=True)
class PodEntry:
    workload: WorkloadKey
    service_account: str
    ips: tuple[str, ...]


def pod_entry(pod: dict[str, Any]) -> PodEntry | None:
    """What attribution needs of a pod; None for pods that own no IP of their own (host
    network, finished, not yet scheduled)."""
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if spec.get("hostNetwork") or status.get("phase") in _GONE_PHASES:
        return None
    ips = pod_ips(pod)
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    if not ips or not namespace:
        return None
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return PodEntry(WorkloadKey(namespace, workload_name(pod)), str(account), ips)


class PodDirectory:
    """Pods by IP and workloads' service accounts, kept from list and watch events."""

    def __init__(self) -> None:
        self._pods: dict[tuple[str, str], PodEntry] = {}
        self._by_ip: dict[str, set[tuple[str, str]]] = defaultdict(set)
        self._by_workload: dict[WorkloadKey, set[tuple[str, str]]] = defaultdict(set)
        self.synced = False  # a full list has been applied

    def __len__(self) -> int:
        return len(self._pods)

    def replace(self, pods: Iterable[dict[str, Any]]) -> None:
        """A full list (start, or after 410 Gone): pods missing from it are gone."""
        self._pods.clear()
        self._by_ip.clear()
        self._by_workload.clear()
        for pod in pods:
            self.apply("ADDED", pod)
        self.synced = True

    def apply(self, event: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        old = self._pods.pop(key, None)
        if old is not None:
            for index, value in ((self._by_ip, ip) for ip in old.ips):
                _unindex(index, value, key)
            _unindex(self._by_workload, old.workload, key)
        entry = pod_entry(pod) if event != "DELETED" else None
        if entry is not None:
            self._pods[key] = entry
            for ip in entry.ips:
                self._by_ip[ip].add(key)
            self._by_workload[entry.workload].add(key)

    def workloads_at(self, ip: str) -> frozenset[WorkloadKey]:
        return frozenset(self._pods[key].workload for key in self._by_ip.get(ip, ()))

    def service_accounts(self, workload: WorkloadKey) -> frozenset[str]:
        keys = self._by_workload.get(workload, ())
        return frozenset(self._pods[key].service_account for key in keys)


def _unindex(index: dict, value: object, key: tuple[str, str]) -> None:
    keys = index.get(value)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[value]
