"""Wire-compatible "lean" views of the xDS envelopes, parsed by upb.

Each view declares only the fields xdsproxy reads. A resource field is declared as `bytes` where
the real schema has a message, so upb hands back the exact serialized bytes of each resource
without decoding it; a second view declares the same field as a tiny message holding field 1,
which is where every named xDS resource keeps its name. Unknown fields are skipped by upb at C
speed. The views are built from a descriptor at import time, so no generated code is needed.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _BYTES, _BOOL, _MESSAGE = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_BOOL, _F.TYPE_MESSAGE
_ONE, _MANY = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_PACKAGE = "xdsproxy.wire.lean"

# (message name, [(field name, number, type, label, message type name or None)])
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str | None]]]] = [
    ("NameOnly", [("name", 1, _STRING, _ONE, None)]),
    ("NamedAny", [("type_url", 1, _STRING, _ONE, None), ("value", 2, _MESSAGE, _ONE, "NameOnly")]),
    (
        "SotwResponse",
        [
            ("version_info", 1, _STRING, _ONE, None),
            ("resources", 2, _BYTES, _MANY, None),
            ("canary", 3, _BOOL, _ONE, None),
            ("type_url", 4, _STRING, _ONE, None),
            ("nonce", 5, _STRING, _ONE, None),
            ("control_plane", 6, _BYTES, _ONE, None),
        ],
    ),
    ("SotwNames", [("resources", 2, _MESSAGE, _MANY, "NamedAny")]),
    (
        "DeltaResponse",
        [
            ("system_version_info", 1, _STRING, _ONE, None),
            ("resources", 2, _BYTES, _MANY, None),
            ("type_url", 4, _STRING, _ONE, None),
            ("nonce", 5, _STRING, _ONE, None),
            ("removed_resources", 6, _STRING, _MANY, None),
            ("control_plane", 7, _BYTES, _ONE, None),
            ("removed_resource_names", 8, _BYTES, _MANY, None),
        ],
    ),
    (
        "DeltaResourceHead",
        [
            ("version", 1, _STRING, _ONE, None),
            ("resource", 2, _BYTES, _ONE, None),
            ("name", 3, _STRING, _ONE, None),
        ],
    ),
    ("DeltaNames", [("resources", 2, _MESSAGE, _MANY, "DeltaResourceHead")]),
    ("StatusMessage", [("message", 2, _STRING, _ONE, None)]),
    # A DiscoveryRequest without its resource names (field 3, skipped): SotW Envoys repeat
    # every name in every ACK, thousands for EDS, and most ACKs change none of them.
    (
        "SotwRequestHead",
        [
            ("version_info", 1, _STRING, _ONE, None),
            ("node", 2, _BYTES, _ONE, None),
            ("type_url", 4, _STRING, _ONE, None),
            ("response_nonce", 5, _STRING, _ONE, None),
            ("error_detail", 6, _MESSAGE, _ONE, "StatusMessage"),
        ],
    ),
]


def _build() -> dict[str, type[Message]]:
    file = descriptor_pb2.FileDescriptorProto(
        name="xdsproxy/wire/lean.proto", package=_PACKAGE, syntax="proto3"
    )
    for message_name, fields in _MESSAGES:
        message = file.message_type.add(name=message_name)
        for name, number, kind, label, type_name in fields:
            field = message.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name, _ in _MESSAGES
    }


_CLASSES = _build()
NameOnly = _CLASSES["NameOnly"]
NamedAny = _CLASSES["NamedAny"]
SotwResponse = _CLASSES["SotwResponse"]
SotwNames = _CLASSES["SotwNames"]
DeltaResponse = _CLASSES["DeltaResponse"]
DeltaResourceHead = _CLASSES["DeltaResourceHead"]
DeltaNames = _CLASSES["DeltaNames"]
SotwRequestHead = _CLASSES["SotwRequestHead"]
