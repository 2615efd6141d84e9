"""The wire encoding, driven by the schema: bincode 2, fixed-width integers,
little-endian (protocol/README.md, "Payload encoding").

Nothing here knows a message by name: each type's encoder and decoder are
built once from `messages.SCHEMA` and the generated dataclasses, so a type
appended to the Rust crate needs a regenerated `messages.py` and nothing else.
"""
from __future__ import annotations

import enum
import struct
from typing import Any, Callable, Dict, List, Tuple

from . import messages

Decoder = Callable[[memoryview, int], Tuple[Any, int]]
Encoder = Callable[[Any, bytearray], None]

# Frames: a u32 big-endian length, then the payload.
LENGTH = struct.Struct(">I")

_PRIMITIVES: Dict[str, struct.Struct] = {
    "BOOL": struct.Struct("<?"),
    "U8": struct.Struct("<B"),
    "U16": struct.Struct("<H"),
    "U32": struct.Struct("<I"),
    "U64": struct.Struct("<Q"),
    "I32": struct.Struct("<i"),
    "I64": struct.Struct("<q"),
    "F32": struct.Struct("<f"),
    "F64": struct.Struct("<d"),
}
_U32 = _PRIMITIVES["U32"]
_U64 = _PRIMITIVES["U64"]


class DecodeError(ValueError):
    """A payload that does not decode to the message it should be."""


def _short(what: str, need: int, pos: int, buf: memoryview) -> DecodeError:
    return DecodeError(f"{what}: needs {need} bytes at offset {pos}, the payload has {len(buf) - pos} left")


