"""The service registry the simulated Istiod serves: services, ports, subsets and endpoints."""

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

DOMAIN = "svc.cluster.local"
HTTP_PORTS = (80, 8080, 9080)
TCP_PORT = 3306
SNIFFED_PORT = 9090

# `named-ports`: every port named http*/grpc* or tcp*, so Istio never sniffs (the profile all
# figures before the every-protocol work used). `realistic`: the protocol mix of the Istio 1.18
# DeathStarBench dump, 85 sniffed, 42 TCP and 12 HTTP listeners of 141: sniffed ports (a
# `VIP_PORT` listener with an HTTP chain to the per-service table `FQDN:PORT`, a default
# tcp_proxy chain) 6 in 10, TCP 3 in 10, HTTP 1 in 10.
PROFILES = ("named-ports", "realistic")

Kind = Literal["eds", "headless", "dns"]


@dataclass(frozen=True, slots=True)
class Port:
    number: int
    protocol: Literal["HTTP", "TCP", "SNIFFED"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    subset: str = ""
    istio_mtls: bool = False  # the endpoint runs an Istio proxy, so callers use Istio mTLS


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    ports: tuple[Port, ...]
    cluster_ip: str
    kind: Kind = "eds"
    subsets: tuple[tuple[str, int], ...] = ()  # (subset name, route weight)
    endpoints: tuple[Endpoint, ...] = ()
    host: str = ""  # a ServiceEntry's own host; Kubernetes services derive theirs

    @property
    def fqdn(self) -> str:
        return self.host or f"{self.name}.{self.namespace}.{DOMAIN}"


def cluster_name(port: int, fqdn: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{fqdn}"


@dataclass(slots=True)
class Mesh:
    """Mutable registry; every mutation bumps `generation`, which the server turns into a push."""

    services: dict[str, Service] = field(default_factory=dict)
    registry_only: bool = False
    generation: int = 1
    # Istio's auto mTLS: outbound clusters carry its transport socket matches (they need an
    # `sds-grpc` cluster in every Envoy's bootstrap, as Istio's has).
    auto_mtls: bool = False
    # Which listener shapes to emit (see PROFILES): `realistic` adds Istio's inspectors and
    # PassthroughFilterChain to HTTP port listeners and the 15001 blackhole chain.
    profile: str = "named-ports"

    def add(self, service: Service) -> None:
        self.services[service.fqdn] = service
        self.generation += 1

    def remove(self, fqdn: str) -> None:
        del self.services[fqdn]
        self.generation += 1

    def set_endpoints(self, fqdn: str, endpoints: Iterable[Endpoint]) -> None:
        self.services[fqdn] = replace(self.services[fqdn], endpoints=tuple(endpoints))
        self.generation += 1

    def namespaces(self) -> list[str]:
        return sorted({service.namespace for service in self.services.values()})


def _cluster_ip(index: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.10") + index)


def _pod_endpoints(index: int, port: int, subsets: tuple[tuple[str, int], ...]) -> tuple:
    base = ipaddress.IPv4Address("10.128.0.0") + index * 4
    names = [name for name, _ in subsets] or [""]
    return tuple(Endpoint(str(base + k), port, names[k % len(names)]) for k in range(3))


def _realistic_port(index: int, http_ports: tuple[int, ...]) -> Port:
    slot = index % 10
    if slot < 6:
        return Port(SNIFFED_PORT, "SNIFFED")
    if slot < 9:
        return Port(TCP_PORT, "TCP")
    return Port(http_ports[index % len(http_ports)], "HTTP")


def generate(
    services: int,
    namespaces: int | None = None,
    registry_only: bool = False,
    http_ports: tuple[int, ...] = HTTP_PORTS,
    tcp_every: int = 10,
    profile: str = "named-ports",
) -> Mesh:
    """An Istio-shaped mesh of `services` services spread over several namespaces.

    Most services have one HTTP port; every `tcp_every`-th is TCP (none with 0); every seventh
    has two subsets split by a weighted route. Service 1 is headless (ORIGINAL_DST) and service 2
    is a DNS ServiceEntry (STRICT_DNS), so every cluster type Istiod emits for a sidecar is
    present.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: one of {', '.join(PROFILES)}")
    count = namespaces or max(2, min(10, services // 100))
    mesh = Mesh(registry_only=registry_only, profile=profile)
    for i in range(services):
        namespace = f"ns-{i % count}"
        if profile == "realistic":
            port = _realistic_port(i, http_ports)
        elif tcp_every > 0 and i % tcp_every == tcp_every - 1:
            port = Port(TCP_PORT, "TCP")
        else:
            port = Port(http_ports[i % len(http_ports)], "HTTP")
        tcp = port.protocol == "TCP"
        subsets = (("v1", 90), ("v2", 10)) if i % 7 == 3 and not tcp else ()
        kind: Kind = "eds"
        host = ""
        if i == 1:
            kind = "headless"
        elif i == 2:
            kind, host, port = "dns", "api.example.internal", Port(http_ports[0], "HTTP")
        service = Service(
            name=f"svc-{i}",
            namespace=namespace,
            ports=(port,),
            cluster_ip=_cluster_ip(i),
            kind=kind,
            subsets=subsets,
            endpoints=_pod_endpoints(i, port.number, subsets) if kind == "eds" else (),
            host=host,
        )
        mesh.services[service.fqdn] = service
    return mesh
