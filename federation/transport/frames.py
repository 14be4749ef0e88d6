"""Transport frames: what travels on one gRPC stream between a client and the server.

Every gRPC message on the stream is one :mod:`secagg.wire` message of a ``transport.*``
type (schema-checked, versioned, no pickle). Protocol payloads -- the sealed messages the
protocol sessions produce and consume -- are opaque bytes to the transport and travel as
a sequence of :class:`Chunk` frames, so a 100 MB masked update never has to fit in one
gRPC message and the per-message limit (``grpc.max_receive_message_length``) stays small.

Rules the receiver enforces (a violation is a :class:`~secagg.errors.WireError` and the
peer is dropped): chunk sequence numbers strictly increase, chunks of one payload arrive
in order, a payload never exceeds ``max_message_bytes``, every chunk but the last holds
at least ``MIN_CHUNK_BYTES`` and none more than ``MAX_CHUNK_BYTES``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from secagg import wire
from secagg.errors import ConfigError, WireError

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB of payload per gRPC message
MIN_CHUNK_BYTES = 16 << 10  # senders may choose any chunk size in [MIN, MAX]
MAX_CHUNK_BYTES = 4 << 20
FRAME_OVERHEAD = 1 << 12  # msgpack framing around a chunk
# Memory one connection's frames in flight may take, whatever the payload size: the frame
# gRPC is receiving, its decoded Chunk, the one being written and gRPC's own buffers.
CONNECTION_BYTES = 4 * (MAX_CHUNK_BYTES + FRAME_OVERHEAD)
SERVICE = "secagg.v1.Aggregation"
METHOD = f"/{SERVICE}/Session"


@wire.message
class Hello(wire.Message):
    """First frame from a client, sealed with its identity key: proves the key on this connection."""

    TYPE = "transport.hello"
    client_id: int
    software: str


@wire.message
class RoundStart(wire.Message):
    """Server -> client: a round begins; ``mode`` names the core :class:`~secagg.rounds.Mode`
    that runs it (the server's protection; the field keeps its name on the wire).

    The next payload (chunked) is the mode's parameters (e.g. the CA-signed certificates
    of the other participants); with ``broadcast`` the one after it is the round's
    broadcast (e.g. the global model a training client starts from); every payload after
    those goes to the protocol session.
    """

    TYPE = "transport.round_start"
    round: int
    mode: str
    broadcast: bool  # the params are followed by one broadcast payload (e.g. the global model)


@wire.message
class Chunk(wire.Message):
    """One piece of an opaque protocol payload (either direction)."""

    TYPE = "transport.chunk"
    seq: int
    index: int
    count: int
    data: bytes


@wire.message
class RoundEnd(wire.Message):
    """Server -> client: the round finished (or failed).

    With ``has_total`` the next payload (chunked) is the released aggregate as a
    little-endian float64 vector.
    """

    TYPE = "transport.round_end"
    round: int
    ok: bool
    reason: str
    has_total: bool
    included: tuple[int, ...]


@wire.message
class Dropped(wire.Message):
    """Server -> client: you were dropped from the current round (and why)."""

    TYPE = "transport.dropped"
    round: int
    reason: str


@wire.message
class Bye(wire.Message):
    """Server -> client: close the stream. ``final``: no more rounds (else: come back later)."""

    TYPE = "transport.bye"
    reason: str
    final: bool


def chunk_payload(payload: bytes | memoryview, seq: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Split ``payload`` into encoded :class:`Chunk` frames, each encoded when it is taken.

    A generator, so a sender holds the payload and one frame, not a second copy of the
    payload as frames (a 440 MB update queued to five clients would be 2.2 GB of frames).
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"chunk_bytes must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}, got {chunk_bytes}")
    count = max(1, -(-len(payload) // chunk_bytes))
    view = memoryview(payload).cast("B")
    return (
        wire.encode(Chunk(seq=seq, index=i, count=count, data=bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])))
        for i in range(count)
    )


@dataclass
class Reassembler:
    """Rebuild payloads from :class:`Chunk` frames, enforcing order and size limits.

    ``max_chunk_bytes`` is what this side accepts per chunk (senders may use smaller
    chunks); every chunk but the last of a payload must carry at least
    :data:`MIN_CHUNK_BYTES`, so a payload cannot be split into a flood of tiny frames.

    ``admit`` (optional, per call) is consulted once, at the first chunk of a payload,
    before any byte of it is kept: it returns the byte limit for this payload, or None to
    read the payload's chunks without keeping them (an unsolicited message). So a receiver
    never buffers more than it agreed to hold at the moment the payload began.

    Chunks are appended to one growing buffer (no list of parts joined at the end, which
    held a payload twice). With ``views`` a complete payload is returned as a read-only
    view of that buffer rather than copied into ``bytes``: a receiver that parses it in
    place (the server: :mod:`secagg.wire` borrows a masked vector) holds it once.
    """

    max_message_bytes: int
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    views: bool = False
    _seq: int = -1
    _parts: bytearray = field(default_factory=bytearray)
    _count: int = 0
    _index: int = -1  # index of the last chunk read of the current payload (-1: none in progress)
    _size: int = 0
    _limit: int = 0
    _keep: bool = True
    _scope: str = ""  # how the limit was set, for the error message

    @property
    def in_progress(self) -> bool:
        """Whether a payload has begun and its last chunk has not arrived."""
        return self._index >= 0

    @property
    def buffered(self) -> int:
        """Bytes currently held for an incomplete payload."""
        return self._size if self._keep else 0

    def feed(self, chunk: Chunk, admit: Callable[[Chunk], int | None] | None = None) -> bytes | memoryview | None:
        """Add one chunk; return the complete payload when its last chunk arrived."""
        if self._index < 0:
            if chunk.seq <= self._seq:
                raise WireError(f"chunk sequence {chunk.seq} is not newer than {self._seq} (replayed payload?)")
            max_chunks = self.max_message_bytes // MIN_CHUNK_BYTES + 1
            if chunk.index != 0 or not (1 <= chunk.count <= max_chunks):
                raise WireError(f"payload must start at chunk 0 and have 1..{max_chunks} chunks")
            limit = self.max_message_bytes if admit is None else admit(chunk)
            self._scope = " (max_message_bytes)" if admit is None else " of this stage"
            self._seq, self._count, self._size = chunk.seq, chunk.count, 0
            self._keep, self._limit = limit is not None, min(limit or 0, self.max_message_bytes)
            if self._keep and (chunk.count - 1) * MIN_CHUNK_BYTES > self._limit:
                raise WireError(
                    f"a payload of {chunk.count} chunks is larger than the {self._limit}-byte limit{self._scope}"
                )
        elif chunk.seq != self._seq or chunk.index != self._index + 1 or chunk.count != self._count:
            raise WireError("chunks arrived out of order or interleaved")
        self._index = chunk.index
        if len(chunk.data) > self.max_chunk_bytes:
            raise WireError(f"chunk of {len(chunk.data)} bytes exceeds the {self.max_chunk_bytes}-byte chunk limit")
        last = chunk.index == chunk.count - 1
        if not last and len(chunk.data) < MIN_CHUNK_BYTES:
            raise WireError(f"only the last chunk of a payload may be smaller than {MIN_CHUNK_BYTES} bytes")
        if self._keep:
            if self._size + len(chunk.data) > self._limit:
                raise WireError(f"payload exceeds the {self._limit}-byte limit{self._scope}")
            self._parts += chunk.data
        self._size += len(chunk.data)
        if not last:
            return None
        self._index = -1
        parts, self._parts, self._size = self._parts, bytearray(), 0
        if not self._keep:
            return None
        return memoryview(parts).toreadonly() if self.views else bytes(parts)

    def release(self) -> int:
        """Drop an incomplete payload (the stream ended); return the bytes it held."""
        freed = self.buffered
        self._parts, self._size, self._index = bytearray(), 0, -1
        return freed


@dataclass
class ByteBudget:
    """Bytes that the incomplete payloads of all connections may hold together.

    A reader takes its payload's limit at the first chunk (:meth:`take` waits, without
    reading further, until that much is free; gRPC's flow control then holds the sender)
    and gives it back once the payload is handled. A payload larger than the whole budget
    waits until nothing else is held and then goes alone, so no payload waits forever.
    """

    total: int
    used: int = 0
    _freed: asyncio.Event = field(default_factory=asyncio.Event)

    async def take(self, n: int) -> int:
        """Reserve ``n`` bytes (at most the total); return what was reserved, for :meth:`give`."""
        n = min(n, self.total)
        while self.used + n > self.total:
            self._freed.clear()
            await self._freed.wait()
        self.used += n
        return n

    def give(self, n: int) -> None:
        self.used -= n
        self._freed.set()


@dataclass
class TokenBucket:
    """Simple rate limiter: ``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: float
    clock: object = time.monotonic
    _tokens: float = -1.0
    _last: float = 0.0

    def take(self, n: float = 1.0) -> bool:
        now = self.clock()  # type: ignore[operator]
        if self._tokens < 0:
            self._tokens, self._last = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True
