"""Fail-open: when the lazy egress has no ready endpoint, scoped sidecars get Istio's full
config instead of a catch-all with nowhere to go. Pure: the runtime feeds it the egress's
endpoints as Istiod reports them (its EDS, which every scoped sidecar watches, so every
replica sees it whichever replica the egress is connected to) and the time.

`never` (the default) keeps scoping whatever happens: full config for every sidecar at once
can exceed memory limits sized for lazy sidecars. `auto` opens at once when the egress has no
ready endpoint, and closes again only after it has had one for `hold_down` seconds, so a
flapping egress does not swing every sidecar between full and scoped config.
"""

from dataclasses import dataclass

from envoy.config.core.v3.health_check_pb2 import HealthStatus
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from google.protobuf.any_pb2 import Any
from google.protobuf.message import DecodeError

from xdsproxy import caches

MODES = ("never", "auto")
_READY = frozenset({HealthStatus.UNKNOWN, HealthStatus.HEALTHY})


@caches.memo("ready_endpoints")
def ready_endpoints(any_bytes: bytes) -> int:
    """Endpoints of a ClusterLoadAssignment that Envoy would send traffic to."""
    assignment = ClusterLoadAssignment()
    try:
        Any.FromString(any_bytes).Unpack(assignment)
    except DecodeError:
        return 0
    return sum(
        1
        for locality in assignment.endpoints
        for endpoint in locality.lb_endpoints
        if endpoint.health_status in _READY
    )


@dataclass
class FailOpen:
    mode: str = "never"
    hold_down: float = 60.0
    active: bool = False
    ready_since: float | None = None  # while active: when the egress became ready again

    def observe(self, ready: int, now: float) -> bool:
        """The egress has `ready` ready endpoints; True when `active` changed."""
        if self.mode != "auto":
            return False
        if ready == 0:
            self.ready_since = None
            if not self.active:
                self.active = True
                return True
            return False
        if self.active and self.ready_since is None:
            self.ready_since = now
        return self.tick(now)

    def tick(self, now: float) -> bool:
        """Close once the egress has been ready for the hold-down; True when it did."""
        if (
            self.active
            and self.ready_since is not None
            and now - self.ready_since >= self.hold_down
        ):
            self.active, self.ready_since = False, None
            return True
        return False
