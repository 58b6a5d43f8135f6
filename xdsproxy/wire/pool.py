"""Content-addressed resource bytes, shared by every stream.

Most sidecars receive byte-identical resources (the same cluster, listener or endpoint
assignment), each decoded into a fresh `bytes` object per stream. Interning maps every body
to one canonical object, so proxy memory grows with the distinct config plus a small cost per
node rather than with nodes times mesh size. Bodies no stream references any more are swept.
"""

import sys
from collections.abc import Iterable

_HELD_BY_POOL = 4  # the dict's key and value, the loop variable, getrefcount's argument


class BodyPool:
    def __init__(self, sweep_every: int = 200_000) -> None:
        self._bodies: dict[bytes, bytes] = {}
        self._sweep_every = sweep_every
        self._since_sweep = 0

    def __len__(self) -> int:
        return len(self._bodies)

    def intern(self, bodies: tuple[bytes, ...] | list[bytes]) -> tuple[bytes, ...]:
        table = self._bodies
        shared = tuple([table.setdefault(body, body) for body in bodies])
        self._since_sweep += len(bodies)
        if self._since_sweep > max(self._sweep_every, 2 * len(table)):
            self.sweep()
        return shared

    def sweep(self) -> int:
        """Forget bodies only the pool still holds; returns how many."""
        self._since_sweep = 0
        unused = [body for body in self._bodies if sys.getrefcount(body) <= _HELD_BY_POOL]
        for body in unused:
            del self._bodies[body]
        return len(unused)


def intern_names(names: Iterable[str]) -> tuple[str, ...]:
    return tuple([sys.intern(name) for name in names])


POOL = BodyPool()
