"""Versioned, schema-checked, size-limited messages. No pickle.

Every message that crosses a trust boundary is a frozen dataclass registered here with a
stable ``TYPE`` name. On the wire it is a msgpack array::

    [MAGIC, WIRE_VERSION, TYPE, {field: value, ...}]

and, when it matters who sent it, wrapped in a signed envelope::

    [MAGIC, WIRE_VERSION, "signed", sender_id, payload_bytes, ed25519_signature]

where the signature covers a domain label, the sender id and SHA-256(payload_bytes).

Compatibility rule: the meaning of an existing field never changes. A new field, or a
new meaning, is a new message ``TYPE`` or a new ``WIRE_VERSION``; decoders reject
versions they do not know instead of guessing.

Decoding checks, before anything else sees the data: the total size, the magic and
version, that the type is known, that arrays and maps occur only where the type's schema
has them (:mod:`secagg.wire_shape`, before msgpack builds a single object), that exactly the declared fields are present, and that
each field has its declared type and stays within its declared size. Any failure is a
:class:`~secagg.errors.WireError`, never a crash.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgpack
import numpy as np

from secagg.errors import InvalidSignature, WireError
from secagg.keys import IdentityKey, verify_signature
from secagg.wire_shape import MAX_COLLECTION, check_shape

MAGIC = "secagg"
WIRE_VERSION = 2  # 2: a seal signs the SHA-256 digest of its payload (1 signed the payload itself)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # largest message a decoder accepts unless told otherwise
MAX_FIELD_BYTES = 64 * 1024 * 1024 * 4  # per bytes-field upper bound (a 2^26-parameter uint32 vector)
BORROW_MIN_BYTES = 1 << 20  # a BORROWED_FIELDS value this large is decoded as a view, not a copy
#: The sender id the server seals with, in every protocol. Clients are numbered from 1 (masking:
#: a Shamir share is the polynomial at the client id) or 0 (CKKS, whose key holder seals as -1).
SERVER_ID = -2
_SIGNATURE_BIN = 2 + 64  # an Ed25519 signature as a msgpack bin8

_REGISTRY: dict[str, type[Message]] = {}

M = TypeVar("M", bound="Message")


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses with a ``TYPE``."""

    TYPE: ClassVar[str] = ""
    # Optional per-field byte limits (bytes fields and bytes values inside mappings).
    FIELD_LIMITS: ClassVar[dict[str, int]] = {}
    # Top-level bytes fields that a decoder hands over as a read-only memoryview of the
    # received buffer when they hold at least BORROW_MIN_BYTES (a masked vector is not
    # copied out of the message it arrived in), and that :class:`SealedBuffer` can write
    # in place when it is the last field.
    BORROWED_FIELDS: ClassVar[frozenset[str]] = frozenset()


def message(cls: type[M]) -> type[M]:
    """Class decorator: make ``cls`` a frozen, slotted dataclass and register its TYPE."""
    if not cls.TYPE:
        raise TypeError(f"{cls.__name__} needs a TYPE name")
    if cls.TYPE in _REGISTRY:
        raise TypeError(f"message TYPE {cls.TYPE!r} registered twice")
    dc = dataclasses.dataclass(frozen=True, slots=True)(cls)
    _REGISTRY[cls.TYPE] = dc
    return dc


def encode(msg: Message) -> bytes:
    """Serialise a registered message (unsigned)."""
    if type(msg).TYPE not in _REGISTRY:
        raise WireError(f"{type(msg).__name__} is not a registered wire message")
    # tuples go out as msgpack arrays, exactly as lists would (msgpack's packer does not tell them apart)
    body = {name: getattr(msg, name) for name, _, _ in _schema(type(msg))[1]}
    return msgpack.packb([MAGIC, WIRE_VERSION, type(msg).TYPE, body], use_bin_type=True)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, expect: type[M] | None = None) -> M:
    """Parse and schema-check one unsigned message."""
    items, borrowed = _unpack_frame(data, max_bytes)
    if len(items) != 4:
        raise WireError("malformed message frame: expected [magic, version, type, body]")
    _, _, type_name, body = items
    cls = _REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise WireError(f"unknown message type {type_name!r}; is the peer running a newer version?")
    if expect is not None and cls is not expect:
        raise WireError(f"expected a {expect.TYPE!r} message, got {type_name!r}")
    if not isinstance(body, dict):
        raise WireError(f"{type_name}: body must be a mapping")
    body.update(borrowed)
    return _build(cls, body, frozenset(borrowed))  # type: ignore[return-value]


