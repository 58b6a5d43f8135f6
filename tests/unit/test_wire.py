"""Wire layer: names and exact bytes out of real Istio config, and splicing back."""

import contextlib

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.any_pb2 import Any
from hypothesis import given
from hypothesis import strategies as st

from tests.istio_fixtures import dump_files, load_dump
from xdsproxy.wire import typeurls
from xdsproxy.wire.codec import (
    WireError,
    decode_delta_response,
    decode_sotw_response,
    encode_delta_resource,
    encode_delta_response,
    encode_sotw_response,
)

DUMPS = dump_files()


def test_fixtures_are_present() -> None:
    assert len(DUMPS) == 4


def _sotw_bytes(type_url: str, bodies: list[bytes], nonce: str = "n1") -> bytes:
    response = discovery_pb2.DiscoveryResponse(
        version_info="2026-11-22T10:00:00Z/42", type_url=type_url, nonce=nonce
    )
    for body in bodies:
        response.resources.append(Any.FromString(body))
    return response.SerializeToString()


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.name.split("_")[0])
def test_fixture_names_and_bytes_survive_sotw(path) -> None:
    dump = load_dump(path)
    assert dump.istio_only_types, "the fixture should carry Istio-only types"
    for type_url, entries in dump.resources.items():
        data = _sotw_bytes(type_url, [body for _, body in entries])
        decoded = decode_sotw_response(data)
        assert decoded.type_url == type_url
        assert decoded.version == "2026-11-22T10:00:00Z/42"
        assert list(decoded.names) == [name for name, _ in entries]
        assert list(decoded.bodies) == [body for _, body in entries]
        spliced = encode_sotw_response(decoded.version, type_url, "n1", decoded.bodies)
        assert spliced == data


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.name.split("_")[0])
def test_fixture_istio_only_types_pass_intact(path) -> None:
    dump = load_dump(path)
    joined = b"".join(body for entries in dump.resources.values() for _, body in entries)
    for type_url in dump.istio_only_types:
        assert type_url.encode() in joined
    # Keeping a subset keeps each kept resource's bytes exactly.
    clusters = dump.resources[typeurls.CLUSTER]
    decoded = decode_sotw_response(_sotw_bytes(typeurls.CLUSTER, [b for _, b in clusters]))
    kept = decoded.bodies[::2]
    again = decode_sotw_response(encode_sotw_response("v", typeurls.CLUSTER, "n", kept))
    assert again.bodies == kept
    assert again.names == decoded.names[::2]


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.name.split("_")[0])
def test_fixture_names_and_bytes_survive_delta(path) -> None:
    dump = load_dump(path)
    for type_url, entries in dump.resources.items():
        bodies = [encode_delta_resource(name, body, "v1") for name, body in entries]
        data = encode_delta_response("sys", type_url, "n9", bodies, ["gone-a", "gone-b"])
        real = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
        assert [r.name for r in real.resources] == [name for name, _ in entries]
        assert [r.resource.SerializeToString() for r in real.resources] == [b for _, b in entries]
        decoded = decode_delta_response(data)
        assert list(decoded.names) == [name for name, _ in entries]
        assert set(decoded.versions) == {"v1"}
        assert list(decoded.bodies) == bodies
        assert decoded.removed == ("gone-a", "gone-b")
        assert decoded.nonce == "n9" and decoded.system_version == "sys"


def test_unknown_type_url_passes_as_opaque_bytes() -> None:
    opaque = Any(
        type_url="type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig",
        value=b"\xff\xfe not protobuf",
    ).SerializeToString()
    data = _sotw_bytes("type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig", [opaque])
    decoded = decode_sotw_response(data)
    assert decoded.bodies == (opaque,) and decoded.names == ("",)
    assert encode_sotw_response(decoded.version, decoded.type_url, "n1", decoded.bodies) == data


def test_named_type_with_broken_body_still_passes() -> None:
    broken = Any(type_url=typeurls.CLUSTER, value=b"\x0a\xff\xff").SerializeToString()
    decoded = decode_sotw_response(_sotw_bytes(typeurls.CLUSTER, [broken]))
    assert decoded.bodies == (broken,) and decoded.names == ("",)


@pytest.mark.parametrize("decode", [decode_sotw_response, decode_delta_response])
def test_garbage_is_a_wire_error(decode) -> None:
    with pytest.raises(WireError):
        decode(b"\x0a\xff\xff\xff\xff\xff")


_names = st.lists(st.text(min_size=0, max_size=40), max_size=30)


