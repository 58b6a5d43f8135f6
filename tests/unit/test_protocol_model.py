"""The SotW and Delta machines against a model Envoy and the simulated Istiod's pure protocol
(`tests/model_envoy.py`), through the life of a scoped sidecar: start, a learn, a narrowing, a
reconnect, a NACK. The model flags any route or listener naming a cluster Envoy lacks or is
warming, any removal of a cluster still named, and any upstream response left unanswered."""

import pytest

from tests.model_envoy import CDS, Loop, ModelEnvoy
from tests.xds_messages import node
from xdsproxy.istio.names import ServicePort, cluster_name
from xdsproxy.istio.node import parse_node
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.scope import Scope
from xdsproxy.scope.sidecar import SidecarView
from xdsproxy.sim.istiod import DeltaConnection, Snapshot, SotwConnection
from xdsproxy.sim.mesh import Endpoint, Port, Service, generate
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.sotw import SotwStream

EGRESS = ServicePort("lazy-egress.istio-system.svc.cluster.local", 80)
NODE_ID = "sidecar~10.0.0.1~app-0.ns-0~ns-0.svc.cluster.local"


def _mesh():
    mesh = generate(30)
    mesh.add(
        Service(
            "lazy-egress",
            "istio-system",
            (Port(80, "HTTP"),),
            "10.96.250.1",
            endpoints=(Endpoint("10.1.0.1", 15081),),
        )
    )
    return mesh


class Sidecar:
    """A scoped sidecar's world: its model Envoy, one xdsproxy stream, one Istiod connection."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.mesh = _mesh()
        self.snapshot = Snapshot(self.mesh, "2026-12-03T00:00:00Z", None)
        envoy_node = node(NODE_ID)
        envoy_node.metadata.update({"NAMESPACE": "ns-0", "WORKLOAD_NAME": "app"})
        self.node = parse_node(envoy_node)
        self.scope = Scope(WorkloadKey("ns-0", "app"))
        self.envoy = ModelEnvoy(envoy_node, delta)
        self.loop = self._connect(self.envoy.connect())

    def _connect(self, requests: list[bytes]) -> Loop:
        stream = (DeltaStream if self.delta else SotwStream)(
            SidecarView(self.scope, cluster_name(EGRESS))
        )
        istiod = (DeltaConnection if self.delta else SotwConnection)(self.snapshot)
        loop = Loop(self.envoy, stream, istiod, to_proxy=list(requests))
        loop.run()
        return loop

    def reconnect(self) -> None:
        self.loop = self._connect(self.envoy.reconnect())

    def refresh(self) -> None:
        self.loop.handle(self.loop.stream.refresh())
        self.loop.run()

    def healthy(self) -> None:
        assert self.envoy.violations == [], self.envoy.violations[:3]
        assert self.loop.istiod.synced(), "an upstream response was never answered"
        assert not self.envoy.warming


def _service(sidecar: Sidecar, index: int) -> ServicePort:
    service = sidecar.mesh.services[f"svc-{index}.ns-{index % 2}.svc.cluster.local"]
    return ServicePort(service.fqdn, service.ports[0].number)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_scoped_sidecars_life_keeps_every_rule(delta: bool) -> None:
    sidecar = Sidecar(delta)
    sidecar.healthy()
    tcp = {n for n in sidecar.envoy.held[CDS] if n.startswith("outbound|3306|")}
    assert tcp, "TCP services are kept by their listeners"

    # A learn: the cluster, its endpoints, then the route.
    learned = _service(sidecar, 4)
    sidecar.scope.learn(learned, 1.0)
    sidecar.refresh()
    sidecar.healthy()
    assert cluster_name(learned) in sidecar.envoy.held[CDS]

    # A narrowing (ageing): the route first, the cluster after.
    sidecar.scope.forget([learned])
    sidecar.refresh()
    sidecar.healthy()
    assert cluster_name(learned) not in sidecar.envoy.held[CDS]

    # A reconnect (xdsproxy or Istiod restarted): nothing Envoy holds is removed on the way.
    sidecar.scope.learn(learned, 2.0)
    sidecar.refresh()
    before = dict(sidecar.envoy.held[CDS])
    sidecar.reconnect()
    sidecar.healthy()
    assert set(before) <= set(sidecar.envoy.held[CDS])

    # A NACK: Envoy rejects a cluster Istiod pushes; nothing claims it was applied, and once
    # Envoy takes it, the sidecar is in sync again.
    bad = _service(sidecar, 6)
    sidecar.envoy.reject.add(cluster_name(bad))
    sidecar.scope.learn(bad, 3.0)
    sidecar.refresh()
    assert sidecar.envoy.nacks >= 1
    assert cluster_name(bad) not in sidecar.envoy.held[CDS]
    sidecar.mesh.generation += 1
    sidecar.snapshot = Snapshot(sidecar.mesh, "2026-12-03T00:00:01Z", None)
    sidecar.loop.push(sidecar.snapshot)  # Istiod resends: still rejected
    assert not sidecar.loop.istiod.synced() or cluster_name(bad) in sidecar.envoy.held[CDS]
    sidecar.envoy.reject.clear()
    sidecar.mesh.generation += 1
    sidecar.snapshot = Snapshot(sidecar.mesh, "2026-12-03T00:00:02Z", None)
    sidecar.loop.push(sidecar.snapshot)
    sidecar.healthy()
    assert cluster_name(bad) in sidecar.envoy.held[CDS]