class Codec:
    """Encoders and decoders for every type of the schema, built on first use."""

    def __init__(self, schema: Dict[str, Any] = messages.SCHEMA) -> None:
        self._schema = schema
        self._decoders: Dict[str, Decoder] = {}
        self._encoders: Dict[str, Encoder] = {}

    # --- public -----------------------------------------------------------

    def decode(self, typename: str, payload: bytes | bytearray | memoryview) -> Any:
        """Decodes one whole payload; bytes left over are an error, as in Rust."""
        buf = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload
        try:
            value, pos = self._decoder(typename)(buf, 0)
        except struct.error as error:
            raise DecodeError(f"{typename}: {error}") from None
        if pos != len(buf):
            raise DecodeError(f"{typename}: {len(buf) - pos} bytes left over after the message")
        return value

    def encode(self, typename: str, value: Any) -> bytes:
        out = bytearray()
        self._encoder(typename)(value, out)
        return bytes(out)

    def encode_into(self, typename: str, value: Any, out: bytearray) -> None:
        self._encoder(typename)(value, out)

    # --- building -----------------------------------------------------------

    def _decoder(self, typename: str) -> Decoder:
        found = self._decoders.get(typename)
        if found is None:
            # A placeholder first, so that recursive types resolve lazily.
            self._decoders[typename] = lambda buf, pos: self._decoders[typename](buf, pos)
            found = self._build_decoder(typename)
            self._decoders[typename] = found
        return found

    def _encoder(self, typename: str) -> Encoder:
        found = self._encoders.get(typename)
        if found is None:
            self._encoders[typename] = lambda value, out: self._encoders[typename](value, out)
            found = self._build_encoder(typename)
            self._encoders[typename] = found
        return found

    def _build_decoder(self, typename: str) -> Decoder:
        body = self._schema[typename]
        if "STRUCT" in body:
            cls = getattr(messages, typename)
            return _struct_decoder(cls, [self._format_decoder(f) for f in _field_formats(body["STRUCT"])])
        variants = _variants(body)
        decoders: List[Tuple[Any, Decoder | None, bool]] = []
        unit_enum = issubclass(getattr(messages, typename), enum.IntEnum)
        for name, vfmt in variants:
            if unit_enum:
                decoders.append((getattr(messages, typename)[name], None, False))
                continue
            cls = getattr(messages, typename + name)
            if vfmt == "UNIT":
                decoders.append((cls, None, False))
            elif "NEWTYPE" in vfmt:
                decoders.append((cls, self._format_decoder(vfmt["NEWTYPE"]), False))
            else:
                decoders.append((cls, _struct_decoder(cls, [self._format_decoder(f) for f in _field_formats(vfmt["STRUCT"])]), True))
        count = len(decoders)

        def decode_enum(buf: memoryview, pos: int) -> Tuple[Any, int]:
            if pos + 4 > len(buf):
                raise _short(typename, 4, pos, buf)
            (index,) = _U32.unpack_from(buf, pos)
            if index >= count:
                raise DecodeError(f"{typename}: unknown variant {index} (this client knows {count})")
            cls, inner, is_struct = decoders[index]
            if inner is None:
                return (cls if unit_enum else cls()), pos + 4
            if is_struct:
                decoded: Tuple[Any, int] = inner(buf, pos + 4)
                return decoded
            value, pos = inner(buf, pos + 4)
            return cls(value), pos

        return decode_enum

    def _format_decoder(self, fmt: Any) -> Decoder:
        if isinstance(fmt, str):
            if fmt in _PRIMITIVES:
                return _primitive_decoder(fmt, _PRIMITIVES[fmt])
            if fmt == "STR":
                return _decode_str
            if fmt == "BYTES":
                return _decode_bytes
            raise ValueError(f"unsupported format {fmt}")
        (kind, inner), = fmt.items()
        if kind == "TYPENAME":
            return lambda buf, pos: self._decoder(inner)(buf, pos)
        if kind == "OPTION":
            item = self._format_decoder(inner)

            def decode_option(buf: memoryview, pos: int) -> Tuple[Any, int]:
                if pos >= len(buf):
                    raise _short("Option", 1, pos, buf)
                tag = buf[pos]
                if tag == 0:
                    return None, pos + 1
                if tag != 1:
                    raise DecodeError(f"Option: tag {tag} at offset {pos}, not 0 or 1")
                return item(buf, pos + 1)

            return decode_option
        if kind == "SEQ":
            item = self._format_decoder(inner)

            def decode_seq(buf: memoryview, pos: int) -> Tuple[Any, int]:
                if pos + 8 > len(buf):
                    raise _short("Vec length", 8, pos, buf)
                (count,) = _U64.unpack_from(buf, pos)
                pos += 8
                # Every element takes at least one byte: a count beyond what
                # is left is a lie, refused before a loop of that length.
                if count > len(buf) - pos:
                    raise DecodeError(f"Vec: {count} elements claimed, {len(buf) - pos} bytes left")
                items = []
                for _ in range(count):
                    value, pos = item(buf, pos)
                    items.append(value)
                return items, pos

            return decode_seq
        if kind == "TUPLEARRAY":
            item = self._format_decoder(inner["CONTENT"])
            size = inner["SIZE"]

            def decode_tuple(buf: memoryview, pos: int) -> Tuple[Any, int]:
                items = []
                for _ in range(size):
                    value, pos = item(buf, pos)
                    items.append(value)
                return tuple(items), pos

            return decode_tuple
        raise ValueError(f"unsupported format {fmt}")

    def _build_encoder(self, typename: str) -> Encoder:
        body = self._schema[typename]
        if "STRUCT" in body:
            return _struct_encoder(typename, [(n, self._format_encoder(f)) for n, f in _named_formats(body["STRUCT"])])
        cls = getattr(messages, typename)
        if issubclass(cls, enum.IntEnum):

            def encode_unit_enum(value: Any, out: bytearray) -> None:
                out += _U32.pack(cls(value))

            return encode_unit_enum
        by_class: Dict[type, Tuple[int, Encoder | None]] = {}
        for index, (name, vfmt) in enumerate(_variants(body)):
            vcls = getattr(messages, typename + name)
            if vfmt == "UNIT":
                by_class[vcls] = (index, None)
            elif "NEWTYPE" in vfmt:
                inner = self._format_encoder(vfmt["NEWTYPE"])
                by_class[vcls] = (index, _newtype_encoder(inner))
            else:
                by_class[vcls] = (index, _struct_encoder(typename + name, [(n, self._format_encoder(f)) for n, f in _named_formats(vfmt["STRUCT"])]))

        def encode_enum(value: Any, out: bytearray) -> None:
            found = by_class.get(type(value))
            if found is None:
                raise TypeError(f"{typename}: {value!r} is not one of its variants")
            index, inner = found
            out += _U32.pack(index)
            if inner is not None:
                inner(value, out)

        return encode_enum

    def _format_encoder(self, fmt: Any) -> Encoder:
        if isinstance(fmt, str):
            if fmt in _PRIMITIVES:
                packer = _PRIMITIVES[fmt]

                def encode_primitive(value: Any, out: bytearray) -> None:
                    out += packer.pack(value)

                return encode_primitive
            if fmt == "STR":
                return _encode_str
            if fmt == "BYTES":
                return _encode_bytes
            raise ValueError(f"unsupported format {fmt}")
        (kind, inner), = fmt.items()
        if kind == "TYPENAME":
            return lambda value, out: self._encoder(inner)(value, out)
        if kind == "OPTION":
            item = self._format_encoder(inner)

            def encode_option(value: Any, out: bytearray) -> None:
                if value is None:
                    out.append(0)
                else:
                    out.append(1)
                    item(value, out)

            return encode_option
        if kind == "SEQ":
            item = self._format_encoder(inner)

            def encode_seq(value: Any, out: bytearray) -> None:
                out += _U64.pack(len(value))
                for element in value:
                    item(element, out)

            return encode_seq
        if kind == "TUPLEARRAY":
            item = self._format_encoder(inner["CONTENT"])
            size = inner["SIZE"]

            def encode_tuple(value: Any, out: bytearray) -> None:
                if len(value) != size:
                    raise ValueError(f"expected {size} values, got {len(value)}")
                for element in value:
                    item(element, out)

            return encode_tuple
        raise ValueError(f"unsupported format {fmt}")


