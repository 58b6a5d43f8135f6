"""Compact mode's mesh ranges from the Kubernetes ServiceCIDR API, read once at start through
the API server stand-in, and what happens where the API is missing or unreachable."""

import ipaddress
import logging

import pytest
from kubernetes import client

from xdsproxy.harness.kubeapi import KubeApiStandIn
from xdsproxy.harness.stack import running_proxy, running_sim
from xdsproxy.istio.names import ServicePort
from xdsproxy.server.servicecidrs import service_cidrs
from xdsproxy.sim.mesh import generate

EGRESS = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)


def _settings(api: KubeApiStandIn) -> dict:
    return {
        "mode": "lazy",
        "egress": EGRESS,
        "store": "kubernetes://istio-system",
        "als_listen": "127.0.0.1:0",
        "kube_client": client.ApiClient(client.Configuration(host=api.url)),
    }


async def test_the_ranges_come_from_the_servicecidr_objects() -> None:
    with KubeApiStandIn() as api:
        api.state.service_cidrs = ["10.96.0.0/16", "fd00:10:96::/112"]
        async with (
            running_sim(generate(20)) as sim,
            running_proxy(sim.port, **_settings(api)) as proxy,
        ):
            compact = proxy.runtime.compact
            assert compact is not None and compact.tcp and not compact.sniffed
            assert compact.ranges.networks == (
                ipaddress.ip_network("10.96.0.0/16"),
                ipaddress.ip_network("fd00:10:96::/112"),
            )
            assert compact.ranges.source == "the Kubernetes ServiceCIDR API"


async def test_without_the_api_auto_mode_stays_off_and_says_how_to_turn_it_on(caplog) -> None:
    with KubeApiStandIn() as api:  # no ServiceCIDR objects: 404, as before Kubernetes 1.33
        caplog.set_level(logging.WARNING, logger="xdsproxy.servicecidrs")
        async with (
            running_sim(generate(20)) as sim,
            running_proxy(sim.port, **_settings(api)) as proxy,
        ):
            compact = proxy.runtime.compact
            assert compact is not None and compact.ranges.networks == ()
            assert not compact.ranges.derive, "auto never derives ranges"
            compact.ranges.settle(["10.96.0.10"])
            assert compact.ranges.networks == ()
    assert any(
        "--service-cidr" in r.getMessage() and "404" in r.getMessage() for r in caplog.records
    )


def test_an_unreachable_api_gives_no_ranges() -> None:
    unreachable = client.ApiClient(client.Configuration(host="http://127.0.0.1:1"))
    assert service_cidrs(unreachable) == ()


@pytest.mark.parametrize("cidrs", [["10.96.0.0/12"], ["10.96.0.0/16", "10.97.0.0/16"]])
def test_the_stand_in_lists_what_it_was_given(cidrs: list[str]) -> None:
    with KubeApiStandIn() as api:
        api.state.service_cidrs = cidrs
        assert service_cidrs(client.ApiClient(client.Configuration(host=api.url))) == tuple(cidrs)
