"""The three key roles of the ``ckks`` protection mode, enforced in code.

* :class:`KeyHolder` (decryptor) generates the TenSEAL context and the secret key, hands
  out a *public* context to clients and a *parameters-only* context to the server, and
  decrypts exactly one aggregate per round (a second request raises
  :class:`~secagg.errors.AlreadyFinalized`, so a server cannot difference two sums), and
  only after recomputing it from the clients' signed uploads: it is never a decryption
  oracle for a ciphertext the server built.
* :class:`HeClient` holds the public key only: it can encrypt, never decrypt. It refuses
  a context that carries a secret key (:class:`~secagg.errors.KeyRoleError`).
* :class:`HeServer` holds no key at all (no secret, public, relinearization or Galois
  key): it authenticates uploads, checks their structure, and adds ciphertexts.
  :meth:`HeServer.decrypt` always raises KeyRoleError.

All three are sans-IO: bytes in, bytes out; no sockets, threads or clocks. Contexts are
sealed with the key holder's Ed25519 identity (:func:`secagg.wire.seal`); uploads and
aggregates are hash-then-sign (a sealed header carrying the key fingerprint and a BLAKE2b
digest of the ciphertext chunks, see :mod:`secagg.ckks.messages`). Any failure to
authenticate or parse a ciphertext raises :class:`~secagg.errors.InvalidCiphertext`, and
the checks in :mod:`secagg.ckks.tenseal_format` run before TenSEAL sees the bytes.

Rules for code in this module: never call TenSEAL on bytes that did not pass
:func:`_load_vector`; never mutate a context loaded by :func:`_load_context` (it is shared);
never ``copy()`` a vector linked to a key-less context (TenSEAL 0.3.18 segfaults); build
sums into new vectors so a failure leaves the running sum untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

try:
    import tenseal as ts
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the ckks protection mode needs TenSEAL: pip install 'secagg[he]'") from exc

from secagg.ckks.messages import (
    HeAggregateHeader,
    HeCiphertexts,
    HeContext,
    HeUploadHeader,
    chunks_digest,
)
from secagg.ckks.params import BFV_CHECK_SLOTS, HeParams, bfv_quantization_scale, check_capacity
from secagg.ckks.tenseal_format import check_serialized_vector, max_vector_bytes
from secagg.errors import (
    AlreadyFinalized,
    ConfigError,
    InputError,
    InvalidCiphertext,
    InvalidSignature,
    KeyRoleError,
    MaliciousServerDetected,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
    WireError,
)
from secagg.keys import IdentityKey
from secagg.wire import SERVER_ID, decode, encode, open_sealed, seal

KEYHOLDER_ID = -1
FINGERPRINT_LABEL = b"secagg/v1/ckks-context|"
DEFAULT_RELEASE_GRID_BITS = 22
MAX_KEY_HOLDERS = 8
UPLOAD_LABEL = b"upload"
AGGREGATE_LABEL = b"aggregate"


def fingerprint(public_context: bytes) -> bytes:
    """SHA-256 over the serialized public context (parameters and public key)."""
    return hashlib.sha256(FINGERPRINT_LABEL + public_context).digest()


@dataclass(frozen=True)
class HeRoundConfig:
    """What every party of one round agrees on before any key exists (all public).

    ``n_clients`` is the planned cohort (it bounds the sum); ``value_bound`` bounds every
    coordinate of every client's update (clip to it); with ``weighted`` each client scales
    its update by its weight fraction f_i in (0, 1] and the fraction travels, encrypted,
    in the slot after the update. ``min_clients``: the key holder refuses to decrypt a sum
    over fewer clients. ``release_grid_bits`` (CKKS): the key holder rounds the released
    sum to multiples of 2^-bits, hiding the decryption noise (see docs/threat-model.md,
    IND-CPA-D); 0 releases the raw decryption. ``key_holders`` > 1 (BFV only) splits each
    quantized update into that many additive shares modulo t, each encrypted under another
    key holder's key, so no single key holder can decrypt anything but uniform noise (see
    :class:`SplitClient`, :meth:`KeyHolder.decrypt_share`, :func:`combine_shares`).
    """

    round_id: bytes
    dim: int
    n_clients: int
    params: HeParams = field(default_factory=HeParams)
    value_bound: float = 1.0
    weighted: bool = False
    min_clients: int = 2
    release_grid_bits: int = DEFAULT_RELEASE_GRID_BITS
    key_holders: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, bytes) or not 16 <= len(self.round_id) <= 64:
            raise ConfigError("round_id must be 16..64 random bytes (os.urandom(16))")
        if self.dim < 1:
            raise ConfigError(f"dim must be positive, got {self.dim}")
        if self.n_clients < 1:
            raise ConfigError(f"n_clients must be positive, got {self.n_clients}")
        if not 1 <= self.min_clients:
            raise ConfigError("min_clients must be at least 1")
        if not (math.isfinite(self.value_bound) and self.value_bound > 0):
            raise ConfigError(f"value_bound must be a positive finite number, got {self.value_bound}")
        if not 0 <= self.release_grid_bits <= 52:
            raise ConfigError("release_grid_bits must be in 0..52 (0 disables rounding)")
        if not 1 <= self.key_holders <= MAX_KEY_HOLDERS:
            raise ConfigError(f"key_holders must be in 1..{MAX_KEY_HOLDERS}, got {self.key_holders}")
        if self.key_holders > 1 and self.params.scheme != "bfv":
            raise ConfigError(
                "splitting updates between key holders needs exact arithmetic modulo t: use scheme='bfv' "
                "(CKKS sums of uniform shares would lose the update in the approximation noise)"
            )
        check_capacity(self.params, sum_bound=self.sum_bound, n_clients=self.n_clients)

    @property
    def sum_bound(self) -> float:
        """Bound on |any coordinate of the sum| (weights are fractions summing to <= 1)."""
        return max(self.value_bound, 1.0) if self.weighted else self.n_clients * self.value_bound

    @property
    def length(self) -> int:
        """Encrypted values per client: the update, plus the weight slot when weighted."""
        return self.dim + int(self.weighted)

    @property
    def check_slots(self) -> int:
        """BFV: slots per ciphertext that encrypt 0 and must decrypt to exactly 0 (CKKS: none)."""
        return BFV_CHECK_SLOTS if self.params.scheme == "bfv" else 0

    @property
    def payload_sizes(self) -> tuple[int, ...]:
        """Values of the update (and weight slot) carried by each ciphertext."""
        s = self.params.slots - self.check_slots
        full, rest = divmod(self.length, s)
        return (s,) * full + ((rest,) if rest else ())

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Values encrypted in each ciphertext: its payload, then the check slots."""
        return tuple(p + self.check_slots for p in self.payload_sizes)

    def pack(self, values: np.ndarray) -> np.ndarray:
        """Insert the (zero) check slots after each chunk's payload: ``length`` -> sum(chunk_sizes)."""
        if not self.check_slots:
            return values
        bounds = np.cumsum(self.payload_sizes)[:-1]
        zeros = np.zeros(self.check_slots, dtype=values.dtype)
        return np.concatenate([np.concatenate([part, zeros]) for part in np.split(values, bounds)])

    def unpack(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split decrypted values into the payload (``length``) and the check slots."""
        if not self.check_slots:
            return values, values[:0]
        parts = np.split(values, np.cumsum(self.chunk_sizes)[:-1])
        k = self.check_slots
        return np.concatenate([p[:-k] for p in parts]), np.concatenate([p[-k:] for p in parts])

    def release_bound(self, n_summed: int) -> float:
        """Largest |coordinate| a sum of ``n_summed`` in-range contributions can have."""
        return max(self.value_bound, 1.0) if self.weighted else n_summed * self.value_bound

    @property
    def quantization(self) -> float:
        """BFV: integer steps per unit (the same for every party); 0 for CKKS."""
        if self.params.scheme != "bfv":
            return 0.0
        return bfv_quantization_scale(self.params, self.sum_bound, self.n_clients)

    @property
    def max_message_bytes(self) -> int:
        return len(self.chunk_sizes) * (max_vector_bytes(self.params.ciphertext_bytes) + 16) + 64 * 1024

    def error_bound(self, n_summed: int) -> float:
        """Bound on |released sum - exact sum| per coordinate (before un-weighting)."""
        p = self.params
        if p.scheme == "bfv":
            return n_summed * 0.5 / self.quantization + 2.0**-52 * self.sum_bound
        # After switching down from q0*p, a fresh ciphertext's coefficient noise is the
        # rounding term r0 + r1*s (+ encoding rounding): variance (2 + 2n/3) / 12. A real
        # slot sums n coefficients: sigma = sqrt(n * var / 2) / scale (measured: exact to
        # 1%). In the slot domain r1*s is a product of two near-Gaussians, so the tail is
        # exponential, not Gaussian: P(|e| > t sigma) ~ 0.014 * 3.5^-(t-3) (measured over
        # 2.5e5 slots). z makes the bound fail with probability < 1e-6 over all dim slots.
        n = p.poly_modulus_degree
        sigma = math.sqrt(n * (2 + 2 * n / 3) / 12 / 2) / p.scale
        z = 3 + math.log(0.014 * max(self.dim, 1) * 1e6) / math.log(3.5)
        grid = 0.5 * 2.0**-self.release_grid_bits if self.release_grid_bits else 0.0
        return z * sigma * math.sqrt(max(n_summed, 1)) + grid + 2.0**-50 * self.sum_bound


@dataclass(frozen=True)
class DecryptedSum:
    """What the key holder releases: the (pre-scaled) sum and its provenance."""

    values: np.ndarray
    included: tuple[int, ...]
    weight_sum: float | None
    error_bound: float


@dataclass(frozen=True)
class DecryptedShare:
    """One key holder's part of a split round: a sum of uniform shares modulo t."""

    values: np.ndarray  # int64 in [0, t)
    included: tuple[int, ...]
    fingerprint: bytes


@dataclass(frozen=True, eq=False)
class VerifiedSum:
    """What :meth:`KeyHolder.verify` hands to :meth:`KeyHolder.release`: the recomputed sum."""

    included: tuple[int, ...]
    vectors: list = field(repr=False)


@dataclass(frozen=True, eq=False)
class CheckedUpload:
    """What :meth:`HeServer.check` hands to :meth:`HeServer.commit`: an accepted upload and the new sum."""

    sender: int
    upload: bytes = field(repr=False)
    base: list | None = field(repr=False)
    total: list = field(repr=False)


# ---------------------------------------------------------------------------------------
# TenSEAL helpers


def _new_context(params: HeParams) -> ts.Context:
    if params.scheme == "ckks":
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
        ctx.global_scale = params.scale
    else:
        ctx = ts.context(ts.SCHEME_TYPE.BFV, params.poly_modulus_degree, params.plain_modulus,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    return ctx


def _serialize(ctx: ts.Context, *, public_key: bool) -> bytes:
    return ctx.serialize(save_public_key=public_key, save_secret_key=False,
                         save_galois_keys=False, save_relin_keys=False)


def _encryption_parameters(ctx: ts.Context) -> tuple[bytes, float | None]:
    """SEAL's serialized EncryptionParameters (field 1 of TenSEAL's context proto) and scale.

    TenSEAL's ``auto_*`` flags also live in the context proto and differ between a fresh
    and a loaded context, so only the encryption parameters and the scale are compared.
    """
    blob = _serialize(ctx, public_key=False)
    length, pos, shift = 0, 1, 0
    while pos < len(blob):
        length |= (blob[pos] & 0x7F) << shift
        shift += 7
        pos += 1
        if not blob[pos - 1] & 0x80:
            break
    if not blob or blob[0] != 0x0A or pos + length > len(blob):
        raise ConfigError("the HE context has no encryption parameters")
    try:
        scale: float | None = float(ctx.global_scale)
    except ValueError:  # BFV contexts (and CKKS ones without a scale) have none
        scale = None
    return blob[pos : pos + length], scale


@lru_cache(maxsize=16)
def _expected_params(params: HeParams) -> tuple[bytes, float | None]:
    """The encryption parameters (and scale) a context for ``params`` must have."""
    return _encryption_parameters(_new_context(params))


@lru_cache(maxsize=8)
def _load_context(data: bytes) -> ts.Context:
    """Load a public or parameters-only context (cached: contexts are immutable here)."""
    try:
        return ts.context_from(data)
    except Exception:  # noqa: BLE001 -- TenSEAL raises several unrelated types for bad input
        raise ConfigError("the HE context could not be loaded; it is corrupted or not a TenSEAL context") from None


def _open_context(data: bytes, keyholder_public_key: bytes, round: HeRoundConfig, audience: str) -> tuple[ts.Context, bytes]:
    try:
        _, msg = open_sealed(data, {KEYHOLDER_ID: keyholder_public_key}.get,
                             max_bytes=HeContext.FIELD_LIMITS["context"] + 4096, expect=HeContext)
    except (WireError, InvalidSignature) as exc:
        raise ConfigError(f"the HE context is not a valid message signed by the key holder ({exc})") from None
    if msg.round_id != round.round_id:
        raise ReplayError("the HE context belongs to another round")
    if msg.audience != audience:
        raise KeyRoleError(f"this HE context is meant for the {msg.audience}, not the {audience}")
    if msg.params != round.params:
        raise ConfigError(f"mismatched parameters: the key holder uses {msg.params}, this round expects {round.params}")
    ctx = _load_context(msg.context)
    if ctx.has_secret_key() or ctx.is_private():
        raise KeyRoleError(
            f"the HE context sent to the {audience} carries the secret key; only the key holder may "
            "hold it. Refusing it (send make_context_public() / a parameters-only context)"
        )
    if ctx.has_relin_keys() or ctx.has_galois_keys():
        raise KeyRoleError(f"the HE context for the {audience} carries evaluation keys it does not need")
    if _encryption_parameters(ctx) != _expected_params(round.params):
        raise ConfigError("mismatched parameters: the context's encryption parameters differ from the round's")
    if audience == "clients":
        if not ctx.has_public_key():
            raise ConfigError("the clients' HE context has no public key; clients cannot encrypt")
        if fingerprint(msg.context) != msg.fingerprint:
            raise ConfigError("the HE context does not match its fingerprint")
    elif ctx.has_public_key():
        raise KeyRoleError("the server's HE context must carry parameters only")
    return ctx, msg.fingerprint


def _open_ciphertexts(data: bytes, public_key_of, round: HeRoundConfig, header_type, label: bytes):
    """Decode the envelope, verify the sealed header, then the digest over the chunks.

    Raises WireError / InvalidSignature (the callers turn both into InvalidCiphertext).
    """
    outer = decode(data, max_bytes=round.max_message_bytes, expect=HeCiphertexts)
    sender, header = open_sealed(outer.header, public_key_of, max_bytes=64 * 1024, expect=header_type)
    if header.n_chunks != len(outer.chunks) or not hmac.compare_digest(
        header.digest, chunks_digest(label, outer.chunks)
    ):
        raise InvalidSignature("the ciphertext chunks do not match the signed digest")
    return sender, header, outer.chunks


def _open_upload(upload: bytes, client_keys: Mapping[int, bytes], r: HeRoundConfig, ctx: ts.Context,
                 key_fingerprint: bytes, seen=()) -> tuple[int, list]:
    """Every check an upload must pass, then its parsed vectors (server and auditing key holder)."""
    try:
        sender, msg, chunks = _open_ciphertexts(upload, client_keys.get, r, HeUploadHeader, UPLOAD_LABEL)
    except (WireError, InvalidSignature):
        raise InvalidCiphertext("upload rejected: not a well-formed upload signed by a registered client") from None
    if msg.client_id != sender:
        raise InvalidCiphertext(f"upload signed by client {sender} claims to come from client {msg.client_id}")
    if msg.round_id != r.round_id:
        raise ReplayError(f"upload from client {sender} belongs to another round")
    if sender in seen:
        raise ReplayError(f"client {sender} already uploaded in this round")
    if msg.fingerprint != key_fingerprint:
        raise InvalidCiphertext(f"upload from client {sender} was made under another key (fingerprint mismatch)")
    if msg.dim != r.dim or msg.weighted != r.weighted or len(chunks) != len(r.chunk_sizes):
        raise InvalidCiphertext(f"upload from client {sender} does not have the round's shape")
    return sender, [_load_vector(ctx, c, r, size) for c, size in zip(chunks, r.chunk_sizes)]


def _added(total: list, vectors: list, sender: int) -> list:
    """Chunk-wise sum into new vectors, so a failure midway leaves ``total`` untouched."""
    try:
        return [acc + vec for acc, vec in zip(total, vectors)]
    except Exception:  # noqa: BLE001 -- SEAL refuses operands its load-time checks let through
        raise InvalidCiphertext(f"upload from client {sender} cannot be added to the sum") from None


def _load_vector(ctx: ts.Context, data: bytes, round: HeRoundConfig, size: int):
    """Check structure first, then let TenSEAL/SEAL parse; every failure is InvalidCiphertext."""
    p = round.params
    check_serialized_vector(data, expected_size=size, raw_bytes=p.ciphertext_bytes,
                 scale=p.scale if p.scheme == "ckks" else None)
    try:
        vec = ts.ckks_vector_from(ctx, data) if p.scheme == "ckks" else ts.bfv_vector_from(ctx, data)
        (ct,) = vec.ciphertext()
        ok = (vec.size() == size and ct.size() == 2 and ct.poly_modulus_degree() == p.poly_modulus_degree
              and ct.coeff_modulus_size() == p.data_primes
              and ct.parms_id() == ctx.seal_context().data.first_parms_id()
              and ct.is_ntt_form() == (p.scheme == "ckks")  # CKKS lives in NTT form, BFV does not
              and (p.scheme != "ckks" or ct.scale == p.scale))
    except Exception:  # noqa: BLE001 -- SEAL's own validation (metadata, ranges) failed
        raise InvalidCiphertext("ciphertext failed SEAL's validation for these parameters") from None
    if not ok:
        raise InvalidCiphertext("ciphertext shape, level or scale differs from the round's parameters")
    return vec


def _release(r: HeRoundConfig, plain: np.ndarray, included: tuple[int, ...]) -> DecryptedSum:
    """Range check (|sum| <= n x bound), CKKS release rounding, split off the weight slot."""
    bound = r.release_bound(len(included)) + r.error_bound(len(included))
    if not np.all(np.abs(plain) <= bound):
        raise InvalidCiphertext(
            f"the decrypted sum exceeds {bound:.6g}, the most {len(included)} in-range contributions can add up "
            "to: a client sent an out-of-range or malformed ciphertext (or one under another key). "
            "Nothing is released"
        )
    if r.params.scheme == "ckks" and r.release_grid_bits:
        step = 2.0**r.release_grid_bits
        plain = np.round(plain * step) / step
    weight_sum = float(plain[r.dim]) if r.weighted else None
    return DecryptedSum(plain[: r.dim], included, weight_sum, r.error_bound(len(included)))


def _bfv_payload(r: HeRoundConfig, residues: np.ndarray) -> np.ndarray:
    """BFV: check the check slots of a decrypted sum (residues mod t), return the centred payload.

    Every client encrypts 0 in the check slots, so an honest sum has 0 there exactly. A
    corrupted ciphertext changes its plaintext polynomial, and a change that is not zero at
    every check slot's root is refused (see docs/threat-model.md for the probability).
    """
    t = r.params.plain_modulus
    payload, checks = r.unpack(residues % t)
    if np.any(checks != 0):
        raise InvalidCiphertext(
            "the decrypted sum's check slots are not zero: a client sent a corrupted or malformed ciphertext. "
            "Nothing is released"
        )
    return np.where(payload > t // 2, payload - t, payload)


def combine_shares(r: HeRoundConfig, shares: Sequence[DecryptedShare]) -> DecryptedSum:
    """Add the key holders' decrypted shares modulo t into the released sum.

    Every key holder must have decrypted a sum over the *same* clients: a server that shows
    the key holders different client sets is caught here (a mismatch would otherwise
    release a sum over their intersection plus noise). The check slots and the range are
    checked on the combined sum, as for a single key holder.
    """
    if len(shares) != r.key_holders or len({s.fingerprint for s in shares}) != r.key_holders:
        raise ConfigError(f"combine exactly one share from each of the {r.key_holders} key holders")
    included = shares[0].included
    if any(s.included != included for s in shares):
        raise MaliciousServerDetected("the key holders decrypted sums over different clients; nothing is released")
    t = r.params.plain_modulus
    total = np.zeros(sum(r.chunk_sizes), dtype=np.int64)
    for s in shares:
        total = (total + s.values) % t
    return _release(r, _bfv_payload(r, total).astype(np.float64) / r.quantization, included)


def additive_shares(values: np.ndarray, t: int, n: int) -> list[np.ndarray]:
    """Split int64 ``values`` into n shares, uniform modulo t given any n - 1 of them.

    The first n - 1 shares are drawn from the OS CSPRNG by rejection sampling (no modulo
    bias); the last is the difference. Shares are returned centred in (-t/2, t/2].
    """
    bits = t.bit_length()
    shares = []
    for _ in range(n - 1):
        out = np.empty(0, dtype=np.int64)
        while out.size < values.size:
            draw = np.frombuffer(os.urandom(8 * (values.size - out.size + 64)), dtype=np.uint64)
            draw = (draw & np.uint64((1 << bits) - 1)).astype(np.int64)
            out = np.concatenate([out, draw[draw < t]])
        shares.append(out[: values.size])
    last = (values - sum(shares, np.zeros_like(values))) % t
    shares.append(last)
    return [np.where(s > t // 2, s - t, s) for s in shares]


# ---------------------------------------------------------------------------------------
# Roles


class KeyHolder:
    """Decryptor role: owns the secret key; decrypts one *verified* sum per round.

    The key holder is never a decryption oracle. It decrypts only a ciphertext it has
    recomputed itself as the homomorphic sum of the signed uploads of the clients the
    server lists: it checks every upload's signature (against ``client_keys``, which the
    caller takes from a source it trusts, e.g. CA-signed certificates, never from the
    server), round, key fingerprint and shape, adds them, and refuses (with
    :class:`~secagg.errors.MaliciousServerDetected`) an aggregate that is not byte for
    byte that sum or whose client list differs. There is no way to skip the check.
    It answers one request per round, whether it decrypts or refuses.
    """

    def __init__(self, round: HeRoundConfig, identity: IdentityKey | None = None) -> None:
        self.round = round
        self.identity = identity or IdentityKey.generate()
        self._ctx = _new_context(round.params)
        self._public_context = _serialize(self._ctx, public_key=True)
        self.fingerprint = fingerprint(self._public_context)
        self._used = False
        self._pending: VerifiedSum | None = None

    @property
    def public_key(self) -> bytes:
        """The key holder's Ed25519 identity key, to verify its context messages."""
        return self.identity.public_bytes

    def context_for_clients(self) -> bytes:
        """Sealed public context: parameters and public key; no secret or evaluation keys."""
        return self._context_message("clients", self._public_context)

    def context_for_server(self) -> bytes:
        """Sealed parameters-only context: enough to parse and add ciphertexts, nothing else."""
        return self._context_message("server", _serialize(self._ctx, public_key=False))

    def _context_message(self, audience: str, context: bytes) -> bytes:
        p = self.round.params
        msg = HeContext(self.round.round_id, audience, p.scheme, p.poly_modulus_degree,
                        p.coeff_mod_bit_sizes, p.scale_bits, p.plain_modulus_bits, context, self.fingerprint)
        return seal(msg, KEYHOLDER_ID, self.identity)

    def decrypt(self, aggregate: bytes, server_public_key: bytes, uploads: Sequence[bytes],
                client_keys: Mapping[int, bytes]) -> DecryptedSum:
        """Verify the server's aggregate against the signed ``uploads`` and decrypt it (once per round).

        ``client_keys`` maps party index to the client's Ed25519 identity key. Refuses
        (nothing released) unless the aggregate is exactly the sum of the uploads of the
        clients it lists, and unless the decrypted sum is within ``release_bound``.
        Same as ``release(verify(...))``.
        """
        self._check_role(split=False)
        return self.release(self.verify(aggregate, server_public_key, uploads, client_keys))

    def decrypt_share(self, aggregate: bytes, server_public_key: bytes, uploads: Sequence[bytes],
                      client_keys: Mapping[int, bytes]) -> DecryptedShare:
        """Split rounds: verify as :meth:`decrypt`, then decrypt this key holder's sum of shares.

        On its own the share is uniform modulo t; :func:`combine_shares` checks the range
        and the check slots of the combined sum. Same as ``release_share(verify(...))``.
        """
        self._check_role(split=True)
        return self.release_share(self.verify(aggregate, server_public_key, uploads, client_keys))

    def verify(self, aggregate: bytes, server_public_key: bytes, uploads: Sequence[bytes],
               client_keys: Mapping[int, bytes]) -> VerifiedSum:
        """First half of :meth:`decrypt`: all checks, and the sum recomputed from the uploads.

        Once per round, whether it succeeds or not. The result is accepted only by this key
        holder's :meth:`release` / :meth:`release_share`, once. Same as
        :meth:`begin_verify`, one :meth:`SumCheck.add` of every upload, :meth:`SumCheck.finish`.
        """
        check = self.begin_verify(aggregate, server_public_key, client_keys)
        check.add(uploads)
        return check.finish()

    def begin_verify(self, aggregate: bytes, server_public_key: bytes, client_keys: Mapping[int, bytes]) -> SumCheck:
        """Check the server's aggregate, then take the signed uploads in batches (:class:`SumCheck`).

        For rounds whose uploads together exceed one message: the key holder holds the
        aggregate and one running sum, never every upload at once. Once per round, as
        :meth:`verify`.
        """
        if self._used:
            raise AlreadyFinalized("the key holder already answered this round's decryption request (once per round)")
        self._used = True  # answered or refused: a server caught lying gets no second attempt
        included, chunks = self._open_aggregate(aggregate, server_public_key)
        return SumCheck(self, included, chunks, client_keys)

    def export_state(self) -> tuple[bytes, bytes, bool]:
        """(secret context, public context, used): to continue the round in another process.

        The secret context holds the round's secret key: keep it where the live key holder
        would be (e.g. a Flower node's own Context), never send it anywhere.
        """
        secret = self._ctx.serialize(save_public_key=True, save_secret_key=True,
                                     save_galois_keys=False, save_relin_keys=False)
        return secret, self._public_context, self._used

    @classmethod
    def restore(cls, round: HeRoundConfig, identity: IdentityKey, secret_context: bytes, public_context: bytes,
                used: bool) -> KeyHolder:
        """The key holder :meth:`export_state` saved (its own state, read back from its own storage)."""
        holder = cls.__new__(cls)
        holder.round, holder.identity = round, identity
        try:
            holder._ctx = ts.context_from(secret_context)  # not _load_context: never cache a secret key
        except Exception:  # noqa: BLE001 -- TenSEAL raises several unrelated types for bad input
            raise ConfigError("the saved key-holder state could not be loaded") from None
        if not holder._ctx.has_secret_key() or _encryption_parameters(holder._ctx) != _expected_params(round.params):
            raise ConfigError("the saved key-holder state does not hold a secret key for this round's parameters")
        holder._public_context = public_context
        holder.fingerprint = fingerprint(public_context)
        holder._used, holder._pending = used, None
        return holder

    def release(self, verified: VerifiedSum) -> DecryptedSum:
        """Second half of :meth:`decrypt`: decrypt the verified sum, check its range, round it."""
        r = self.round
        self._check_role(split=False)
        vectors = self._take(verified)
        if r.params.scheme == "bfv":
            plain = _bfv_payload(r, self._decrypt_residues(vectors)).astype(np.float64) / r.quantization
        else:
            try:
                plain = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])
            except Exception:  # noqa: BLE001 -- SEAL refuses what its load-time checks let through
                raise InvalidCiphertext("the sum could not be decrypted; nothing is released") from None
        return _release(r, plain, verified.included)

    def release_share(self, verified: VerifiedSum) -> DecryptedShare:
        """Second half of :meth:`decrypt_share`."""
        self._check_role(split=True)
        return DecryptedShare(self._decrypt_residues(self._take(verified)), verified.included, self.fingerprint)

    def _check_role(self, *, split: bool) -> None:
        k = self.round.key_holders
        if split and k == 1:
            raise KeyRoleError("this round has a single key holder; call decrypt()")
        if not split and k > 1:
            raise KeyRoleError(
                f"this round splits every update between {k} key holders; no single one can "
                "decrypt the sum. Call decrypt_share() and combine the shares with combine_shares()"
            )

    def _take(self, verified: VerifiedSum) -> list:
        if self._pending is None or verified is not self._pending:
            raise KeyRoleError("the key holder decrypts only the sum its own verify() returned, once")
        self._pending = None
        return verified.vectors

    def _decrypt_residues(self, vectors: list) -> np.ndarray:
        t = self.round.params.plain_modulus
        try:
            return np.concatenate([np.asarray(v.decrypt(), dtype=np.int64) for v in vectors]) % t
        except Exception:  # noqa: BLE001 -- SEAL refuses what its load-time checks let through
            raise InvalidCiphertext("the sum could not be decrypted; nothing is released") from None

    def _open_aggregate(self, aggregate: bytes, server_public_key: bytes) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
        """Every check on the server's aggregate itself: (the clients it lists, its chunks)."""
        r = self.round
        try:
            _, msg, chunks = _open_ciphertexts(aggregate, {SERVER_ID: server_public_key}.get, r,
                                               HeAggregateHeader, AGGREGATE_LABEL)
        except (WireError, InvalidSignature):
            raise InvalidCiphertext("the aggregate is not a well-formed message signed by the server") from None
        if msg.round_id != r.round_id:
            raise ReplayError("the aggregate belongs to another round")
        if msg.fingerprint != self.fingerprint:
            raise InvalidCiphertext("the aggregate was made under another key (fingerprint mismatch)")
        if msg.dim != r.dim or msg.weighted != r.weighted or len(chunks) != len(r.chunk_sizes):
            raise InvalidCiphertext("the aggregate's shape differs from the round's")
        if not all(0 <= c < r.n_clients for c in msg.included):
            raise InvalidCiphertext("the aggregate lists clients outside the round")
        if len(msg.included) < r.min_clients:
            raise NotEnoughSurvivors(
                f"the aggregate covers {len(msg.included)} clients, fewer than min_clients={r.min_clients}; "
                "decrypting it could reveal an individual update"
            )
        return tuple(sorted(msg.included)), tuple(chunks)


class SumCheck:
    """The key holder recomputing a server's aggregate from the signed uploads, batch by batch.

    Made by :meth:`KeyHolder.begin_verify` once the aggregate itself passed its checks. Each
    :meth:`add` checks a batch of uploads (signature against the trusted ``client_keys``,
    round, key fingerprint, shape; a sender the aggregate lists, once) and adds them to a
    running sum; :meth:`finish` refuses unless every listed client's upload came and the
    aggregate is byte for byte that sum. Memory: the aggregate and one running sum,
    whatever the number of uploads. The first refusal is final.
    """

    def __init__(self, holder: KeyHolder, included: tuple[int, ...], chunks: tuple[bytes, ...],
                 client_keys: Mapping[int, bytes], senders: Sequence[int] = (), total: list | None = None) -> None:
        self._holder, self.included, self._chunks = holder, included, chunks
        self._client_keys = dict(client_keys)
        self.senders: list[int] = list(senders)
        self._total = total
        self._closed = False

    @property
    def closed(self) -> bool:
        """Finished or refused: nothing more is checked."""
        return self._closed

    @property
    def missing(self) -> int:
        """Listed clients whose upload has not been checked yet."""
        return len(self.included) - len(self.senders)

    def add(self, uploads: Sequence[bytes]) -> int:
        """Check and add a batch of signed uploads; returns how many have been checked in all."""
        self._open()
        try:
            for upload in uploads:
                sender, vectors = _open_upload(upload, self._client_keys, self._holder.round, self._holder._ctx,
                                               self._holder.fingerprint, seen=self.senders)
                if sender not in self.included:
                    raise MaliciousServerDetected(
                        f"the server forwarded client {sender}'s upload, which its aggregate does not list; "
                        "nothing is decrypted"
                    )
                self._total = vectors if self._total is None else _added(self._total, vectors, sender)
                self.senders.append(sender)
        except Exception:
            self._closed = True
            raise
        return len(self.senders)

    def finish(self) -> VerifiedSum:
        """The verified sum for :meth:`KeyHolder.release` / :meth:`KeyHolder.release_share`, once."""
        self._open()
        self._closed = True
        if self.missing or self._total is None:
            raise MaliciousServerDetected(
                f"the aggregate lists clients {list(self.included)} but the signed uploads come from "
                f"{sorted(self.senders)}; nothing is decrypted"
            )
        if any(not hmac.compare_digest(a.serialize(), c) for a, c in zip(self._total, self._chunks)):
            raise MaliciousServerDetected(
                "the server's aggregate is not the sum of the signed uploads it lists; nothing is decrypted"
            )
        self._holder._pending = VerifiedSum(self.included, self._total)
        return self._holder._pending

    def export_state(self) -> tuple[tuple[int, ...], tuple[bytes, ...], tuple[int, ...], tuple[bytes, ...]]:
        """(included, aggregate chunks, senders so far, running sum): to continue in another process."""
        total = () if self._total is None else tuple(v.serialize() for v in self._total)
        return self.included, self._chunks, tuple(self.senders), total

    @classmethod
    def restore(cls, holder: KeyHolder, client_keys: Mapping[int, bytes], included: Sequence[int],
                chunks: Sequence[bytes], senders: Sequence[int], total: Sequence[bytes]) -> SumCheck:
        """The check :meth:`export_state` saved, continued by the restored ``holder``."""
        r = holder.round
        vectors = [_load_vector(holder._ctx, c, r, size) for c, size in zip(total, r.chunk_sizes)] if total else None
        if vectors is not None and len(vectors) != len(r.chunk_sizes):
            raise ConfigError("the saved sum check does not have the round's shape")
        return cls(holder, tuple(included), tuple(chunks), client_keys, senders, vectors)

    def _open(self) -> None:
        if self._closed:
            raise AlreadyFinalized("this check of the aggregate already ended; the key holder answers once per round")


class HeClient:
    """Client role: holds the public key only; encrypts its update once per round."""

    def __init__(self, client_id: int, round: HeRoundConfig, context_message: bytes,
                 keyholder_public_key: bytes, identity: IdentityKey | None = None) -> None:
        if not 0 <= client_id < round.n_clients:
            raise ConfigError(f"client_id {client_id} is outside the round's {round.n_clients} clients")
        self.client_id = client_id
        self.round = round
        self.identity = identity or IdentityKey.generate()
        self._ctx, self.fingerprint = _open_context(context_message, keyholder_public_key, round, "clients")
        self._zeros: list | None = None
        self._sent = False

    def precompute(self) -> None:
        """Encrypt zeros ahead of time (e.g. while training); :meth:`encrypt` then only adds.

        A public-key encryption is Enc(0) + encode(m); the Enc(0) part is most of the cost
        and does not depend on the update, so it can be done before the update exists.
        Each precomputed ciphertext is used once.
        """
        zero = 0 if self.round.params.scheme == "bfv" else 0.0
        self._zeros = [self._encrypt_list([zero] * s) for s in self.round.chunk_sizes]

    def encrypt(self, update: np.ndarray, *, weight: float | None = None) -> bytes:
        """This client's encrypted, signed upload; ``weight`` is its fraction f_i in (0, 1]."""
        return self.seal_upload(self.encrypt_chunks(update, weight=weight))

    def encrypt_chunks(self, update: np.ndarray, *, weight: float | None = None) -> tuple[bytes, ...]:
        """Encrypt the update (once per round) into TenSEAL-serialized chunks, unsigned."""
        if self.round.key_holders > 1:
            raise KeyRoleError("in a split round a client encrypts through SplitClient, one share per key holder")
        return self.encrypt_values(self.encode(update, weight=weight))

    def encode(self, update: np.ndarray, *, weight: float | None = None) -> np.ndarray:
        """The values this client encrypts: checked against the round, weighted, and for BFV
        quantized with the (zero) check slots inserted. Cheap next to :meth:`encrypt_values`."""
        x = self._prepare(update, weight)
        return self.round.pack(self._quantize(x)) if self.round.params.scheme == "bfv" else x

    def _prepare(self, update: np.ndarray, weight: float | None) -> np.ndarray:
        """Validate the update against the round; append the weight slot; pre-scale."""
        r = self.round
        x = np.asarray(update, dtype=np.float64)
        if x.shape != (r.dim,):
            raise InputError(f"update must have shape ({r.dim},), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise InputError("update contains NaN or infinity")
        if r.weighted:
            if weight is None or not (0 < weight <= 1) or not math.isfinite(weight):
                raise InputError("a weighted round needs the client's weight fraction in (0, 1]")
            x = np.append(x * weight, weight)
        elif weight is not None:
            raise InputError("this round is unweighted; do not pass a weight")
        peak = float(np.max(np.abs(x[: r.dim]))) if r.dim else 0.0
        if peak > r.value_bound:
            raise InputError(f"update exceeds the round's value bound ({peak:.3g} > {r.value_bound:.3g}); clip it first")
        return x

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        return np.rint(x * self.round.quantization).astype(np.int64)

    def encrypt_values(self, values: np.ndarray) -> tuple[bytes, ...]:
        """Encrypt :meth:`encode`'s output (or, in a split round, one share of it), chunk by
        chunk, once per round; uses the precomputed encryptions of zero when there are any."""
        if self._sent:
            raise AlreadyFinalized("this client already uploaded its update for the round")
        self._sent = True
        zeros, self._zeros = self._zeros, None
        chunks, start = [], 0
        for i, size in enumerate(self.round.chunk_sizes):
            part = values[start : start + size].tolist()
            start += size
            if zeros is not None:
                vec = zeros[i]
                vec.add_(part)
            else:
                vec = self._encrypt_list(part)
            chunks.append(vec.serialize())
        return tuple(chunks)

    def seal_upload(self, chunks: tuple[bytes, ...]) -> bytes:
        """Sign a header with the chunks' digest and wrap header and chunks for the server."""
        r = self.round
        header = HeUploadHeader(r.round_id, self.client_id, self.fingerprint, r.dim, r.weighted, len(chunks),
                                chunks_digest(UPLOAD_LABEL, chunks))
        return encode(HeCiphertexts(seal(header, self.client_id, self.identity), tuple(chunks)))

    def _encrypt_list(self, part: list):
        if self.round.params.scheme == "bfv":
            return ts.bfv_vector(self._ctx, part)
        return ts.ckks_vector(self._ctx, part)

    def decrypt(self, *_args, **_kwargs):
        raise KeyRoleError("clients hold the public key only and cannot decrypt; only the key holder can")


class SplitClient:
    """Client of a split round (``key_holders`` > 1, BFV): one upload per key holder.

    The quantized update q is split into additive shares modulo t (:func:`additive_shares`);
    share j is encrypted under key holder j's public key and goes to the server's j-th sum.
    Any key holder alone, even with the server, decrypts only uniform noise.
    """

    def __init__(self, client_id: int, round: HeRoundConfig, context_messages: Sequence[bytes],
                 keyholder_public_keys: Sequence[bytes], identity: IdentityKey | None = None) -> None:
        if round.key_holders < 2:
            raise ConfigError("SplitClient needs a round with key_holders >= 2")
        if len(context_messages) != round.key_holders or len(keyholder_public_keys) != round.key_holders:
            raise ConfigError(f"a split round needs one context and one identity key per key holder ({round.key_holders})")
        self.identity = identity or IdentityKey.generate()
        self.parts = [HeClient(client_id, round, c, k, self.identity)
                      for c, k in zip(context_messages, keyholder_public_keys)]
        if len({c.fingerprint for c in self.parts}) != len(self.parts):
            raise ConfigError("the key holders' contexts must be distinct keys")
        self.round = round

    def precompute(self) -> None:
        for part in self.parts:
            part.precompute()

    def encrypt(self, update: np.ndarray, *, weight: float | None = None) -> tuple[bytes, ...]:
        """One signed upload per key holder, in the order of the contexts."""
        return self.seal_uploads(self.encrypt_chunks(update, weight=weight))

    def encrypt_chunks(self, update: np.ndarray, *, weight: float | None = None) -> tuple[tuple[bytes, ...], ...]:
        """Encode, split into additive shares and encrypt share j under key holder j (unsigned)."""
        packed = self.parts[0].encode(update, weight=weight)
        shares = additive_shares(packed, self.round.params.plain_modulus, len(self.parts))
        return tuple(p.encrypt_values(share) for p, share in zip(self.parts, shares))

    def seal_uploads(self, chunk_sets: Sequence[tuple[bytes, ...]]) -> tuple[bytes, ...]:
        """Sign each key holder's chunks (see :meth:`HeClient.seal_upload`)."""
        return tuple(p.seal_upload(chunks) for p, chunks in zip(self.parts, chunk_sets))


class HeServer:
    """Server role: no key at all; authenticates uploads and adds ciphertexts."""

    def __init__(self, round: HeRoundConfig, context_message: bytes, keyholder_public_key: bytes,
                 client_keys: Mapping[int, bytes], identity: IdentityKey | None = None) -> None:
        self.round = round
        self.identity = identity or IdentityKey.generate()
        self._ctx, self.fingerprint = _open_context(context_message, keyholder_public_key, round, "server")
        self._client_keys = dict(client_keys)
        self._sum: list | None = None
        self._included: list[int] = []
        self._uploads: list[bytes] = []
        self._finished = False

    @property
    def public_key(self) -> bytes:
        return self.identity.public_bytes

    @property
    def included(self) -> tuple[int, ...]:
        return tuple(self._included)

    @property
    def tenseal_context(self) -> ts.Context:
        """The parameters-only TenSEAL context (no key of any kind); do not mutate it."""
        return self._ctx

    def receive(self, upload: bytes, *, sender: int | None = None) -> int:
        """Authenticate, validate and add one client's upload; returns the client id.

        ``sender``: the party the upload must come from (a link knows whose stream it
        arrived on); an upload signed by another party is refused before it is added.
        A rejected upload leaves the running sum untouched. Same as ``commit(check(...))``.
        """
        return self.commit(self.check(upload, sender=sender))

    def check(self, upload: bytes, *, sender: int | None = None) -> CheckedUpload:
        """Every check of :meth:`receive` and the new sum, without adding it yet.

        A split round checks a client's upload for every key holder before it commits
        any of them, so its sums never disagree on who is in them.
        """
        if self._finished:
            raise AlreadyFinalized("the aggregate was already sent; uploads are closed")
        signer, vectors = _open_upload(upload, self._client_keys, self.round, self._ctx, self.fingerprint,
                                       seen=self._included)
        if sender is not None and signer != sender:
            raise RemoteProtocolError(f"the upload of party {signer} arrived from party {sender}", sender)
        total = vectors if self._sum is None else _added(self._sum, vectors, signer)
        return CheckedUpload(signer, upload, self._sum, total)

    def commit(self, checked: CheckedUpload) -> int:
        """Add an upload :meth:`check` accepted against the current sum; returns the client id."""
        if self._finished:
            raise AlreadyFinalized("the aggregate was already sent; uploads are closed")
        if checked.base is not self._sum or checked.sender in self._included:
            raise ReplayError("the sum changed since this upload was checked; check it again")
        self._sum = checked.total
        self._included.append(checked.sender)
        self._uploads.append(checked.upload)
        return checked.sender

    @property
    def uploads(self) -> tuple[bytes, ...]:
        """The accepted uploads, as received: the key holder recomputes the sum from them."""
        return tuple(self._uploads)

    def aggregate(self) -> bytes:
        """Seal the sum for the key holder (once)."""
        if self._finished:
            raise AlreadyFinalized("the aggregate was already produced for this round")
        r = self.round
        if self._sum is None or len(self._included) < r.min_clients:
            raise NotEnoughSurvivors(
                f"{len(self._included)} uploads received, the round needs at least {r.min_clients}"
            )
        self._finished = True
        chunks = tuple(v.serialize() for v in self._sum)
        header = HeAggregateHeader(r.round_id, self.fingerprint, r.dim, r.weighted, tuple(self._included),
                                   len(chunks), chunks_digest(AGGREGATE_LABEL, chunks))
        return encode(HeCiphertexts(seal(header, SERVER_ID, self.identity), chunks))

    def decrypt(self, *_args, **_kwargs):
        raise KeyRoleError(
            "the server holds no secret key (its context has parameters only) and cannot decrypt; "
            "send the aggregate to the key holder"
        )


def new_round_id() -> bytes:
    return os.urandom(16)
