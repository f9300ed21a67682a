"""Hypothesis strategies for any protobuf message, built from its descriptor.

Fields are set or left out at random; scalars lean on their boundaries (0, -1, the type's min and
max), strings on hostile values (empty, NUL, ``..``, ``/``, newlines, very long), enums also take
numbers no enum names (proto3 enums are open), repeated and map fields are sometimes very long.
Nesting stops at ``max_depth``.
"""

from __future__ import annotations

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

T = FieldDescriptor

HOSTILE_STRINGS = [
    "", ".", "..", "/", "//", "a/b", "../x", "../../../../tmp/x", "/..", "x/../..", "\x00", "a\x00b",
    "\n", " ", "-1", "0", "*", "%s%n", "\u202e", "\U0010ffff", "é", "${HOME}", "$(id)", "`id`",
    "/run/kata-containers/../../tmp", "/run/kata-containers/shared/../../../tmp",
    "kata_agent", "-", "_", "A" * 129, "a" * 256, "a" * 4097,
]
HOSTILE_BYTES = [b"", b"\x00", b"\xff\xfe", b"\x00" * 1024]
# Size bounds: one oversized string or bytes field, long lists of small elements, and a message of
# at most MESSAGE_MAX bytes (the agent accepts 64 MiB; the fuzzer's own memory is the limit here).
BIG_MAX = 256 << 10
MESSAGE_MAX = 8 << 20

_INT_RANGES = {
    T.TYPE_INT32: (-2**31, 2**31 - 1), T.TYPE_SINT32: (-2**31, 2**31 - 1), T.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    T.TYPE_INT64: (-2**63, 2**63 - 1), T.TYPE_SINT64: (-2**63, 2**63 - 1), T.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1), T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1), T.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, hi, 0, 1, -1, 2, 255, 256, 1024, 65535, 65536, hi // 2, lo // 2)
                    if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -1000), min(hi, 1000)))


def strings(big: bool = True) -> st.SearchStrategy[str]:
    parts = [st.sampled_from(HOSTILE_STRINGS), st.text(max_size=24),
             st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,16}", fullmatch=True),
             st.lists(st.sampled_from(["..", ".", "a", "", "x y", "\x00"]), max_size=6).map("/".join)]
    if big:
        parts.append(st.integers(1 << 10, BIG_MAX).map(lambda n: "A" * n))
    return st.one_of(*parts)


def _scalar(f: FieldDescriptor, big: bool) -> st.SearchStrategy:
    t = f.type
    if t in _INT_RANGES:
        return _ints(*_INT_RANGES[t])
    if t == T.TYPE_BOOL:
        return st.booleans()
    if t == T.TYPE_FLOAT:
        return st.floats(width=32)
    if t == T.TYPE_DOUBLE:
        return st.floats()
    if t == T.TYPE_STRING:
        return strings(big)
    if t == T.TYPE_BYTES:
        parts = [st.sampled_from(HOSTILE_BYTES), st.binary(max_size=64)]
        if big:
            parts.append(st.integers(1 << 10, BIG_MAX).map(lambda n: b"\xaa" * n))
        return st.one_of(*parts)
    if t == T.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-2**31, 2**31 - 1))
    raise TypeError(f"{f.full_name}: unsupported type {t}")


def _value(f: FieldDescriptor, depth: int, max_depth: int, big: bool):
    if f.type == T.TYPE_MESSAGE:
        return messages(f.message_type, depth + 1, max_depth, False)
    return _scalar(f, big and depth == 0)


def _repeated(f: FieldDescriptor, depth: int, max_depth: int, big: bool) -> st.SearchStrategy[list]:
    parts = [st.lists(_value(f, depth, max_depth, big), max_size=4)]
    if big:  # one small element many times: long lists without drawing each one
        small = _value(f, depth, max_depth, False)
        most = 200 if f.type == T.TYPE_MESSAGE else 2000
        parts.append(st.tuples(small, st.integers(50, most)).map(lambda t: [t[0]] * t[1]))
    return st.one_of(*parts)


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == T.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


@st.composite
def _message(draw, desc: Descriptor, depth: int, max_depth: int, big: bool):
    cls = message_factory.GetMessageClass(desc)
    msg = cls()
    if depth > max_depth:
        return msg
    for f in desc.fields:
        if not draw(st.booleans()):
            continue
        if _is_map(f):
            kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            keys = _scalar(kf, False)
            vals = _value(vf, depth, max_depth, big)
            entries = draw(st.dictionaries(keys, vals, max_size=4))
            target = getattr(msg, f.name)
            for k, v in entries.items():
                if vf.type == T.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            values = draw(_repeated(f, depth, max_depth, big))
            target = getattr(msg, f.name)
            if f.type == T.TYPE_MESSAGE:
                for v in values:
                    target.add().CopyFrom(v)
            else:
                target.extend(values)
        elif f.type == T.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(draw(messages(f.message_type, depth + 1, max_depth, big)))
        else:
            setattr(msg, f.name, draw(_scalar(f, big and depth == 0)))
    return msg


def messages(desc: Descriptor, depth: int = 0, max_depth: int = 3, big: bool = True) -> st.SearchStrategy:
    """Messages of type ``desc``: random fields set, hostile and boundary values."""
    strategy = _message(desc, depth, max_depth, big)
    return strategy.filter(lambda m: m.ByteSize() <= MESSAGE_MAX) if depth == 0 else strategy


def raw_bytes(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes a server must refuse or parse: garbage, truncated and bit-flipped encodings of ``desc``."""
    encoded = messages(desc, max_depth=2, big=False).map(lambda m: m.SerializeToString())

    def cut(pair):
        data, frac = pair
        return data[: int(len(data) * frac)]

    def flip(pair):
        data, pos = pair
        if not data:
            return b"\xff"
        i = pos % len(data)
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]

    return st.one_of(
        st.binary(max_size=256),
        st.tuples(encoded, st.floats(0, 0.999)).map(cut),
        st.tuples(encoded, st.integers(0, 1 << 16)).map(flip),
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10, b"\x12\x80\x80\x80\x80\x08",
                         b"\xff" * 64, b"\x0a\x05abc"]),
    )
