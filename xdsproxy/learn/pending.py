"""Access log entries for services this replica does not know yet. Pure logic.

The egress can route a request to a service a moment before that service's config reaches
this replica (Istiod pushes each stream on its own; with several replicas it is routine). Such
an entry is held, bounded in count and age, and handed back when the service appears, instead
of being rejected for good: otherwise the workload stays on the egress until another of its
requests happens to be logged.
"""

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from xdsproxy.istio.names import ServicePort
from xdsproxy.learn.attribution import AccessRecord

MAX_ENTRIES = 1000
MAX_AGE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Held:
    record: AccessRecord
    started: float  # when the egress saw the request (0 when not known)
    held_at: float  # monotonic


class PendingEntries:
    """Held entries by the service they reached, oldest first. Holding more than `limit`
    drops the oldest; entries older than `max_age` are dropped when met. Both are counted in
    `expired`, so an operator sees learns lost to timing."""

    def __init__(self, limit: int = MAX_ENTRIES, max_age: float = MAX_AGE_SECONDS) -> None:
        self.limit = limit
        self.max_age = max_age
        self.expired = 0
        self._held: OrderedDict[int, tuple[ServicePort, Held]] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, service: ServicePort, record: AccessRecord, started: float, now: float) -> None:
        self.expire(now)
        self._held[self._next] = (service, Held(record, started, now))
        self._next += 1
        while len(self._held) > self.limit:
            self._held.popitem(last=False)
            self.expired += 1

    def expire(self, now: float) -> None:
        while self._held:
            key, (_, held) = next(iter(self._held.items()))
            if now - held.held_at <= self.max_age:
                return
            del self._held[key]
            self.expired += 1

    def take(self, known: Iterable[ServicePort], now: float) -> list[Held]:
        """The live entries for any of these services, removed, oldest first."""
        self.expire(now)
        wanted = set(known)
        if not wanted or not self._held:
            return []
        taken = [key for key, (service, _) in self._held.items() if service in wanted]
        return [self._held.pop(key)[1] for key in taken]
