"""Why a service is, or is not, in a workload's scope (`xdsproxy scope why`), from what one
replica knows: the scope's learned edges and static patterns, what ageing and operators
dropped, and how the service's clusters went to the workload's sidecars."""

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from xdsproxy.istio.names import ServicePort
from xdsproxy.scope.scope import Scope

# How a sidecar got one cluster of the service: Istio's own, a placeholder routing to the lazy
# egress, or nothing.
DIRECT, EGRESS, WITHHELD = "direct", "via the lazy egress", "withheld"


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def explain(
    scope: Scope,
    services: list[ServicePort],
    dropped: Callable[[ServicePort], tuple[str, float] | None],
    clusters: Mapping[ServicePort, Mapping[str, str]],
    referrers: Mapping[str, list[str]],
) -> list[dict[str, Any]]:
    """One answer per service port. `clusters` maps each service to its cluster names and how
    they were pushed (empty when no sidecar of the workload is connected here); `referrers`
    names the pushed listeners and route tables that reference a cluster."""
    answers = []
    for service in services:
        reasons: list[str] = []
        edge = scope.learned.get(service)
        if edge is not None:
            by = f" by {edge.learned_by}" if edge.learned_by else ""
            reasons.append(
                f"learned{by}: first seen {_time(edge.first_seen)}, "
                f"last seen {_time(edge.last_seen)}"
            )
        for pattern in scope.static:
            if pattern.matches(service):
                where = f" ({pattern.source})" if pattern.source else ""
                reasons.append(f"static rule {str(pattern)!r}{where}")
        pushed = clusters.get(service, {})
        for name, how in sorted(pushed.items()):
            if how == DIRECT and edge is None and not any(r.startswith("static") for r in reasons):
                users = referrers.get(name) or ["xdsproxy's always-kept config"]
                reasons.append(f"kept: {name} is referenced by {', '.join(users)}")
        if not reasons:
            gone = dropped(service)
            if gone is not None:
                reasons.append(f"not in scope: {gone[0]} at {_time(gone[1])}")
            else:
                reasons.append(
                    "not in scope: no request from this workload to it has reached the lazy "
                    "egress; the first one goes through the egress and is learned"
                )
        answers.append(
            {
                "service": str(service),
                "in_scope": scope.covers(service),
                "clusters": dict(sorted(pushed.items())),
                "reasons": reasons,
            }
        )
    return answers