def _field_formats(named: List[Dict[str, Any]]) -> List[Any]:
    return [next(iter(f.values())) for f in named]


def _named_formats(named: List[Dict[str, Any]]) -> List[Tuple[str, Any]]:
    return [next(iter(f.items())) for f in named]


def _variants(body: Dict[str, Any]) -> List[Tuple[str, Any]]:
    return [next(iter(v.items())) for _, v in sorted(body["ENUM"].items(), key=lambda kv: int(kv[0]))]


def _struct_decoder(cls: type, fields: List[Decoder]) -> Decoder:
    def decode_struct(buf: memoryview, pos: int) -> Tuple[Any, int]:
        values = []
        for decode in fields:
            value, pos = decode(buf, pos)
            values.append(value)
        return cls(*values), pos

    return decode_struct


def _struct_encoder(typename: str, fields: List[Tuple[str, Encoder]]) -> Encoder:
    def encode_struct(value: Any, out: bytearray) -> None:
        for name, encode in fields:
            try:
                encode(getattr(value, name), out)
            except (struct.error, TypeError, ValueError, AttributeError) as error:
                raise ValueError(f"{typename}.{name}: {error}") from None

    return encode_struct


def _newtype_encoder(inner: Encoder) -> Encoder:
    def encode_newtype(value: Any, out: bytearray) -> None:
        inner(value.value, out)

    return encode_newtype


def _primitive_decoder(name: str, packer: struct.Struct) -> Decoder:
    size = packer.size
    unpack = packer.unpack_from

    def decode_primitive(buf: memoryview, pos: int) -> Tuple[Any, int]:
        if pos + size > len(buf):
            raise _short(name, size, pos, buf)
        if name == "BOOL" and buf[pos] > 1:
            raise DecodeError(f"bool: byte {buf[pos]} at offset {pos}, not 0 or 1")
        return unpack(buf, pos)[0], pos + size

    return decode_primitive


def _decode_length(buf: memoryview, pos: int, what: str) -> Tuple[int, int]:
    if pos + 8 > len(buf):
        raise _short(what, 8, pos, buf)
    (length,) = _U64.unpack_from(buf, pos)
    pos += 8
    if length > len(buf) - pos:
        raise DecodeError(f"{what}: {length} bytes claimed at offset {pos - 8}, {len(buf) - pos} left")
    return length, pos


def _decode_str(buf: memoryview, pos: int) -> Tuple[Any, int]:
    length, pos = _decode_length(buf, pos, "String")
    try:
        return str(buf[pos : pos + length], "utf-8"), pos + length
    except UnicodeDecodeError as error:
        raise DecodeError(f"String at offset {pos}: {error}") from None


