"""The hook through which a policy decides what part of the upstream view a stream forwards."""

from typing import Protocol


class ResourceView(Protocol):
    def select(
        self, type_url: str, names: tuple[str, ...], bodies: tuple[bytes, ...]
    ) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
        """The resources to forward, given what the upstream sent.

        Returning the very same tuples means "forward unchanged", which lets the stream relay
        the upstream message byte for byte.
        """
        ...


class PassThrough:
    """Forward everything: the passthrough mode."""

    def select(
        self, type_url: str, names: tuple[str, ...], bodies: tuple[bytes, ...]
    ) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
        return names, bodies


PASS_THROUGH = PassThrough()
