"""Istiod's pushes reach a lazy sidecar as they reach a direct one, and restarts of Istiod and
of xdsproxy lose nothing and remove nothing: Istio's own Istiod, xdsproxy, model Envoys."""

import asyncio

import pytest
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.route.v3.route_components_pb2 import VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.any_pb2 import Any

from tests.helpers import ISTIOD_MESH, istio_sidecar_node
from tests.model_envoy import GrpcLoop, ModelEnvoy
from xdsproxy.harness.istiod import IstiodProcess
from xdsproxy.harness.stack import running_proxy
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.model import WorkloadKey
from xdsproxy.wire import typeurls

pytestmark = pytest.mark.istiod
CDS, EDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE
EGRESS = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
APP = WorkloadKey("default", "app")
REVIEWS = ServicePort("reviews.shop.svc.cluster.local", 9080)
MYSQL = ServicePort("mysql.shop.svc.cluster.local", 3306)
SEARCH = ServicePort("search.shop.svc.cluster.local", 8000)

MORE_REVIEWS = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.10], conditions: {ready: true}}
- {addresses: [10.244.1.11], conditions: {ready: true}}
- {addresses: [10.244.1.12], conditions: {ready: true}}
"""
EVEN_SPLIT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - route:
    - destination: {host: reviews.shop.svc.cluster.local, subset: v1, port: {number: 9080}}
      weight: 50
    - destination: {host: reviews.shop.svc.cluster.local, subset: v2, port: {number: 9080}}
      weight: 50
"""
NEW_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: search, namespace: shop}
spec:
  clusterIP: 10.96.1.60
  selector: {app: search}
  ports: [{name: http, port: 8000, targetPort: 8000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: search-1, namespace: shop, labels: {kubernetes.io/service-name: search}}
addressType: IPv4
ports: [{name: http, port: 8000, protocol: TCP}]
endpoints: [{addresses: [10.244.1.60], conditions: {ready: true}}]
"""


def _addresses(envoy: ModelEnvoy, cluster: str) -> set[str]:
    assignment = ClusterLoadAssignment()
    Any.FromString(envoy.held[EDS][cluster]).Unpack(assignment)
    return {
        lb.endpoint.address.socket_address.address
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    }


def _vhost(envoy: ModelEnvoy, table: str, service: ServicePort) -> VirtualHost | None:
    config = RouteConfiguration()
    Any.FromString(envoy.held[RDS][table]).Unpack(config)
    return next(
        (v for v in config.virtual_hosts if v.name == f"{service.host}:{service.port}"), None
    )


def _weights(vhost: VirtualHost) -> list[int]:
    return [c.weight.value for c in vhost.routes[0].route.weighted_clusters.clusters]


def _lazy(port: int, **config):
    return running_proxy(port, mode="lazy", egress=EGRESS, als_listen="127.0.0.1:0", **config)


async def test_istiods_pushes_reach_a_lazy_sidecar(istiod, delta: bool) -> None:
    node = istio_sidecar_node("default", "app", "10.244.0.5")
    async with _lazy(istiod.ads_port) as proxy:
        direct = GrpcLoop(ModelEnvoy(node, delta), istiod.ads_port).start()
        lazy = GrpcLoop(ModelEnvoy(node, delta), proxy.port).start()
        try:
            await proxy.runtime.learner.add_dependencies(APP, [REVIEWS, MYSQL])
            for loop in (direct, lazy):
                await loop.quiet()
            reviews = cluster_name(REVIEWS)

            await asyncio.to_thread(istiod.apply, MORE_REVIEWS)  # an endpoint added
            for loop in (direct, lazy):
                await loop.quiet()
            assert "10.244.1.12" in _addresses(direct.envoy, reviews)
            assert lazy.envoy.held[EDS][reviews] == direct.envoy.held[EDS][reviews]

            await asyncio.to_thread(istiod.apply, EVEN_SPLIT)  # a VirtualService changed
            for loop in (direct, lazy):
                await loop.quiet()
            assert _weights(_vhost(direct.envoy, "9080", REVIEWS)) == [50, 50]
            assert _vhost(lazy.envoy, "9080", REVIEWS) == _vhost(direct.envoy, "9080", REVIEWS)

            await asyncio.to_thread(istiod.apply, NEW_SERVICE)  # a service added
            for loop in (direct, lazy):
                await loop.quiet()
            search = cluster_name(SEARCH)
            assert search in direct.envoy.held[CDS] and search not in lazy.envoy.held[CDS]
            await proxy.runtime.learner.add_dependencies(APP, [SEARCH])
            await lazy.quiet()
            assert lazy.envoy.held[CDS][search] == direct.envoy.held[CDS][search]
            assert lazy.envoy.held[EDS][search] == direct.envoy.held[EDS][search]
            assert _vhost(lazy.envoy, "8000", SEARCH) == _vhost(direct.envoy, "8000", SEARCH)

            for loop in (direct, lazy):
                assert loop.envoy.violations == [] and loop.envoy.nacks == 0

            await asyncio.to_thread(istiod.delete, NEW_SERVICE)  # and removed again
            for loop in (direct, lazy):
                await loop.quiet()
            assert search not in direct.envoy.held[CDS] and search not in lazy.envoy.held[CDS]
            assert "8000" not in lazy.envoy.held[RDS]
            # Istiod's own order removes the cluster before the listener whose table names it;
            # through xdsproxy (which keeps only clusters Istiod still sends), no worse.
            assert direct.envoy.violations
            assert set(lazy.envoy.violations) <= set(direct.envoy.violations)
        finally:
            await lazy.close()
            await direct.close()


async def test_restarts_of_istiod_and_xdsproxy_lose_nothing_and_remove_nothing(
    tmp_path, delta: bool
) -> None:
    node = istio_sidecar_node("default", "app", "10.244.0.5")
    store = f"sqlite:///{tmp_path}/edges.db"
    istiod = await asyncio.to_thread(IstiodProcess(ISTIOD_MESH).start)
    lazy = None
    try:
        async with _lazy(istiod.ads_port, store=store) as proxy:
            port = proxy.port
            lazy = GrpcLoop(ModelEnvoy(node, delta), port).start()
            await proxy.runtime.learner.add_dependencies(APP, [REVIEWS, MYSQL])
            await lazy.quiet()
            before = dict(lazy.envoy.held[CDS])
            assert cluster_name(REVIEWS) in before

            # Istiod restarts: the sidecar's stream ends, it reconnects once Istiod is back.
            await asyncio.to_thread(istiod.stop)
            await asyncio.wait_for(lazy.ended.wait(), 10)
            istiod = await asyncio.to_thread(
                IstiodProcess(ISTIOD_MESH, ads_port=istiod.ads_port).start
            )
            await lazy.reconnect()
            await lazy.quiet()
            assert lazy.envoy.held[CDS] == before
            assert [r for r in lazy.envoy.removals if r[0] == CDS] == []

        # xdsproxy restarts, on the same port and store.
        await asyncio.wait_for(lazy.ended.wait(), 10)
        async with _lazy(istiod.ads_port, store=store, listen=f"127.0.0.1:{port}"):
            await lazy.reconnect()
            await lazy.quiet()
            assert lazy.envoy.held[CDS] == before
            assert [r for r in lazy.envoy.removals if r[0] == CDS] == []
            assert lazy.envoy.violations == [] and lazy.envoy.nacks == 0
    finally:
        if lazy is not None:
            await lazy.close()
        await asyncio.to_thread(istiod.stop)
