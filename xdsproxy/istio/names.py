"""Istio's resource names: `outbound|PORT|SUBSET|FQDN` clusters and `FQDN:PORT` virtual hosts."""

from dataclasses import dataclass
from typing import NamedTuple

from xdsproxy import caches


@dataclass(frozen=True, slots=True, order=True)
class ServicePort:
    """The unit of a dependency: a service host and one of its ports."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def is_port(text: str) -> bool:
    """ASCII digits only: `str.isdigit` also accepts digits such as "²" that `int` rejects, and
    names and ports come from peers xdsproxy does not trust."""
    return text.isascii() and text.isdigit()


class OutboundCluster(NamedTuple):
    """What an Istio outbound cluster name says: the service and port, and the subset ("" for
    the service's own cluster)."""

    service: ServicePort
    subset: str


@caches.memo("outbound_cluster")
def outbound_cluster(name: str) -> OutboundCluster | None:
    """`outbound|9080|v1|reviews.ns.svc.cluster.local` -> (reviews...:9080, "v1"). Cached:
    every push to every sidecar asks this of the same few thousand names."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not is_port(parts[1]) or not parts[3]:
        return None
    return OutboundCluster(ServicePort(parts[3], int(parts[1])), parts[2])


def service_fqdn(host: str) -> str:
    """`reviews.shop` -> `reviews.shop.svc.cluster.local`; a name with more dots is kept."""
    return host if host.count(".") > 1 else f"{host}.svc.cluster.local"


def cluster_name(service: ServicePort, subset: str = "") -> str:
    return f"outbound|{service.port}|{subset}|{service.host}"


def vhost_service(name: str) -> ServicePort | None:
    """`reviews.ns.svc.cluster.local:9080` -> ServicePort; None for `allow_any` and the like."""
    host, sep, port = name.rpartition(":")
    if not sep or not host or not is_port(port):
        return None
    return ServicePort(host, int(port))


def route_table_port(name: str) -> int | None:
    """The port a route table serves: `9080` or `reviews.ns.svc.cluster.local:9080`."""
    if is_port(name):
        return int(name)
    service = vhost_service(name)
    return service.port if service else None


def service_namespace(host: str) -> str | None:
    """`reviews.ns.svc.cluster.local` -> `ns`; None for hosts that are not Kubernetes services."""
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[1]
    return None