def seal(msg: Message, sender_id: int, identity: IdentityKey) -> bytes:
    """Serialise ``msg`` and sign it with the sender's Ed25519 identity key."""
    payload = encode(msg)
    signature = identity.sign(_signed_bytes(sender_id, payload))
    return msgpack.packb([MAGIC, WIRE_VERSION, "signed", sender_id, payload, signature], use_bin_type=True)


class SealedBuffer:
    """A sealed message built around its last field, a large bytes value written in place.

    ``wire.seal`` copies a large field three times (into the message's bytes, the encoded
    payload and the envelope). Here the whole envelope is allocated once, ``tail`` is the
    writable slot of the last field (16-byte aligned, so it can be viewed as uint32
    words), and :meth:`seal` signs it and returns the finished message: the same bytes
    ``seal(msg, ...)`` produces with the field's content in ``msg``. The field must be
    one of the type's ``BORROWED_FIELDS`` and ``msg`` must hold ``b""`` in it.
    """

    def __init__(self, msg: Message, sender_id: int, nbytes: int) -> None:
        cls = type(msg)
        last = _schema(cls)[1][-1][0]
        if last not in cls.BORROWED_FIELDS or getattr(msg, last) != b"":
            raise WireError(f"{cls.TYPE}: SealedBuffer writes a borrowed last field: list {last!r} in "
                            "BORROWED_FIELDS and pass it as b\"\" (its content goes into .tail)")
        payload_head = encode(msg)[:-2] + _bin_header(nbytes)  # drop the empty bin8 (c4 00)
        payload_len = len(payload_head) + nbytes
        envelope = msgpack.packb([MAGIC, WIRE_VERSION, "signed", sender_id, b"", b""], use_bin_type=True)
        head = envelope[:-4] + _bin_header(payload_len)  # drop the two empty bins
        total = len(head) + payload_len + _SIGNATURE_BIN
        tail_at = len(head) + len(payload_head)
        raw = np.empty(total + 15, dtype=np.uint8)  # pages are touched only as the tail is written
        pad = -(raw.ctypes.data + tail_at) % 16
        self._buffer = raw[pad:pad + total]
        self._buffer[:tail_at] = np.frombuffer(head + payload_head, dtype=np.uint8)
        self._payload = slice(len(head), len(head) + payload_len)
        self._sender = sender_id
        self.tail = self._buffer[tail_at:tail_at + nbytes]

    def seal(self, identity: IdentityKey) -> memoryview:
        """Sign the payload (hashed where it lies) and return the whole message, read-only."""
        signature = identity.sign(_signed_bytes(self._sender, memoryview(self._buffer[self._payload])))
        if len(signature) != _SIGNATURE_BIN - 2:
            raise WireError("an Ed25519 signature is 64 bytes")
        self._buffer[-_SIGNATURE_BIN:] = np.frombuffer(_bin_header(len(signature)) + signature, dtype=np.uint8)
        return memoryview(self._buffer).toreadonly()


def _bin_header(n: int) -> bytes:
    """msgpack's header of an n-byte bin (the smallest form, as ``packb`` writes it)."""
    if n < 1 << 8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 1 << 16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def open_sealed(
    data: bytes,
    public_key_of: Callable[[int], bytes | None],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expect: type[M] | None = None,
) -> tuple[int, M]:
    """Verify a sealed message and return ``(sender_id, message)``.

    ``public_key_of(sender_id)`` returns the raw Ed25519 public key registered for that
    sender, or None for an unknown sender. Unsigned, unknown-sender and badly signed
    messages are all refused.
    """
    try:
        sender_id, payload, signature = _envelope(data, max_bytes)
    except _NotSigned:
        raise InvalidSignature("message is not signed; every protocol message must be sealed") from None
    public_key = public_key_of(sender_id)
    if public_key is None:
        raise InvalidSignature(f"message signed by unknown party {sender_id}; register its identity key first")
    verify_envelope(sender_id, payload, signature, public_key)
    return sender_id, decode(payload, max_bytes=max_bytes, expect=expect)


def _signed_bytes(sender_id: int, payload: bytes | memoryview) -> bytes:
    """What a seal's signature covers: a domain label, the sender and the payload's SHA-256.

    Hash-then-sign (as Ed25519ph does): Ed25519 over a whole payload hashes it twice with
    SHA-512 and needs a copy of it with the label in front; a 40 MB masked vector is read
    once by SHA-256 instead. Forging a seal now also takes a SHA-256 collision, which at
    2^128 work matches Ed25519's own security level.
    """
    return b"secagg/v2/envelope|" + sender_id.to_bytes(8, "big", signed=True) + hashlib.sha256(payload).digest()


