"""Check the shape of a msgpack message against its schema before anything is allocated.

``msgpack.unpackb`` builds every array and map it meets, so a few megabytes of nested
empty arrays (one byte each) become millions of Python lists -- tens of bytes of memory
per byte received -- before any schema check can run. This module walks the raw bytes
first and follows the schema of the message type named in the frame: an array or map is
accepted only where the schema has a tuple or a mapping, with the declared number of
items (at most :data:`MAX_COLLECTION` for variable-length ones); everything else must be
a scalar. Only a message that passes is handed to msgpack, so what msgpack builds is
bounded by the schema and the message size, never by the sender's nesting.

Scalars are only skipped here (their exact types and sizes are checked after decoding,
by :func:`secagg.wire._check`); a scalar costs at most one object and its own bytes.
"""

from __future__ import annotations

import functools
import struct
import typing
from collections.abc import Callable
from typing import Any

from secagg.errors import WireError

MAX_COLLECTION = 1 << 20  # largest tuple / mapping a field may hold
MAX_NAME_BYTES = 256  # magic, "signed", type names and field names

Fields = tuple[tuple[str, Any, str], ...]  # (name, type hint, error label) per field
Span = tuple[int, int, int]  # a bin object: (header start, data start, data end)

# First byte -> (kind, fixed length or None). Kinds: "scalar" (length = bytes after the tag),
# "str"/"bin"/"ext" (length read from the next 1, 2 or 4 bytes), "array"/"map".
_LEN = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZE_FMT = {1: ">B", 2: ">H", 4: ">I"}
_SCALARS = frozenset({int, float, bool, str, bytes})


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int) -> int:
        start = self.pos
        self.pos += n
        if self.pos > len(self.data):
            raise WireError("malformed message: truncated")
        return start

    def _length(self, nbytes: int) -> int:
        return struct.unpack_from(_SIZE_FMT[nbytes], self.data, self._take(nbytes))[0]

    def header(self) -> tuple[str, int]:
        """Read one object's header: ("array"|"map", item count) or ("scalar", 0) after skipping it."""
        tag = self.data[self._take(1)]
        if tag <= 0x7F or tag >= 0xE0:
            return "scalar", 0
        if 0x80 <= tag <= 0x8F:
            return "map", tag & 0x0F
        if 0x90 <= tag <= 0x9F:
            return "array", tag & 0x0F
        if 0xA0 <= tag <= 0xBF:
            self._take(tag & 0x1F)
            return "scalar", 0
        if tag in (0xDC, 0xDD):
            return "array", self._length(_LEN[tag])
        if tag in (0xDE, 0xDF):
            return "map", self._length(_LEN[tag])
        if tag in _FIXED:
            self._take(_FIXED[tag])
            return "scalar", 0
        if tag in _LEN:
            n = self._length(_LEN[tag])
            self._take(n + (1 if tag in (0xC7, 0xC8, 0xC9) else 0))  # ext: one type byte
            return "scalar", 0
        raise WireError("malformed message: invalid msgpack byte")

    def string(self, where: str) -> str | None:
        """Read a short string (names); None if the object is some other scalar."""
        tag = self.data[self.pos] if self.pos < len(self.data) else -1
        if 0xA0 <= tag <= 0xBF or tag in (0xD9, 0xDA, 0xDB):
            self._take(1)
            n = tag & 0x1F if tag <= 0xBF else self._length(_LEN[tag])
            if n > MAX_NAME_BYTES:
                raise WireError(f"{where}: name longer than {MAX_NAME_BYTES} bytes")
            start = self._take(n)
            try:
                return bytes(self.data[start : start + n]).decode("utf-8")
            except UnicodeDecodeError:
                raise WireError(f"{where}: not UTF-8") from None
        self.scalar(where)
        return None

    def integer(self, where: str) -> int | None:
        tag = self.data[self.pos] if self.pos < len(self.data) else -1
        if 0 <= tag <= 0x7F:
            self._take(1)
            return tag
        self.scalar(where)
        return None

    def bin_span(self) -> Span | None:
        """If the next object is a bin, skip it and return (header start, data start, data end)."""
        tag = self.data[self.pos] if self.pos < len(self.data) else -1
        if tag not in (0xC4, 0xC5, 0xC6):
            return None
        start = self._take(1)
        n = self._length(_LEN[tag])
        data_start = self._take(n)
        return start, data_start, data_start + n

    def scalar(self, where: str) -> None:
        kind, _ = self.header()
        if kind != "scalar":
            raise WireError(f"{where}: expected a single value, got a nested {kind}")

    def skip_scalars(self, count: int, where: str) -> None:
        """Skip ``count`` consecutive scalars: the items of ``tuple[int, ...]``, the keys and values
        of ``dict[int, bytes]``. One tight loop for the common tags; anything else takes
        :meth:`scalar` (which refuses containers)."""
        data, pos, end = self.data, self.pos, len(self.data)
        for _ in range(count):
            if pos >= end:
                raise WireError("malformed message: truncated")
            tag = data[pos]
            if tag <= 0x7F or tag >= 0xE0:
                pos += 1
            elif 0xA0 <= tag <= 0xBF:
                pos += 1 + (tag & 0x1F)
            elif tag == 0xC4 and pos + 1 < end:
                pos += 2 + data[pos + 1]
            elif tag in _FIXED:
                pos += 1 + _FIXED[tag]
            else:
                self.pos = pos
                self.scalar(where)
                pos = self.pos
        if pos > end:
            raise WireError("malformed message: truncated")
        self.pos = pos

    def value(self, hint: Any, where: str) -> None:
        origin, args = _origin_and_args(hint)
        if origin is tuple:
            kind, n = self.header()
            if kind != "array":
                raise WireError(f"{where}: expected a sequence")
            if len(args) == 2 and args[1] is Ellipsis:
                if n > MAX_COLLECTION:
                    raise WireError(f"{where}: {n} items exceed the limit of {MAX_COLLECTION}")
                if args[0] in _SCALARS:
                    self.skip_scalars(n, f"{where}[]")
                    return
                for _ in range(n):
                    self.value(args[0], f"{where}[]")
                return
            if n != len(args):
                raise WireError(f"{where}: expected {len(args)} items, got {n}")
            for i, a in enumerate(args):
                self.value(a, f"{where}[{i}]")
            return
        if origin is dict:
            kind, n = self.header()
            if kind != "map":
                raise WireError(f"{where}: expected a mapping")
            if n > MAX_COLLECTION:
                raise WireError(f"{where}: {n} entries exceed the limit of {MAX_COLLECTION}")
            if args[0] in _SCALARS and args[1] in _SCALARS:
                self.skip_scalars(2 * n, f"{where}[]")
                return
            for _ in range(n):
                self.value(args[0], f"{where} key")
                self.value(args[1], f"{where}[]")
            return
        self.scalar(where)