def _decode_bytes(buf: memoryview, pos: int) -> Tuple[Any, int]:
    length, pos = _decode_length(buf, pos, "bytes")
    return bytes(buf[pos : pos + length]), pos + length


def _encode_str(value: Any, out: bytearray) -> None:
    data = value.encode("utf-8")
    out += _U64.pack(len(data))
    out += data


def _encode_bytes(value: Any, out: bytearray) -> None:
    view = memoryview(value).cast("B")
    out += _U64.pack(len(view))
    out += view


# --- serde's JSON form (the test vectors') ------------------------------------


def to_json(typename: str, value: Any, schema: Dict[str, Any] = messages.SCHEMA) -> Any:
    """`value` in the JSON form serde gives the Rust type (externally tagged
    enums, structs as objects, byte strings as arrays of numbers)."""
    body = schema[typename]
    if "STRUCT" in body:
        return {n: _format_to_json(f, getattr(value, n), schema) for n, f in _named_formats(body["STRUCT"])}
    if isinstance(value, enum.IntEnum):
        return value.name
    for name, vfmt in _variants(body):
        if type(value).__name__ == typename + name:
            if vfmt == "UNIT":
                return name
            if "NEWTYPE" in vfmt:
                return {name: _format_to_json(vfmt["NEWTYPE"], value.value, schema)}
            return {name: {n: _format_to_json(f, getattr(value, n), schema) for n, f in _named_formats(vfmt["STRUCT"])}}
    raise TypeError(f"{typename}: {value!r} is not one of its variants")


def _format_to_json(fmt: Any, value: Any, schema: Dict[str, Any]) -> Any:
    if isinstance(fmt, str):
        if fmt == "BYTES":
            return list(bytes(value))
        if fmt == "F32":
            return _shortest_f32(value)
        return value
    (kind, inner), = fmt.items()
    if kind == "TYPENAME":
        return to_json(inner, value, schema)
    if kind == "OPTION":
        return None if value is None else _format_to_json(inner, value, schema)
    if kind == "SEQ":
        return [_format_to_json(inner, v, schema) for v in value]
    if kind == "TUPLEARRAY":
        return [_format_to_json(inner["CONTENT"], v, schema) for v in value]
    raise ValueError(f"unsupported format {fmt}")


def _shortest_f32(value: float) -> float:
    """The shortest decimal that is the same f32, as Rust prints an f32."""
    exact = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == exact:
            return candidate
    return value


def from_json(typename: str, obj: Any, schema: Dict[str, Any] = messages.SCHEMA) -> Any:
    """The inverse of `to_json`."""
    body = schema[typename]
    if "STRUCT" in body:
        cls = getattr(messages, typename)
        return cls(*[_format_from_json(f, obj[n], schema) for n, f in _named_formats(body["STRUCT"])])
    cls = getattr(messages, typename)
    if issubclass(cls, enum.IntEnum):
        return cls[obj]
    if isinstance(obj, str):
        name, payload = obj, None
    else:
        ((name, payload),) = obj.items()
    for vname, vfmt in _variants(body):
        if vname != name:
            continue
        vcls = getattr(messages, typename + vname)
        if vfmt == "UNIT":
            return vcls()
        if "NEWTYPE" in vfmt:
            return vcls(_format_from_json(vfmt["NEWTYPE"], payload, schema))
        fields: Dict[str, Any] = payload or {}
        return vcls(*[_format_from_json(f, fields[n], schema) for n, f in _named_formats(vfmt["STRUCT"])])
    raise ValueError(f"{typename}: no variant {name}")


def _format_from_json(fmt: Any, obj: Any, schema: Dict[str, Any]) -> Any:
    if isinstance(fmt, str):
        if fmt == "BYTES":
            return bytes(obj)
        return obj
    (kind, inner), = fmt.items()
    if kind == "TYPENAME":
        return from_json(inner, obj, schema)
    if kind == "OPTION":
        return None if obj is None else _format_from_json(inner, obj, schema)
    if kind == "SEQ":
        return [_format_from_json(inner, v, schema) for v in obj]
    if kind == "TUPLEARRAY":
        return tuple(_format_from_json(inner["CONTENT"], v, schema) for v in obj)
    raise ValueError(f"unsupported format {fmt}")


CODEC = Codec()