class _NotSigned(WireError):
    """A well-formed frame that is not a signed envelope."""


def _envelope(data: bytes | memoryview, max_bytes: int) -> tuple[int, bytes | memoryview, bytes]:
    """(sender, payload, signature) of a signed envelope; a large payload is a view of ``data``."""
    items, borrowed = _unpack_frame(data, max_bytes)
    if len(items) != 6 or items[2] != "signed":
        raise _NotSigned("payload is not a sealed secagg message")
    _, _, _, sender, payload, signature = items
    payload = borrowed.get("payload", payload)
    if type(sender) is not int or not isinstance(payload, (bytes, memoryview)) or not isinstance(signature, bytes):
        raise WireError("malformed signed envelope")
    return sender, payload, signature


def _unpack_frame(data: bytes | memoryview, max_bytes: int) -> tuple[list, dict[str, memoryview]]:
    """The frame's msgpack items, and the large bin values it may borrow, as views of ``data``.

    An envelope's payload and a message's ``BORROWED_FIELDS`` of at least
    :data:`BORROW_MIN_BYTES` are cut out before msgpack runs (it would copy them) and
    returned as read-only views; their place in the items holds ``b""``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(
            f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit; "
            "send large vectors in chunks or raise the limit on both sides"
        )
    if len(data) < BORROW_MIN_BYTES:  # nothing to borrow
        small = bytes(data)
        _shape_checked(small)
        return _unpack_small(small), {}
    view = memoryview(data).cast("B").toreadonly()
    types: list[str] = []

    def fields_of(type_name: str):
        types.append(type_name)
        return _fields_of(type_name)

    spans = check_shape(view, fields_of, magic=MAGIC, version=WIRE_VERSION)  # before msgpack allocates anything
    borrowable = _REGISTRY[types[0]].BORROWED_FIELDS if types else frozenset({"payload"})
    cut = sorted((span, name) for name, span in spans.items()
                 if name in borrowable and span[2] - span[1] >= BORROW_MIN_BYTES)
    if cut:
        pieces, pos = [], 0
        for (header, _, end), _name in cut:
            pieces += [view[pos:header], b"\xc4\x00"]  # an empty bin in its place
            pos = end
        pieces.append(view[pos:])
        small = b"".join(pieces)
    else:
        small = data if isinstance(data, bytes) else bytes(view)
    return _unpack_small(small), {name: view[start:end] for (_, start, end), name in cut}


def _unpack_small(data: bytes) -> list:
    """msgpack's items of a frame whose shape was checked (large values already cut out)."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True,
            max_array_len=MAX_COLLECTION, max_map_len=MAX_COLLECTION,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"malformed message: {type(exc).__name__}") from None


def _shape_checked(data: bytes) -> None:
    """:func:`check_shape` of a frame below :data:`BORROW_MIN_BYTES`, remembered by its SHA-256.

    The same signed advert, key directory or server message reaches every client of an
    in-process round, and the check is a pure function of the bytes (the registry only
    grows): walking a 1,000-advert key directory takes 2 ms, hashing it 0.2 ms. Only a
    frame that passed is remembered (a failure raises and is checked again next time); a
    false hit would need a SHA-256 collision, the assumption every seal already makes
    (``_signed_bytes``).
    """
    key = hashlib.sha256(data).digest()
    if key in _SHAPES_CHECKED:
        return
    check_shape(data, _fields_of, magic=MAGIC, version=WIRE_VERSION)
    _SHAPES_CHECKED[key] = None
    if len(_SHAPES_CHECKED) > SHAPES_KEPT:
        _SHAPES_CHECKED.pop(next(iter(_SHAPES_CHECKED)))  # the oldest first (dicts keep insertion order)


#: frames whose shape check is remembered (32-byte digests: 256 kB at most)
SHAPES_KEPT = 8192
_SHAPES_CHECKED: dict[bytes, None] = {}


def _fields_of(type_name: str):
    cls = _REGISTRY.get(type_name)
    return None if cls is None else _schema(cls)[1]