@given(_names, st.text(max_size=20), st.text(max_size=20))
def test_sotw_roundtrip_property(names: list[str], version: str, nonce: str) -> None:
    bodies = []
    for name in names:
        packed = Any()
        packed.Pack(Cluster(name=name, type=Cluster.EDS))
        bodies.append(packed.SerializeToString())
    data = encode_sotw_response(version, typeurls.CLUSTER, nonce, bodies)
    decoded = decode_sotw_response(data)
    assert decoded.names == tuple(names)
    assert decoded.bodies == tuple(bodies)
    assert (decoded.version, decoded.nonce) == (version, nonce)
    assert discovery_pb2.DiscoveryResponse.FromString(data).resources[0:1] == [
        Any.FromString(b) for b in bodies[0:1]
    ]


@given(_names, st.lists(st.text(max_size=20), max_size=5))
def test_delta_roundtrip_property(names: list[str], removed: list[str]) -> None:
    bodies = [
        encode_delta_resource(n, Any(type_url="t/x", value=n.encode()).SerializeToString())
        for n in names
    ]
    decoded = decode_delta_response(encode_delta_response("s", "t/x", "n", bodies, removed))
    assert decoded.names == tuple(names)
    assert decoded.bodies == tuple(bodies)
    assert decoded.removed == tuple(removed)


@given(st.binary(max_size=300))
def test_decoders_never_raise_anything_but_wire_error(data: bytes) -> None:
    for decode in (decode_sotw_response, decode_delta_response):
        with contextlib.suppress(WireError):
            decode(data)


def test_equal_bodies_from_different_responses_share_one_object() -> None:

    bodies = [
        Any(type_url=typeurls.CLUSTER, value=bytes([i]) * 50).SerializeToString() for i in range(3)
    ]
    first = decode_sotw_response(encode_sotw_response("v1", typeurls.CLUSTER, "a", bodies))
    second = decode_sotw_response(encode_sotw_response("v2", typeurls.CLUSTER, "b", bodies))
    assert all(x is y for x, y in zip(first.bodies, second.bodies, strict=True))


def test_pool_sweeps_what_nobody_holds() -> None:
    from xdsproxy.wire.pool import BodyPool

    pool = BodyPool()
    kept = pool.intern([b"kept-" + bytes(10)])
    pool.intern([b"dropped-" + bytes(10)])
    assert len(pool) == 2
    assert pool.sweep() == 1 and len(pool) == 1
    assert pool.intern([b"kept-" + bytes(10)])[0] is kept[0]


def _cds(names: list[str], version: str, nonce: str) -> bytes:
    bodies = [
        Any(type_url=typeurls.CLUSTER, value=Cluster(name=n).SerializeToString()) for n in names
    ]
    return discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=typeurls.CLUSTER, nonce=nonce, resources=bodies
    ).SerializeToString()


def test_same_resources_under_another_version_and_nonce_decode_to_the_same_objects() -> None:
    names = [f"outbound|80||svc-{i}.ns.svc.cluster.local" for i in range(50)]
    first = decode_sotw_response(_cds(names, "v1", "n1"))
    again = decode_sotw_response(_cds(names, "v2-longer", "nonce-2"))
    assert (again.version, again.nonce) == ("v2-longer", "nonce-2")
    assert again.names is first.names and again.bodies is first.bodies
    # One resource different, even the last: decoded afresh, never taken from the cache.
    changed = decode_sotw_response(
        _cds([*names[:-1], "outbound|80||other.ns.svc.cluster.local"], "v1", "n1")
    )
    assert changed.names[-1] == "outbound|80||other.ns.svc.cluster.local"
    assert changed.names[:-1] == first.names[:-1]


def test_envelope_fields_out_of_order_still_decode_exactly() -> None:
    names = ["outbound|80||a.ns.svc.cluster.local", "outbound|80||b.ns.svc.cluster.local"]
    canonical = _cds(names, "v1", "n1")
    # The same message with the nonce (field 5) written before the resources (field 2).
    nonce_field = discovery_pb2.DiscoveryResponse(nonce="n1").SerializeToString()
    rest = discovery_pb2.DiscoveryResponse.FromString(canonical)
    rest.nonce = ""
    shuffled = nonce_field + rest.SerializeToString()
    assert discovery_pb2.DiscoveryResponse.FromString(
        shuffled
    ) == discovery_pb2.DiscoveryResponse.FromString(canonical)
    decoded = decode_sotw_response(shuffled)
    assert decoded.names == tuple(names) and decoded.nonce == "n1"


def test_a_response_larger_than_the_decode_cache_still_decodes_every_time() -> None:
    huge = Any(type_url="type.googleapis.com/example.Blob", value=b"x" * (12 * 1024 * 1024))
    data = discovery_pb2.DiscoveryResponse(
        version_info="v1", type_url="type.googleapis.com/example.Blob", nonce="n", resources=[huge]
    ).SerializeToString()
    for _ in range(2):
        assert decode_sotw_response(data).bodies == (huge.SerializeToString(),)
