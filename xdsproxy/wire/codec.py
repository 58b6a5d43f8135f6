"""Decode and encode xDS responses as envelopes around exact resource bytes.

A response is read into its envelope fields plus, per resource, its name and the exact bytes the
sender wrote (`bodies`, parallel to `names`). Encoding splices those bytes into a new envelope, so
a resource xdsproxy does not change reaches Envoy byte for byte as Istiod sent it, Istio-only
extension types included. Parallel tuples rather than an object per resource keep decoding of a
5,000-cluster response within a small multiple of upb's own parse time.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache
from google.protobuf.message import DecodeError

from xdsproxy import caches
from xdsproxy.wire import lean
from xdsproxy.wire.pool import POOL, intern_names
from xdsproxy.wire.typeurls import NAMED_TYPES


class WireError(ValueError):
    """A message that is not a valid xDS envelope."""


@dataclass(frozen=True, slots=True)
class SotwResponse:
    """`bodies` are serialized `google.protobuf.Any`."""

    version: str
    type_url: str
    nonce: str
    names: tuple[str, ...]
    bodies: tuple[bytes, ...]
    control_plane: bytes = b""
    canary: bool = False


@dataclass(frozen=True, slots=True)
class DeltaResponse:
    """`bodies` are serialized `envoy.service.discovery.v3.Resource`; `anys` the serialized
    `Any` each of them wraps (empty for a resource sent without a body)."""

    system_version: str
    type_url: str
    nonce: str
    names: tuple[str, ...]
    versions: tuple[str, ...]
    bodies: tuple[bytes, ...]
    anys: tuple[bytes, ...]
    removed: tuple[str, ...] = ()
    control_plane: bytes = b""
    removed_resource_names: tuple[bytes, ...] = ()
    # Equal for responses with the same resource bytes, never reused; 0 when not known.
    resources_id: int = 0


def _sotw_names(data: bytes, type_url: str, count: int) -> tuple[str, ...]:
    if type_url not in NAMED_TYPES:
        return ("",) * count
    try:
        named = lean.SotwNames.FromString(data).resources
    except DecodeError:
        # A resource whose body is not a valid message of its declared type still passes
        # through unchanged; it just has no name xdsproxy can act on.
        return ("",) * count
    return intern_names([entry.value.name for entry in named])


_EDGE = 1024


@dataclass(frozen=True, slots=True)
class _Seen:
    region: bytes  # the resource bytes of a response
    decoded: tuple  # what decoding them gave
    size: int  # bytes it keeps alive
    serial: int  # names these resource bytes for as long as the process runs


# Istiod sends the same resources to many sidecars, each under its own version and nonce: a
# response whose resource bytes equal one already decoded reuses its names and shared bodies
# (and, being the same objects, lets streams share what they build from them: see
# `xds.shared`). Found by length and the bytes at both ends, then confirmed by comparing every
# byte (memcmp speed, several times faster than hashing them), so a match is exact. Only the
# responses of the last few pushes are worth keeping (a push reaches every sidecar within
# seconds), and under churn every push brings new ones: bounded by the bytes entries keep alive.
DECODE_CACHE_BYTES = caches.CACHES["decoded_responses"].size
_DECODED: LRUCache[tuple, list[_Seen]] = caches.lru(
    "decoded_responses", getsizeof=lambda entries: sum(e.size for e in entries) + 1
)


_SERIALS = itertools.count(1)


def clear_decode_cache() -> None:
    """Forget every decoded response (benchmarks measure the first decode with it)."""
    _DECODED.clear()


def span_between(data: bytes, prefix: bytes, suffix: bytes) -> tuple[int, int] | None:
    """Where the bytes between `prefix` and `suffix` lie in `data`, if it starts and ends with
    them. Callers pass the re-encoded fields around a repeated field, so a span is found only
    when the sender wrote the message in field order and the span holds that field alone."""
    if len(prefix) + len(suffix) > len(data):
        return None
    if not (data.startswith(prefix) and data.endswith(suffix)):
        return None
    return len(prefix), len(data) - len(suffix)


def _decoded_once(
    kind: str,
    data: bytes,
    span: tuple[int, int] | None,
    decode: Callable[[], tuple],
    held: Callable[[tuple], int],
) -> tuple[tuple, int]:
    """`decode()`, or what it gave for a response with the same resource bytes at `span`;
    with the serial of those bytes (0 when they are not kept)."""
    if span is None:
        return decode(), 0
    start, end = span
    edge = min(_EDGE, end - start)  # within the resources: the nonce around them differs
    key = (kind, end - start, data[start : start + edge], data[end - edge : end])
    entries = _DECODED.get(key, [])
    for seen in entries:
        # `startswith` at an offset compares in place (a slice would copy megabytes); the key
        # fixed the length.
        if data.startswith(seen.region, start):
            return seen.decoded, seen.serial
    decoded = decode()
    entry = _Seen(data[start:end], decoded, end - start + held(decoded), next(_SERIALS))
    if entry.size > DECODE_CACHE_BYTES // 4:  # a giant response is not kept
        return decoded, 0
    _DECODED[key] = [*entries[-3:], entry]
    return decoded, entry.serial


def _total(*groups: tuple[bytes, ...]) -> int:
    return sum(sum(map(len, group)) for group in groups)


def _sotw_resources(
    data: bytes, envelope: lean.SotwResponse
) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    # The resources (and canary) lie between the version and the type URL.
    head = lean.SotwResponse(version_info=envelope.version_info)
    tail = lean.SotwResponse(
        type_url=envelope.type_url, nonce=envelope.nonce, control_plane=envelope.control_plane
    )
    span = span_between(data, head.SerializeToString(), tail.SerializeToString())

    def decode() -> tuple[tuple[str, ...], tuple[bytes, ...]]:
        bodies = POOL.intern(envelope.resources)
        return _sotw_names(data, envelope.type_url, len(bodies)), bodies

    (names, bodies), _ = _decoded_once(
        "sotw " + envelope.type_url, data, span, decode, lambda d: _total(d[1])
    )
    return names, bodies


def decode_sotw_response(data: bytes) -> SotwResponse:
    try:
        envelope = lean.SotwResponse.FromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed DiscoveryResponse: {exc}") from None
    names, bodies = _sotw_resources(data, envelope)
    return SotwResponse(
        version=envelope.version_info,
        type_url=envelope.type_url,
        nonce=envelope.nonce,
        names=names,
        bodies=bodies,
        control_plane=envelope.control_plane,
        canary=envelope.canary,
    )


def encode_sotw_response(
    version: str,
    type_url: str,
    nonce: str,
    bodies: list[bytes] | tuple[bytes, ...],
    control_plane: bytes = b"",
    canary: bool = False,
) -> bytes:
    return lean.SotwResponse(
        version_info=version,
        type_url=type_url,
        nonce=nonce,
        resources=bodies,
        control_plane=control_plane,
        canary=canary,
    ).SerializeToString()


def decode_delta_response(data: bytes) -> DeltaResponse:
    try:
        envelope = lean.DeltaResponse.FromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed DeltaDiscoveryResponse: {exc}") from None
    # The resources lie between the system version and the type URL.
    head = lean.DeltaResponse(system_version_info=envelope.system_version_info)
    tail = lean.DeltaResponse(
        type_url=envelope.type_url,
        nonce=envelope.nonce,
        removed_resources=envelope.removed_resources,
        control_plane=envelope.control_plane,
        removed_resource_names=envelope.removed_resource_names,
    )
    span = span_between(data, head.SerializeToString(), tail.SerializeToString())

    def decode() -> tuple:
        try:
            heads = lean.DeltaNames.FromString(data).resources
        except DecodeError as exc:
            raise WireError(f"malformed DeltaDiscoveryResponse: {exc}") from None
        return (
            intern_names([head.name for head in heads]),
            tuple([head.version for head in heads]),
            POOL.intern(envelope.resources),
            POOL.intern([head.resource for head in heads]),
        )

    (names, versions, bodies, anys), serial = _decoded_once(
        "delta " + envelope.type_url, data, span, decode, lambda d: _total(d[2], d[3])
    )
    return DeltaResponse(
        system_version=envelope.system_version_info,
        type_url=envelope.type_url,
        nonce=envelope.nonce,
        names=names,
        versions=versions,
        bodies=bodies,
        anys=anys,
        removed=tuple(envelope.removed_resources),
        control_plane=envelope.control_plane,
        removed_resource_names=tuple(envelope.removed_resource_names),
        resources_id=serial,
    )


def encode_delta_resource(name: str, any_body: bytes, version: str = "") -> bytes:
    """A Delta `Resource` wrapping a serialized `Any`, without decoding the Any."""
    return lean.DeltaResourceHead(name=name, resource=any_body, version=version).SerializeToString()


def encode_delta_response(
    system_version: str,
    type_url: str,
    nonce: str,
    bodies: list[bytes] | tuple[bytes, ...],
    removed: list[str] | tuple[str, ...] = (),
    control_plane: bytes = b"",
    removed_resource_names: list[bytes] | tuple[bytes, ...] = (),
) -> bytes:
    return lean.DeltaResponse(
        system_version_info=system_version,
        type_url=type_url,
        nonce=nonce,
        resources=bodies,
        removed_resources=removed,
        control_plane=control_plane,
        removed_resource_names=removed_resource_names,
    ).SerializeToString()
