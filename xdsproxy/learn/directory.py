"""Who an access log entry may be attributed to (`attribution.Directory`): the workloads at an
IP and a workload's service accounts, from the connected sidecars and, with the Kubernetes
store, every pod of the cluster, so that an entry for a sidecar connected to another replica is
attributed here too."""

from xdsproxy.istio.sessions import Sessions
from xdsproxy.learn.pods import PodDirectory
from xdsproxy.model import WorkloadKey


class MeshDirectory:
    def __init__(self, sessions: Sessions, pods: PodDirectory | None = None) -> None:
        self.sessions = sessions
        self.pods = pods

    def workloads_at(self, ip: str) -> frozenset[WorkloadKey]:
        connected = self.sessions.workloads_at(ip)
        return connected | self.pods.workloads_at(ip) if self.pods is not None else connected

    def service_accounts(self, workload: WorkloadKey) -> frozenset[str]:
        connected = self.sessions.service_accounts(workload)
        if self.pods is None:
            return connected
        return connected | self.pods.service_accounts(workload)
