"""Lazy mode between Istio's own Istiod and a model Envoy, on a mesh with every shape: HTTP with
subsets and a weighted route, gRPC, TCP, a protocol-sniffed port, a headless service, a
ServiceEntry, a Sidecar resource. A second model Envoy connected to Istiod directly is the truth
a lazy sidecar is checked against: what it holds dangles nowhere, and a learn restores Istio's
exact resources."""

import pytest
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.any_pb2 import Any

from tests.helpers import istio_sidecar_node
from tests.model_envoy import GrpcLoop, ModelEnvoy
from xdsproxy.harness.stack import running_proxy
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.model import WorkloadKey
from xdsproxy.wire import typeurls

pytestmark = pytest.mark.istiod
CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE
EGRESS = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
APP = WorkloadKey("default", "app")
REVIEWS = ServicePort("reviews.shop.svc.cluster.local", 9080)
RATINGS = ServicePort("ratings.shop.svc.cluster.local", 50051)
MYSQL = ServicePort("mysql.shop.svc.cluster.local", 3306)
CACHE = ServicePort("cache.shop.svc.cluster.local", 6379)
PAYMENTS = ServicePort("api.payments.example.com", 443)
PG = ServicePort("pg.shop.svc.cluster.local", 5432)


def _vhost(envoy: ModelEnvoy, table: str, service: ServicePort) -> bytes | None:
    body = envoy.held.get(RDS, {}).get(table)
    if body is None:
        return None
    config = RouteConfiguration()
    Any.FromString(body).Unpack(config)
    for vhost in config.virtual_hosts:
        if vhost.name == f"{service.host}:{service.port}" or vhost.name == service.host:
            return vhost.SerializeToString(deterministic=True)
    return None


def _istio_clusters(envoy: ModelEnvoy, service: ServicePort) -> dict[str, bytes]:
    """The service's clusters (subsets included) as the envoy holds them."""
    prefix, suffix = f"outbound|{service.port}|", f"|{service.host}"
    return {n: b for n, b in envoy.held[CDS].items() if n.startswith(prefix) and n.endswith(suffix)}


class Pair:
    """One workload's sidecar twice: direct to Istiod (the truth) and lazy through xdsproxy."""

    def __init__(self, istiod_port: int, proxy_port: int, delta: bool, namespace="default"):
        node = istio_sidecar_node(namespace, "app", "10.244.0.5")
        self.direct = GrpcLoop(ModelEnvoy(node, delta), istiod_port).start()
        self.lazy = GrpcLoop(ModelEnvoy(node, delta), proxy_port).start()

    async def quiet(self) -> None:
        await self.direct.quiet()
        await self.lazy.quiet()

    async def close(self) -> None:
        await self.lazy.close()
        await self.direct.close()

    def assert_healthy(self) -> None:
        for loop in (self.direct, self.lazy):
            assert loop.envoy.violations == [], loop.envoy.violations[:3]
            assert loop.envoy.nacks == 0 and not loop.envoy.warming

    def assert_as_istio(self, service: ServicePort) -> None:
        """The lazy sidecar holds the service's clusters and endpoints exactly as Istiod sent."""
        truth = _istio_clusters(self.direct.envoy, service)
        assert truth, service
        assert _istio_clusters(self.lazy.envoy, service) == truth, service
        for name in truth:
            if name in self.direct.envoy.held.get(EDS, {}):
                assert self.lazy.envoy.held[EDS].get(name) == self.direct.envoy.held[EDS][name]


def lazy_proxy(istiod_port: int, **config):
    return running_proxy(
        istiod_port, mode="lazy", egress=EGRESS, als_listen="127.0.0.1:0", **config
    )


async def test_lazy_scoping_dangles_nowhere_and_a_learn_restores_istios_own(
    istiod, delta: bool
) -> None:
    async with lazy_proxy(istiod.ads_port) as proxy:
        pair = Pair(istiod.ads_port, proxy.port, delta)
        try:
            await pair.quiet()
            pair.assert_healthy()
            direct, lazy = pair.direct.envoy, pair.lazy.envoy
            # Every type at once: a placeholder its listener names is no cluster to warm.
            assert set(lazy.held) == set(direct.held)
            assert cluster_name(EGRESS) in lazy.held[CDS]
            # Nothing learned yet: no HTTP service's cluster, no vhost of it.
            for service in (REVIEWS, RATINGS):
                assert not _istio_clusters(lazy, service)
                assert _vhost(lazy, str(service.port), service) is None
            assert _vhost(direct, "9080", REVIEWS) is not None
            # TCP and sniffed services go through the egress until learned: no cluster of
            # Istio's for them (a placeholder of the same name, or none in compact mode).
            for service in (MYSQL, CACHE):
                assert _istio_clusters(lazy, service) != _istio_clusters(direct, service)
            assert len(lazy.held[CDS]) < len(direct.held[CDS])
            # A headless service is kept as Istio sent it (only the caller knows its pod IPs).
            assert _istio_clusters(lazy, PG) == _istio_clusters(direct, PG)

            await proxy.runtime.learner.add_dependencies(
                APP, [REVIEWS, RATINGS, MYSQL, CACHE, PAYMENTS]
            )
            await pair.quiet()
            pair.assert_healthy()
            for service in (REVIEWS, RATINGS, MYSQL, CACHE, PAYMENTS):
                pair.assert_as_istio(service)
            # The weighted route to the subsets, as Istio built it.
            assert _vhost(lazy, "9080", REVIEWS) == _vhost(direct, "9080", REVIEWS)
            assert _vhost(lazy, "50051", RATINGS) == _vhost(direct, "50051", RATINGS)
            for listener in ("10.96.1.30_3306", "10.96.1.40_6379"):
                assert lazy.held[LDS][listener] == direct.held[LDS][listener], listener
        finally:
            await pair.close()


async def test_a_sidecar_resource_is_never_widened(istiod, delta: bool) -> None:
    """A namespace's Sidecar resource limits what Istiod sends its sidecars: learning a service
    outside it adds nothing (Istiod never sent it), and what it allows is restored exactly."""
    inventory = ServicePort("inventory.restricted.svc.cluster.local", 8080)
    async with lazy_proxy(istiod.ads_port) as proxy:
        pair = Pair(istiod.ads_port, proxy.port, delta, namespace="restricted")
        try:
            await pair.quiet()
            direct, lazy = pair.direct.envoy, pair.lazy.envoy
            assert not _istio_clusters(direct, REVIEWS)  # the Sidecar resource at work
            workload = WorkloadKey("restricted", "app")
            await proxy.runtime.learner.add_dependencies(workload, [REVIEWS, inventory])
            await pair.quiet()
            pair.assert_healthy()
            assert not _istio_clusters(lazy, REVIEWS)
            pair.assert_as_istio(inventory)
            assert set(lazy.held[CDS]) <= set(direct.held[CDS])
        finally:
            await pair.close()
