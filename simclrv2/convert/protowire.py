"""Decode the protobuf wire format, for the few TensorFlow messages a checkpoint holds.

A checkpoint needs four small messages (``BundleHeaderProto``, ``BundleEntryProto`` with its
``TensorShapeProto``, ``TrackableObjectGraph``); decoding them here keeps the ``protobuf``
package and TensorFlow's generated classes out of the converter. A message is described by a
schema, ``{field number: Field}``; unknown fields are skipped as protobuf does. Every varint and
length is checked against the bytes at hand: malformed input raises ``WireError``, never reads
past the buffer. Encoding: https://protobuf.dev/programming-guides/encoding/
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Tuple, Union

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
MAX_VARINT_BYTES = 10


class WireError(ValueError):
    """Bytes that are not a valid protobuf message of the expected schema."""


@dataclass(frozen=True)
class Field:
    """One field of a schema. ``kind``: ``"int"`` (int32/int64/enum/bool varints, two's complement),
    ``"fixed32"``, ``"bytes"``, ``"string"`` (UTF-8) or a nested schema."""

    name: str
    kind: Union[str, Mapping[int, "Field"]]
    repeated: bool = False


Schema = Mapping[int, Field]
WIRE_TYPES = {"int": VARINT, "fixed32": FIXED32, "bytes": LENGTH, "string": LENGTH}
DEFAULTS = {"int": 0, "fixed32": 0, "bytes": b"", "string": ""}


def read_varint(data: memoryview, position: int, limit: int | None = None) -> Tuple[int, int]:
    """(value, position after it) of the base-128 varint at ``position``, read no further than ``limit``."""
    end = len(data) if limit is None else limit
    value = shift = 0
    for index in range(position, min(end, position + MAX_VARINT_BYTES)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                raise WireError(f"varint at byte {position} does not fit in 64 bits")
            return value, index + 1
        shift += 7
    if end - position >= MAX_VARINT_BYTES:
        raise WireError(f"varint at byte {position} is longer than {MAX_VARINT_BYTES} bytes")
    raise WireError(f"truncated varint at byte {position}")


def fields(data: memoryview) -> Iterator[Tuple[int, int, Any]]:
    """(field number, wire type, value) for each field: an int for varints and fixed-width values,
    a memoryview for length-delimited ones."""
    position = 0
    while position < len(data):
        tag, position = read_varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {position}")
        if wire_type == VARINT:
            value, position = read_varint(data, position)
        elif wire_type in (FIXED32, FIXED64):
            size = 4 if wire_type == FIXED32 else 8
            if position + size > len(data):
                raise WireError(f"truncated fixed{size * 8} field {number} at byte {position}")
            value = int.from_bytes(data[position: position + size], "little")
            position += size
        elif wire_type == LENGTH:
            size, position = read_varint(data, position)
            if size > len(data) - position:
                raise WireError(f"field {number} claims {size} bytes, only {len(data) - position} remain")
            value = data[position: position + size]
            position += size
        else:
            raise WireError(f"field {number} has wire type {wire_type} (groups are not used by TensorFlow)")
        yield number, wire_type, value


def _value(field: Field, wire_type: int, value: Any) -> Any:
    expected = LENGTH if isinstance(field.kind, Mapping) else WIRE_TYPES[field.kind]
    if wire_type != expected:
        raise WireError(f"field {field.name} has wire type {wire_type}, expected {expected}")
    if isinstance(field.kind, Mapping):
        return decode(value, field.kind)
    if field.kind == "int":
        return value - (1 << 64) if value >> 63 else value
    if field.kind == "string":
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise WireError(f"field {field.name} is not UTF-8 text") from err
    return bytes(value) if field.kind == "bytes" else value


def _default(field: Field) -> Any:
    if field.repeated:
        return []
    return DEFAULTS[field.kind] if isinstance(field.kind, str) else None


def decode(data: bytes | memoryview, schema: Schema) -> Dict[str, Any]:
    """The message as a dict: every schema field by name, absent ones as their defaults
    (0, empty, ``None`` for a nested message, ``[]`` when repeated); a repeated scalar must
    not be packed (none of TensorFlow's messages read here packs one)."""
    message = {field.name: _default(field) for field in schema.values()}
    for number, wire_type, value in fields(memoryview(data)):
        field = schema.get(number)
        if field is None:
            continue
        if field.repeated:
            message[field.name].append(_value(field, wire_type, value))
        else:
            message[field.name] = _value(field, wire_type, value)
    return message
