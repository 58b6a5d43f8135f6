"""Passthrough between Istio's own Istiod and a model Envoy: what the sidecar holds through
xdsproxy is what a direct connection to Istiod gives it, resource for resource, byte for byte."""

import pytest

from tests.helpers import istio_sidecar_node
from tests.model_envoy import ORDER, GrpcLoop, ModelEnvoy
from xdsproxy.harness.stack import running_proxy

pytestmark = pytest.mark.istiod


async def test_passthrough_delivers_what_istiod_delivers(istiod, delta: bool) -> None:
    node = istio_sidecar_node("default", "app", "10.244.0.5")
    direct = GrpcLoop(ModelEnvoy(node, delta), istiod.ads_port).start()
    async with running_proxy(istiod.ads_port) as proxy:
        relayed = GrpcLoop(ModelEnvoy(node, delta), proxy.port).start()
        try:
            await direct.quiet()
            await relayed.quiet()
            for type_url in ORDER:
                assert relayed.envoy.held[type_url] == direct.envoy.held[type_url], type_url
            assert len(direct.envoy.held[ORDER[0]]) >= 10
            assert relayed.envoy.violations == [] and relayed.envoy.nacks == 0
        finally:
            await relayed.close()
            await direct.close()
