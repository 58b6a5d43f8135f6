"""Real Istio sidecar config dumps (shared/fixtures) turned into the bytes Istiod would send.

Envoy's config dump is JSON. Resources are parsed back into Envoy protos; typed configs of
Istio-only types (unknown to a stock Envoy and to xds-protos) become `Any`s that keep their
original type URL around an opaque payload, which is exactly what such resources look like on
the wire to xdsproxy.
"""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from google.protobuf import json_format, symbol_database
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from xdsproxy.wire import typeurls
from xdsproxy.wire.registry import load_envoy_types

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "istio-config-dumps"
_MARK = "__xdsproxy_original_type__"
_STRUCT = "type.googleapis.com/google.protobuf.Struct"


def dump_files() -> list[Path]:
    return sorted(FIXTURES.glob("*.json"))


def _known(type_url: str) -> bool:
    try:
        symbol_database.Default().pool.FindMessageTypeByName(type_url.rsplit("/", 1)[-1])
    except KeyError:
        return False
    return True


def _mark_unknown(node: object, unknown: set[str]) -> object:
    if isinstance(node, list):
        return [_mark_unknown(item, unknown) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _mark_unknown(value, unknown) for key, value in node.items()}
    type_url = out.get("@type")
    if isinstance(type_url, str) and not _known(type_url):
        unknown.add(type_url)
        body = {k: v for k, v in out.items() if k != "@type"}
        body[_MARK] = type_url
        return {"@type": _STRUCT, "value": body}
    return out


def _restore_unknown(message: Message) -> None:
    if isinstance(message, Any) and message.type_url == _STRUCT:
        body = Struct()
        message.Unpack(body)
        if _MARK in body.fields:
            original = body.fields[_MARK].string_value
            del body.fields[_MARK]
            message.type_url, message.value = original, body.SerializeToString()
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.is_repeated:
            items = value.values() if field.message_type.GetOptions().map_entry else value
            for item in items:
                if isinstance(item, Message):
                    _restore_unknown(item)
        else:
            _restore_unknown(value)


def _to_any(resource: dict, unknown: set[str]) -> bytes:
    packed = Any()
    json_format.ParseDict(_mark_unknown(resource, unknown), packed)
    inner_type = symbol_database.Default().GetSymbol(packed.type_url.rsplit("/", 1)[-1])
    inner = inner_type.FromString(packed.value)
    _restore_unknown(inner)
    return Any(type_url=packed.type_url, value=inner.SerializeToString()).SerializeToString()


_SECTIONS = {
    "ClustersConfigDump": (typeurls.CLUSTER, "dynamic_active_clusters", ("cluster",)),
    "ListenersConfigDump": (typeurls.LISTENER, "dynamic_listeners", ("active_state", "listener")),
    "RoutesConfigDump": (typeurls.ROUTE, "dynamic_route_configs", ("route_config",)),
    "EndpointsConfigDump": (typeurls.ENDPOINT, "dynamic_endpoint_configs", ("endpoint_config",)),
    "EcdsConfigDump": (typeurls.EXTENSION_CONFIG, "ecds_filters", ("ecds_filter",)),
}


@dataclass(frozen=True)
class Dump:
    node: dict
    resources: dict[str, list[tuple[str, bytes]]]  # type URL -> [(name, serialized Any)]
    istio_only_types: frozenset[str]


@cache
def load_dump(path: Path) -> Dump:
    """Every dynamic resource in a config dump, as Istiod would have sent it."""
    load_envoy_types()
    dump = json.loads(path.read_text())
    out: dict[str, list[tuple[str, bytes]]] = {}
    unknown: set[str] = set()
    node: dict = {}
    for section in dump["configs"]:
        kind = section["@type"].rsplit(".", 1)[-1]
        if kind == "BootstrapConfigDump":
            node = section["bootstrap"]["node"]
        if kind not in _SECTIONS:
            continue
        type_url, key, steps = _SECTIONS[kind]
        for entry in section.get(key, []):
            resource = entry
            for step in steps:
                resource = resource.get(step) if isinstance(resource, dict) else None
            if not resource:
                continue
            name = resource.get("name") or resource.get("cluster_name", "")
            out.setdefault(type_url, []).append((name, _to_any(resource, unknown)))
    return Dump(node, out, frozenset(unknown))
