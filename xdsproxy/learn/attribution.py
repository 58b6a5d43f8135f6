"""Who made a request the egress logged, and which mesh service it reached. Pure logic.

The source-workload header is a claim made by the calling sidecar's own route (an app cannot
forge it through a known vhost), but the egress can be reached in other ways, so the claim
counts only when the connection agrees: the egress saw the request come from an IP of a
connected node of that workload, or from a peer certificate of that namespace and service
account. Otherwise the IP alone decides, and only when it belongs to exactly one workload.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from xdsproxy.istio.names import ServicePort, is_port, outbound_cluster
from xdsproxy.model import WorkloadKey


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """The fields of one access log entry that attribution reads."""

    remote_ip: str  # downstream_direct_remote_address: the real socket peer
    claimed_namespace: str = ""
    claimed_workload: str = ""
    peer_namespace: str = ""  # from the peer certificate's SPIFFE id, when mTLS
    peer_service_account: str = ""
    upstream_cluster: str = ""
    authority: str = ""
    original_port: str = ""


@dataclass(frozen=True, slots=True)
class Learned:
    workload: WorkloadKey
    service: ServicePort
    claim_ignored: bool = False  # a header claimed another workload than the connection's


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str  # a short, stable label: it becomes a metric label
    service: ServicePort | None = None  # for `unknown_service`: the service it reached


class Directory(Protocol):
    def workloads_at(self, ip: str) -> frozenset[WorkloadKey]: ...

    def service_accounts(self, workload: WorkloadKey) -> frozenset[str]: ...


def destination(record: AccessRecord, known: Callable[[ServicePort], bool]) -> ServicePort | None:
    parsed = outbound_cluster(record.upstream_cluster)
    if parsed is not None:
        return parsed.service
    host = (
        record.authority.rsplit(":", 1)[0] if record.authority.count(":") == 1 else record.authority
    )
    if is_port(record.original_port):
        candidate = ServicePort(host, int(record.original_port))
        if known(candidate):
            return candidate
    return None


def _source(record: AccessRecord, directory: Directory) -> tuple[WorkloadKey | None, bool, str]:
    at_ip = directory.workloads_at(record.remote_ip)
    if record.claimed_namespace and record.claimed_workload:
        claim = WorkloadKey(record.claimed_namespace, record.claimed_workload)
        if claim in at_ip:
            return claim, False, ""
        if (
            record.peer_namespace == claim.namespace
            and record.peer_service_account
            and record.peer_service_account in directory.service_accounts(claim)
        ):
            return claim, False, ""
        ignored = True
    else:
        ignored = False
    if len(at_ip) == 1:
        return next(iter(at_ip)), ignored, ""
    return None, ignored, "ambiguous_source" if at_ip else "unknown_source"


def attribute(
    record: AccessRecord, directory: Directory, known: Callable[[ServicePort], bool]
) -> Learned | Rejected:
    service = destination(record, known)
    if service is None:
        return Rejected("not_a_mesh_service")
    if not known(service):
        return Rejected("unknown_service", service)
    workload, ignored, reason = _source(record, directory)
    if workload is None:
        return Rejected("forged_source" if ignored else reason)
    return Learned(workload, service, ignored)