@functools.lru_cache(maxsize=256)
def _origin_and_args(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """``typing.get_origin`` and ``get_args`` of a schema hint, looked up once per hint, not per item."""
    return typing.get_origin(hint), typing.get_args(hint)


def check_shape(
    data: bytes | memoryview, schema_of: Callable[[str], Fields | None], *, magic: str, version: int
) -> dict[str, Span]:
    """Raise :class:`WireError` unless ``data`` is one message frame whose containers match its schema.

    Accepts ``[magic, version, type, {field: value}]`` (the body checked against
    ``schema_of(type)``) and the signed envelope ``[magic, version, "signed", sender,
    payload, signature]`` (all scalars; the payload is checked when it is decoded).
    Returns where each top-level bin value lies (by field name; "payload" and "signature"
    in an envelope), so a decoder can take a large one as a view instead of a copy.
    """
    spans: dict[str, Span] = {}
    r = _Reader(data)
    kind, n = r.header()
    if kind != "array" or n not in (4, 6):
        raise WireError("malformed message frame: expected [magic, version, type, body]")
    if r.string("magic") != magic:
        raise WireError("not a secagg message (bad magic)")
    got = r.integer("version")
    if got != version:
        raise WireError(f"unsupported wire version {got!r}; this build speaks version {version}")
    type_name = r.string("type")
    if n == 6:
        for where in ("sender", "payload", "signature"):
            span = r.bin_span()
            if span is None:
                r.scalar(where)
            else:
                spans[where] = span
    else:
        fields = schema_of(type_name) if type_name is not None else None
        if fields is None:
            raise WireError(f"unknown message type {type_name!r}; is the peer running a newer version?")
        kind, count = r.header()
        if kind != "map":
            raise WireError(f"{type_name}: body must be a mapping")
        hints = {name: (hint, where) for name, hint, where in fields}
        seen: set[str] = set()
        for _ in range(count):
            name = r.string(f"{type_name} field name")
            if name not in hints or name in seen:
                raise WireError(f"{type_name}: schema mismatch (unexpected or repeated field {name!r})")
            seen.add(name)
            hint, where = hints[name]
            span = None if _origin_and_args(hint)[0] in (tuple, dict) else r.bin_span()
            if span is None:
                r.value(hint, where)
            else:
                spans[name] = span
    if r.pos != len(data):
        raise WireError("malformed message: extra bytes after the message")
    return spans