def unverified_envelope(
    data: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[int, bytes | memoryview, bytes]:
    """(sender id, signed payload, signature) of a sealed message, NOT yet verified.

    For a receiver that checks the seal against a key of its own choosing (the transport
    checks it against the key in the sender's certificate) before handing the message on.
    """
    return _envelope(data, max_bytes)


def verify_envelope(sender_id: int, payload: bytes | memoryview, signature: bytes, public_key: bytes) -> None:
    """Check the parts :func:`unverified_envelope` returned against ``public_key``.

    Raises :class:`~secagg.errors.InvalidSignature` when the seal is not that key's
    signature over this sender and payload.
    """
    verify_signature(public_key, signature, _signed_bytes(sender_id, payload))


@functools.cache
def _schema(cls: type[Message]) -> tuple[frozenset[str], tuple[tuple[str, Any, str], ...]]:
    """``cls``'s field names and, per field, (name, resolved type hint, error label).

    Resolving the string annotations (``typing.get_type_hints``) costs far more than
    checking a small message, and a class's schema never changes once registered, so it
    is resolved once per class rather than once per decoded message.
    """
    hints = typing.get_type_hints(cls)
    fields = tuple(
        (f.name, hints[f.name], f"{cls.TYPE}.{f.name}")
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    )
    return frozenset(name for name, *_ in fields), fields


def _build(cls: type[Message], body: dict, borrowed: frozenset[str] = frozenset()) -> Message:
    names, fields = _schema(cls)
    if body.keys() != names:
        missing = sorted(names - set(body))
        extra = sorted(map(str, set(body) - names))
        raise WireError(f"{cls.TYPE}: schema mismatch (missing {missing}, unexpected {extra})")
    limits = cls.FIELD_LIMITS
    values = {
        name: _check_borrowed(body[name], where, limits.get(name, MAX_FIELD_BYTES)) if name in borrowed
        else _check(body[name], hint, where, limits.get(name, MAX_FIELD_BYTES))
        for name, hint, where in fields
    }
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # __post_init__ invariants
        raise WireError(f"{cls.TYPE}: {exc}") from None


def _check_borrowed(value: memoryview, where: str, limit: int) -> memoryview:
    """A borrowed bytes field (a view of the received buffer): only its size is left to check."""
    if len(value) > limit:
        raise WireError(f"{where}: {len(value)} bytes exceeds the {limit}-byte field limit")
    return value


def _check(value: Any, hint: Any, where: str, limit: int) -> Any:
    if hint is int:
        if type(value) is not int:
            raise WireError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if hint is float:
        if type(value) not in (float, int):
            raise WireError(f"{where}: expected float, got {type(value).__name__}")
        return float(value)
    if hint is bool:
        if type(value) is not bool:
            raise WireError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if hint is str:
        if not isinstance(value, str) or len(value) > 4096:
            raise WireError(f"{where}: expected a string of at most 4096 characters")
        return value
    if hint is bytes:
        if not isinstance(value, bytes):
            raise WireError(f"{where}: expected bytes, got {type(value).__name__}")
        if len(value) > limit:
            raise WireError(f"{where}: {len(value)} bytes exceeds the {limit}-byte field limit")
        return value
    fast = _CONTAINER_CHECKS.get(hint)
    if fast is not None:
        return fast(value, where, limit)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a sequence")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{where}[]", limit) for v in value)
        if len(value) != len(args):
            raise WireError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_check(v, a, f"{where}[{i}]", limit) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a mapping")
        key_hint, value_hint = args
        return {
            _check(k, key_hint, f"{where} key", limit): _check(v, value_hint, f"{where}[{k!r}]", limit)
            for k, v in value.items()
        }
    raise TypeError(f"{where}: unsupported field type {hint!r} in a wire schema")


# The containers every protocol message uses, checked in one loop each instead of one
# recursive call per item; the checks and error messages are exactly those above.
def _check_int_tuple(value: Any, where: str, limit: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise WireError(f"{where}: expected a sequence")
    for v in value:
        if type(v) is not int:
            raise WireError(f"{where}[]: expected int, got {type(v).__name__}")
    return tuple(value)


def _check_bytes_by_int(value: Any, where: str, limit: int) -> dict[int, bytes]:
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected a mapping")
    # One C-level pass per property (a share delivery holds hundreds of entries); only a mapping
    # that fails one is walked entry by entry, to name the first bad entry.
    if set(map(type, value)) <= {int} and set(map(type, value.values())) <= {bytes} and \
            max(map(len, value.values()), default=0) <= limit:
        return value
    for k, v in value.items():
        if type(k) is not int:
            raise WireError(f"{where} key: expected int, got {type(k).__name__}")
        if not isinstance(v, bytes):
            raise WireError(f"{where}[{k!r}]: expected bytes, got {type(v).__name__}")
        if len(v) > limit:
            raise WireError(f"{where}[{k!r}]: {len(v)} bytes exceeds the {limit}-byte field limit")
    return value


_CONTAINER_CHECKS: dict[Any, Callable[[Any, str, int], Any]] = {
    tuple[int, ...]: _check_int_tuple,
    dict[int, bytes]: _check_bytes_by_int,
}
