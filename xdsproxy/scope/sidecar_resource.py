"""A workload's scope as an Istio `Sidecar` resource (networking.istio.io/v1), for a team that
graduates to static config or audits what xdsproxy learned (`xdsproxy scope export`)."""

from typing import Any

from xdsproxy.istio.names import ServicePort
from xdsproxy.scope.scope import Scope

# Labels a controller or Istio's injector adds to every pod: they differ between a workload's
# pods or say nothing about which workload it is, so a selector must not use them.
_GENERATED_LABELS = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "controller-uid",
        "batch.kubernetes.io/controller-uid",
    }
)
_GENERATED_PREFIXES = ("service.istio.io/", "security.istio.io/", "topology.istio.io/")


class NoSelector(ValueError):
    """The workload's labels are unknown here, and a Sidecar without a selector would apply
    to every workload of the namespace."""


def selector_labels(labels: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in sorted(labels.items())
        if k not in _GENERATED_LABELS and not k.startswith(_GENERATED_PREFIXES)
    }


def _host(service: ServicePort) -> str:
    """`ns/FQDN` for a Kubernetes service, `*/HOST` for anything else (a ServiceEntry)."""
    parts = service.host.split(".")
    if len(parts) > 2 and parts[2] == "svc":
        return f"{parts[1]}/{service.host}"
    return f"*/{service.host}"


def sidecar_resource(
    scope: Scope, labels: dict[str, str], egress: ServicePort, exported_at: str
) -> dict[str, Any]:
    """Egress hosts: every learned service and static pattern (a Sidecar's host entry covers
    all ports of the host, so learned ports widen to the host), plus the lazy egress's
    namespace so that the sidecar keeps reaching it while xdsproxy still serves it."""
    selector = selector_labels(labels)
    if not selector:
        raise NoSelector(
            f"{scope.key}: its labels are unknown on this replica (no sidecar of it has "
            "connected since start); a Sidecar without workloadSelector would apply to the "
            "whole namespace"
        )
    hosts = {_host(service) for service in scope.learned}
    for pattern in scope.static:
        namespace = pattern.namespace
        hosts.add(f"{namespace}/{pattern.host}")
    hosts.add(f"{_host(egress).split('/', 1)[0]}/{egress.host}")
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {
            "name": scope.key.workload,
            "namespace": scope.key.namespace,
            "annotations": {
                "xdsproxy.io/exported-at": exported_at,
                "xdsproxy.io/learned": str(len(scope.learned)),
            },
        },
        "spec": {
            "workloadSelector": {"labels": selector},
            "egress": [{"hosts": sorted(hosts)}],
        },
    }
