"""CKKS / BFV protection mode: sums, key roles, wrong keys, corrupted bytes, dropouts, weights."""

from __future__ import annotations

import dataclasses
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

pytest.importorskip("tenseal")

import tenseal as ts

import secagg
from secagg.ckks import (
    HeClient,
    HeParams,
    HeRoundConfig,
    HeServer,
    KeyHolder,
    SplitClient,
    aggregate_ckks,
    combine_shares,
    new_round_id,
)
from secagg.ckks.messages import HeCiphertexts, HeContext, HeUploadHeader, chunks_digest
from secagg.ckks.roles import KEYHOLDER_ID
from secagg.ckks.tenseal_format import check_serialized_vector
from secagg.errors import (
    AlreadyFinalized,
    ConfigError,
    InputError,
    InvalidCiphertext,
    KeyRoleError,
    MaliciousServerDetected,
    NotEnoughSurvivors,
    OverflowRisk,
    ReplayError,
)
from secagg.keys import IdentityKey
from secagg.wire import decode, encode, open_sealed, seal

CKKS = HeParams.ckks()
BFV = HeParams.bfv()


class Round:
    """A key holder, a key-less server and n clients wired together in memory."""

    def __init__(self, n: int, dim: int, params: HeParams = CKKS, **kw) -> None:
        self.config = HeRoundConfig(new_round_id(), dim, n, params, **kw)
        self.holder = KeyHolder(self.config)
        self.ids = [IdentityKey.generate() for _ in range(n)]
        self.client_ctx = self.holder.context_for_clients()
        self.server_ctx = self.holder.context_for_server()
        self.keys = {i: k.public_bytes for i, k in enumerate(self.ids)}
        self.server = HeServer(self.config, self.server_ctx, self.holder.public_key, self.keys)

    def client(self, i: int) -> HeClient:
        return HeClient(i, self.config, self.client_ctx, self.holder.public_key, self.ids[i])

    def upload(self, i: int, x, **kw) -> bytes:
        return self.client(i).encrypt(np.asarray(x, dtype=np.float64), **kw)

    def decrypt(self, aggregate: bytes, holder: KeyHolder | None = None):
        """The key holder's decryption, given the uploads the server added (it verifies them)."""
        return (holder or self.holder).decrypt(aggregate, self.server.public_key, self.server.uploads, self.keys)


# --------------------------------------------------------------------------- sums


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 4),
    dim=st.sampled_from([1, 7, 4095, 4096, 4097, 8193]),
    data=st.data(),
)
def test_ckks_sum_matches_float_sum(n, dim, data):
    magnitude = data.draw(st.sampled_from([1e-3, 1.0, 37.5]))
    x = data.draw(arrays(np.float64, (n, dim), elements=st.floats(-1, 1, allow_subnormal=False))) * magnitude
    result = secagg.aggregate(x, protection="ckks")
    exact = x.sum(axis=0)
    err = np.max(np.abs(result.total - exact))
    assert result.total.shape == (dim,)
    assert result.included == tuple(range(n))
    assert err <= result.max_quantization_error
    assert result.max_quantization_error < 1e-6  # defaults: below 1e-6 for few clients
    assert result.protection == "ckks"


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 4), dim=st.sampled_from([1, 4096, 4097]), data=st.data())
def test_bfv_sum_matches_float_sum(n, dim, data):
    x = data.draw(arrays(np.float64, (n, dim), elements=st.floats(-1, 1, allow_subnormal=False)))
    result = secagg.aggregate(x, protection="ckks", scheme="bfv")
    assert np.max(np.abs(result.total - x.sum(axis=0))) <= result.max_quantization_error < 1e-8


def test_hundred_clients_error_below_1e6():
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (100, 300))
    x[:, 0] = 1.0  # worst case for the magnitude of the sum
    result = aggregate_ckks(x, value_bound=1.0)
    err = np.max(np.abs(result.total - x.sum(axis=0)))
    assert err < 1e-6
    assert err <= result.max_quantization_error < 1e-6


def test_raw_release_is_more_precise_than_rounded_release():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 4096))
    raw = aggregate_ckks(x, release_grid_bits=0)
    assert np.max(np.abs(raw.total - x.sum(0))) <= raw.max_quantization_error < 1e-7
    rounded = aggregate_ckks(x)
    step = 2.0**-22
    assert np.allclose(rounded.total / step, np.round(rounded.total / step), atol=1e-6)


def test_upload_size_and_timings_reported():
    x = np.random.default_rng(2).uniform(-1, 1, (2, 10_000))
    result = aggregate_ckks(x)
    assert 32 <= result.bytes_up_per_param * 10_000 / (3 * 4096) <= 33  # 3 ciphertexts of 4096 slots
    for phase in ("keyholder.keygen", "client.encrypt", "server.sum", "keyholder.decrypt"):
        assert result.timings[phase] > 0
    bfv = aggregate_ckks(x, scheme="bfv")
    assert bfv.bytes_up_per_param < 0.55 * result.bytes_up_per_param  # 4096 values per 65 KB


# --------------------------------------------------------------------------- key roles


def test_server_cannot_decrypt():
    r = Round(2, 10)
    r.server.receive(r.upload(0, np.ones(10)))
    r.server.receive(r.upload(1, np.ones(10)))
    with pytest.raises(KeyRoleError):
        r.server.decrypt()
    ctx = r.server._ctx
    assert not ctx.has_secret_key() and not ctx.is_private() and not ctx.has_public_key()
    assert not ctx.has_relin_keys() and not ctx.has_galois_keys()
    # even going around the API, TenSEAL has no key to decrypt with
    with pytest.raises(ValueError):
        r.server._sum[0].decrypt()
    # and the server's context is too poor to encrypt anything either
    with pytest.raises(ValueError):
        ts.ckks_vector(ctx, [1.0])


def test_client_cannot_decrypt_other_clients():
    r = Round(2, 10)
    client = r.client(0)
    assert not client._ctx.has_secret_key() and client._ctx.has_public_key()
    sealed = r.upload(1, np.full(10, 0.5))
    vec = ts.ckks_vector_from(client._ctx, decode(sealed, max_bytes=len(sealed), expect=HeCiphertexts).chunks[0])
    with pytest.raises(ValueError):
        vec.decrypt()
    with pytest.raises(KeyRoleError):
        client.decrypt(sealed)


def test_context_carrying_secret_key_is_refused():
    r = Round(2, 10)
    private = r.holder._ctx.serialize(save_secret_key=True)
    p = r.config.params
    forged = seal(HeContext(r.config.round_id, "clients", p.scheme, p.poly_modulus_degree, p.coeff_mod_bit_sizes,
                            p.scale_bits, p.plain_modulus_bits, private, r.holder.fingerprint),
                  KEYHOLDER_ID, r.holder.identity)
    with pytest.raises(KeyRoleError):
        HeClient(0, r.config, forged, r.holder.public_key, r.ids[0])


def test_server_refuses_the_clients_context_and_vice_versa():
    r = Round(2, 10)
    with pytest.raises(KeyRoleError):
        HeServer(r.config, r.client_ctx, r.holder.public_key, {})
    with pytest.raises(KeyRoleError):
        HeClient(0, r.config, r.server_ctx, r.holder.public_key)


def test_key_holder_decrypts_once():
    r = Round(2, 10)
    for i in range(2):
        r.server.receive(r.upload(i, np.ones(10)))
    agg = r.server.aggregate()
    out = r.decrypt(agg)
    assert np.allclose(out.values, 2.0, atol=1e-6)
    with pytest.raises(AlreadyFinalized):
        r.decrypt(agg)


def test_key_holder_refuses_a_sum_over_too_few_clients():
    r = Round(3, 10, min_clients=2)
    r.server.receive(r.upload(0, np.ones(10)))
    with pytest.raises(NotEnoughSurvivors):
        r.server.aggregate()


# --------------------------------------------------------------------------- wrong keys / parameters


def test_upload_under_another_key_is_refused():
    a = Round(2, 10)
    holder_b = KeyHolder(a.config)  # same round and parameters, another key holder
    client = HeClient(0, a.config, holder_b.context_for_clients(), holder_b.public_key, a.ids[0])
    with pytest.raises(InvalidCiphertext, match="another key"):
        a.server.receive(client.encrypt(np.ones(10)))
    assert a.server.included == ()


def test_aggregate_under_another_key_is_refused():
    a = Round(2, 10)
    other = KeyHolder(a.config)
    for i in range(2):
        a.server.receive(a.upload(i, np.ones(10)))
    with pytest.raises(InvalidCiphertext):
        a.decrypt(a.server.aggregate(), other)


def test_mismatched_parameters_are_refused():
    r = Round(2, 10)
    other = HeRoundConfig(r.config.round_id, 10, 2, HeParams.ckks(scale_bits=30))
    with pytest.raises(ConfigError, match="mismatched parameters"):
        HeClient(0, other, r.client_ctx, r.holder.public_key)
    with pytest.raises(ConfigError):
        HeServer(HeRoundConfig(r.config.round_id, 10, 2, HeParams.ckks(16384, (60, 40))), r.server_ctx,
                 r.holder.public_key, {})


def test_context_signed_by_someone_else_or_for_another_round_is_refused():
    r = Round(2, 10)
    with pytest.raises(ConfigError):
        HeClient(0, r.config, r.client_ctx, IdentityKey.generate().public_bytes)
    later = HeRoundConfig(new_round_id(), 10, 2)
    with pytest.raises(ReplayError):
        HeClient(0, later, r.client_ctx, r.holder.public_key)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": (60, 60, 60, 60)},  # 240 > 218 bits
        {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 50)},  # 110 > 109 bits
        {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": (60,)},  # no special prime
        {"poly_modulus_degree": 8000},
        {"scale_bits": 56},  # no headroom for the sum
        {"scale_bits": 10},  # no precision
    ],
)
def test_insecure_or_unusable_parameters_rejected(kwargs):
    with pytest.raises(ConfigError):
        HeParams(**kwargs)


def test_overflowing_round_rejected():
    with pytest.raises(OverflowRisk):
        HeRoundConfig(new_round_id(), 10, 100, CKKS, value_bound=1e4)
    with pytest.raises(OverflowRisk):
        HeRoundConfig(new_round_id(), 10, 10_000, BFV)


def test_update_beyond_value_bound_rejected():
    r = Round(2, 4, value_bound=1.0)
    with pytest.raises(InputError):
        r.upload(0, [0.0, 2.0, 0.0, 0.0])
    with pytest.raises(InputError):
        r.upload(0, [0.0, np.nan, 0.0, 0.0])


# --------------------------------------------------------------------------- corrupted bytes


def test_random_bit_flips_in_uploads_always_give_a_typed_error():
    r = Round(2, 5000)
    good = r.upload(0, np.full(5000, 0.25))
    rng = random.Random(1234)
    for _ in range(200):
        bad = bytearray(good)
        pos = rng.randrange(len(bad))
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(InvalidCiphertext):
            r.server.receive(bytes(bad))
    for cut in [0, 1, 10, 100, len(good) // 2, len(good) - 1]:
        with pytest.raises(InvalidCiphertext):
            r.server.receive(good[:cut])
    # the server is unharmed: the genuine uploads still sum correctly
    r.server.receive(good)
    r.server.receive(r.upload(1, np.full(5000, 0.5)))
    out = r.decrypt(r.server.aggregate())
    assert np.allclose(out.values, 0.75, atol=1e-6)


def test_tampered_aggregate_is_refused():
    r = Round(2, 10)
    for i in range(2):
        r.server.receive(r.upload(i, np.ones(10)))
    agg = bytearray(r.server.aggregate())
    agg[len(agg) // 2] ^= 0x10
    with pytest.raises(InvalidCiphertext):
        r.decrypt(bytes(agg))


def _resealed(r: Round, i: int, mutate) -> bytes:
    """A registered (malicious) client signs ciphertext bytes it has corrupted itself."""
    client = r.client(i)
    chunks = client.encrypt_chunks(np.ones(r.config.dim) * 0.1)
    return client.seal_upload(tuple(mutate(bytearray(c)) for c in chunks))


def test_authenticated_but_malformed_ciphertexts_never_reach_tenseal_unchecked():
    r = Round(2, 100)

    def huge_size(c):  # the 'sizes' varint TenSEAL trusts in decrypt (GBs reserved)
        return bytes(c[:2]) + b"\xff\xff\xff\xff\x0f" + bytes(c[4:])

    def truncated(c):
        return bytes(c[:-9])

    def trailing(c):
        return bytes(c) + b"\x00"

    def wrong_scale(c):
        c[-8:] = struct.pack("<d", 2.0**30)
        return bytes(c)

    def seal_size(c):  # the SEAL header's size field
        c[4 + 3 + 8] ^= 0x40
        return bytes(c)

    for mutate in (huge_size, truncated, trailing, wrong_scale, seal_size):
        with pytest.raises(InvalidCiphertext):
            r.server.receive(_resealed(r, 0, mutate))
    assert r.server.included == ()


def test_malicious_client_bit_flips_are_typed_or_harmless():
    """Flips signed by a registered client: typed error, or a valid ciphertext (CKKS is malleable)."""
    r = Round(2, 100)
    rng = random.Random(99)
    outcomes = {"rejected": 0, "accepted": 0}
    for k in range(60):
        pos_limit = 64 if k % 2 else None  # half in the headers, half anywhere

        def flip(c, pos_limit=pos_limit):
            pos = rng.randrange(pos_limit or len(c))
            c[pos] ^= 1 << rng.randrange(8)
            return bytes(c)

        server = HeServer(r.config, r.server_ctx, r.holder.public_key, {0: r.ids[0].public_bytes})
        try:
            server.receive(_resealed(r, 0, flip))
            outcomes["accepted"] += 1
        except InvalidCiphertext:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0


def test_zstd_bomb_is_refused_before_decompression():
    # a SEAL blob whose zstd frame is thousands of RLE blocks of 128 KiB each
    rle_block = (((128 * 1024) << 3) | (1 << 1)).to_bytes(3, "little") + b"\x00"
    last = (((128 * 1024) << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\x00"
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x58]) + rle_block * 2000 + last
    blob_len = 16 + len(frame)
    blob = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 0, 2, 0, blob_len) + frame
    vec = b"\x0a\x02" + _varint(4096) + b"\x12" + _varint(len(blob)) + blob + b"\x19" + struct.pack("<d", 2.0**40)
    with pytest.raises(InvalidCiphertext):
        check_serialized_vector(vec, expected_size=4096, raw_bytes=CKKS.ciphertext_bytes, scale=2.0**40)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_replays_and_double_uploads_are_refused():
    r = Round(2, 10)
    up = r.upload(0, np.ones(10))
    r.server.receive(up)
    with pytest.raises(ReplayError):
        r.server.receive(up)
    other = Round(2, 10)
    with pytest.raises((ReplayError, InvalidCiphertext)):
        r.server.receive(other.upload(1, np.ones(10)))
    client = r.client(1)
    client.encrypt(np.ones(10))
    with pytest.raises(AlreadyFinalized):
        client.encrypt(np.ones(10))


# --------------------------------------------------------------------------- dropouts and weights


def test_dropouts_leave_the_sum():
    x = np.random.default_rng(3).uniform(-1, 1, (6, 50))
    result = secagg.aggregate(
        x, protection="ckks", dropouts={"advertise": [0], "upload": [2, 4], "unmask": [5]}
    )
    assert result.included == (1, 3, 5)  # a post-upload dropout still counted
    assert np.max(np.abs(result.total - x[[1, 3, 5]].sum(0))) <= result.max_quantization_error
    assert result.dropped == {"advertise": (0,), "upload": (2, 4), "unmask": (5,)}
    with pytest.raises(NotEnoughSurvivors):
        secagg.aggregate(x, protection="ckks", dropouts={"upload": [0, 1, 2, 3, 4]})
    with pytest.raises(ConfigError):
        secagg.aggregate(x, protection="ckks", dropouts={"lunch": [1]})


@pytest.mark.parametrize("scheme", ["ckks", "bfv"])
def test_weighted_fedavg_scale_travels_encrypted(scheme):
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (5, 4096))  # the weight slot spills into a second ciphertext
    w = np.array([10, 2000, 35, 700, 1])
    result = secagg.aggregate(x, protection="ckks", weights=w, dropouts={"upload": [1]}, scheme=scheme)
    inc = list(result.included)
    assert inc == [0, 2, 3, 4]
    exact = (w[inc, None] * x[inc]).sum(0)
    assert np.max(np.abs(result.total - exact)) <= result.max_quantization_error
    fedavg = result.total / w[inc].sum()
    assert np.max(np.abs(fedavg - exact / w[inc].sum())) < 1e-6
    # the weight sum of exactly the summed clients comes back from the decryption
    assert abs(result.parameters["weight_sum"] - w[inc].sum()) <= result.max_quantization_error


def test_weighted_upload_carries_no_plaintext_weight():
    r = Round(2, 8, weighted=True)
    sealed = r.upload(0, np.ones(8) * 0.5, weight=0.25)
    outer = decode(sealed, max_bytes=len(sealed), expect=HeCiphertexts)
    _, header = open_sealed(outer.header, {0: r.ids[0].public_bytes}.get, expect=HeUploadHeader)
    assert {f.name for f in dataclasses.fields(HeUploadHeader)} == {
        "round_id", "client_id", "fingerprint", "dim", "weighted", "n_chunks", "digest"}
    assert {f.name for f in dataclasses.fields(HeCiphertexts)} == {"header", "chunks"}
    assert header.weighted is True and len(outer.chunks) == 1
    r.server.receive(sealed)
    r.server.receive(r.upload(1, np.ones(8), weight=0.75))
    out = r.decrypt(r.server.aggregate())
    assert abs(out.weight_sum - 1.0) < 1e-6
    assert np.allclose(out.values, 0.25 * 0.5 + 0.75 * 1.0, atol=1e-6)
    with pytest.raises(InputError):
        r.client(1).encrypt(np.ones(8))  # weighted round needs a weight


def test_precompute_gives_the_same_sums():
    x = np.random.default_rng(5).uniform(-1, 1, (3, 100))
    a = aggregate_ckks(x, precompute=True)
    b = aggregate_ckks(x, precompute=False)
    assert np.max(np.abs(a.total - b.total)) <= a.max_quantization_error + b.max_quantization_error


def test_context_bytes_never_pickled():
    r = Round(2, 4)
    for blob in (r.client_ctx, r.server_ctx, r.upload(0, np.zeros(4))):
        assert b"\x80\x04\x95" not in blob[:8]  # pickle protocol 4 header
        assert blob[:1] in (b"\x96", b"\x94")  # msgpack arrays: signed envelope / wire frame


def test_chunks_swapped_under_a_valid_signed_header_are_refused():
    r = Round(2, 10)
    a = decode(r.upload(0, np.ones(10)), expect=HeCiphertexts)
    b = decode(r.upload(1, np.zeros(10)), expect=HeCiphertexts)
    spliced = encode(HeCiphertexts(a.header, b.chunks))  # client 0's signature, client 1's ciphertexts
    with pytest.raises(InvalidCiphertext):
        r.server.receive(spliced)
    assert chunks_digest(b"upload", a.chunks) != chunks_digest(b"upload", b.chunks)
    r.server.receive(encode(HeCiphertexts(a.header, a.chunks)))
    assert r.server.included == (0,)


def _uploads(r: Round, xs) -> list[bytes]:
    return [r.upload(i, x) for i, x in enumerate(xs)]


def test_key_holder_accepts_the_honest_sum():
    r = Round(3, 5000)
    xs = np.random.default_rng(8).uniform(-1, 1, (3, 5000))
    ups = _uploads(r, xs)
    for u in reversed(ups):  # the server's order of arrival does not matter
        r.server.receive(u)
    out = r.holder.decrypt(r.server.aggregate(), r.server.public_key, ups, r.keys)
    assert np.max(np.abs(out.values - xs.sum(0))) <= out.error_bound


def test_key_holder_catches_a_server_passing_off_one_update_as_a_sum():
    r = Round(2, 10)
    ups = _uploads(r, [np.full(10, 0.3), np.full(10, -0.1)])
    r.server.receive(ups[0])
    r.server._included.append(1)  # a lying server: claims client 1 is in, adds only client 0
    forged = r.server.aggregate()
    with pytest.raises(MaliciousServerDetected, match="not the sum"):
        r.holder.decrypt(forged, r.server.public_key, ups, r.keys)
    with pytest.raises(AlreadyFinalized):  # and it gets no second attempt in this round
        r.holder.decrypt(forged, r.server.public_key, ups, r.keys)


def test_key_holder_catches_a_doubled_upload():
    r = Round(2, 10)
    ups = _uploads(r, [np.full(10, 0.3), np.full(10, -0.1)])
    r.server.receive(ups[0])
    # x0 counted twice instead of x0 + x1 (not .copy(): TenSEAL segfaults copying a key-less vector)
    r.server._sum = [v + v for v in r.server._sum]
    r.server._included.append(1)
    with pytest.raises(MaliciousServerDetected):
        r.holder.decrypt(r.server.aggregate(), r.server.public_key, ups, r.keys)
    r2 = Round(2, 10)
    up0 = r2.upload(0, np.full(10, 0.3))
    r2.server.receive(up0)
    r2.server._sum = [v + v for v in r2.server._sum]
    r2.server._included.append(1)
    with pytest.raises(ReplayError):  # the same upload passed twice
        r2.holder.decrypt(r2.server.aggregate(), r2.server.public_key, [up0, up0], r2.keys)


def test_out_of_range_ciphertext_is_caught_at_decryption():
    r = Round(2, 10, value_bound=1.0)
    cheat = HeRoundConfig(r.config.round_id, 10, 2, CKKS, value_bound=1e3)  # skips its own range check
    bad = HeClient(1, cheat, r.client_ctx, r.holder.public_key, r.ids[1]).encrypt(np.full(10, 500.0))
    r.server.receive(r.upload(0, np.zeros(10)))
    r.server.receive(bad)  # the server cannot see values
    with pytest.raises(InvalidCiphertext, match="exceeds"):
        r.decrypt(r.server.aggregate())


_CTX = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40])
_CTX.global_scale = 2.0**40
_GENUINE = ts.ckks_vector(_CTX, [0.5] * 100).serialize()  # one genuine TenSEAL vector


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 4096), st.booleans())
def test_structural_check_raises_only_invalid_ciphertext_on_arbitrary_bytes(data, size, ckks):
    try:
        check_serialized_vector(data, expected_size=size, raw_bytes=CKKS.ciphertext_bytes, scale=2.0**40 if ckks else None)
    except InvalidCiphertext:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_structural_check_on_mutated_genuine_headers(data):
    genuine = _GENUINE
    pos = data.draw(st.integers(0, 80))
    value = data.draw(st.integers(0, 255))
    mutated = genuine[:pos] + bytes([value]) + genuine[pos + 1 :]
    try:
        check_serialized_vector(mutated, expected_size=100, raw_bytes=CKKS.ciphertext_bytes, scale=2.0**40)
    except InvalidCiphertext:
        pass


def test_genuine_ciphertext_passes_the_structural_check():
    check_serialized_vector(_GENUINE, expected_size=100, raw_bytes=CKKS.ciphertext_bytes, scale=2.0**40)
    with pytest.raises(InvalidCiphertext):
        check_serialized_vector(_GENUINE, expected_size=99, raw_bytes=CKKS.ciphertext_bytes, scale=2.0**40)


@pytest.mark.parametrize("kw", [{}, {"scheme": "bfv", "key_holders": 2}])
def test_benchmark_reports_the_required_figures(kw):
    from secagg.bench.ckks import run_ckks_bench

    out = run_ckks_bench(2, 5000, **kw)
    for key in ("clients", "dim", "precompute_s_per_client", "encrypt_online_s_per_client",
                "encrypt_total_s_per_client", "encrypt_oneshot_s_per_client", "server_sum_s", "keyholder_verify_s",
                "keyholder_verify_over_server_sum", "decrypt_s", "plain_sum_s", "bytes_up_per_param", "max_abs_error"):
        assert key in out
    assert out["clients"] == 2 and out["dim"] == 5000
    # the headline throughput counts the precomputation: online + offline, never online alone
    assert out["encrypt_total_s_per_client"] == out["precompute_s_per_client"] + out["encrypt_online_s_per_client"]
    assert out["encrypt_params_per_s"] == 5000 / out["encrypt_total_s_per_client"]
    assert out["plain_sum_runs"] >= 5  # a warm median, not one cold timing
    assert out["max_abs_error"] <= out["error_bound"] < 1e-6
    if not kw:
        assert 32 < out["bytes_up_per_param"] * 5000 / (2 * 4096) < 33.5  # two ciphertexts of 4096 slots


# --------------------------------------------------------------------------- split trust (BFV, n-of-n)


class SplitRound:
    """k key holders, one key-less server state per key holder, split clients."""

    def __init__(self, n: int, dim: int, k: int = 2, **kw) -> None:
        self.config = HeRoundConfig(new_round_id(), dim, n, BFV, key_holders=k, **kw)
        self.holders = [KeyHolder(self.config) for _ in range(k)]
        self.ids = [IdentityKey.generate() for _ in range(n)]
        self.keys = {i: ident.public_bytes for i, ident in enumerate(self.ids)}
        self.servers = [HeServer(self.config, h.context_for_server(), h.public_key, self.keys) for h in self.holders]
        self.ctxs = [h.context_for_clients() for h in self.holders]

    def upload(self, i: int, x) -> tuple[bytes, ...]:
        client = SplitClient(i, self.config, self.ctxs, [h.public_key for h in self.holders], self.ids[i])
        return client.encrypt(np.asarray(x, dtype=np.float64))

    def shares(self):
        """Each key holder verifies its server state's aggregate against the uploads it added."""
        return [h.decrypt_share(s.aggregate(), s.public_key, s.uploads, self.keys)
                for h, s in zip(self.holders, self.servers)]


@pytest.mark.parametrize("k", [2, 3])
def test_split_round_sums_correctly_and_each_share_is_noise(k):
    r = SplitRound(3, 5000, k)
    xs = np.random.default_rng(9).uniform(-1, 1, (3, 5000))
    for i, x in enumerate(xs):
        for server, part in zip(r.servers, r.upload(i, x)):
            server.receive(part)
    shares = r.shares()
    t = BFV.plain_modulus
    for share in shares:  # alone, a key holder sees a uniform vector modulo t, not the sum
        assert share.values.min() >= 0 and share.values.max() < t
        # 5000 uniform values: the mean is within 0.03 of 1/2 except with probability 1.7e-11
        # (Bernstein), the std within 0.02 of 1/sqrt(12) (11 standard errors); at most three
        # shares, so the false-failure rate is below 1e-9 (the former 0.02 on the mean was 2e-5)
        assert abs(share.values.mean() / t - 0.5) < 0.03
        assert abs(share.values.std() / t - 12**-0.5) < 0.02
    out = combine_shares(r.config, shares)
    assert np.max(np.abs(out.values - xs.sum(0))) <= out.error_bound < 1e-8
    with pytest.raises(ConfigError):
        combine_shares(r.config, shares[:-1])


def test_split_round_key_holder_cannot_decrypt_alone():
    r = SplitRound(2, 10)
    for i in range(2):
        for server, part in zip(r.servers, r.upload(i, np.ones(10))):
            server.receive(part)
    with pytest.raises(KeyRoleError):
        r.holders[0].decrypt(r.servers[0].aggregate(), r.servers[0].public_key, r.servers[0].uploads, r.keys)
    single = Round(2, 10, BFV)
    with pytest.raises(KeyRoleError):
        single.holder.decrypt_share(b"", single.server.public_key, [], single.keys)


def test_split_round_refuses_different_client_sets():
    r = SplitRound(3, 10)
    ups = [r.upload(i, np.full(10, 0.1 * (i + 1))) for i in range(3)]
    for i in (0, 1, 2):
        r.servers[0].receive(ups[i][0])
    for i in (0, 1):  # the server shows the second key holder a different set
        r.servers[1].receive(ups[i][1])
    shares = r.shares()
    with pytest.raises(MaliciousServerDetected):
        combine_shares(r.config, shares)


def test_split_rounds_need_bfv_and_the_share_uploads_do_not_mix():
    with pytest.raises(ConfigError, match="bfv"):
        HeRoundConfig(new_round_id(), 10, 2, CKKS, key_holders=2)
    r = SplitRound(2, 10)
    first, second = r.upload(0, np.ones(10))
    with pytest.raises(InvalidCiphertext, match="another key"):
        r.servers[0].receive(second)
    r.servers[0].receive(first)


def test_split_round_through_the_api():
    x = np.random.default_rng(10).uniform(-1, 1, (4, 300))
    result = secagg.aggregate(x, protection="ckks", scheme="bfv", key_holders=2, dropouts={"upload": [1]})
    assert result.included == (0, 2, 3)
    assert np.max(np.abs(result.total - x[[0, 2, 3]].sum(0))) <= result.max_quantization_error
    assert result.parameters["key_holders"] == 2


def test_precomputed_encryptions_of_zero_are_used_once():
    r = Round(2, 10)
    client = r.client(0)
    client.precompute()
    pool = list(client._zeros)
    first = client.encrypt_chunks(np.full(10, 0.5))
    assert client._zeros is None  # the pool is consumed, never kept for another message
    with pytest.raises(AlreadyFinalized):
        client.encrypt_chunks(np.full(10, 0.5))
    again = r.client(0)
    again.precompute()
    second = again.encrypt_chunks(np.full(10, 0.5))
    assert first != second  # fresh randomness: equal updates give unrelated ciphertexts
    assert len(pool) == len(r.config.chunk_sizes)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 4),
    dim=st.sampled_from([3, 4095, 4096]),
    scheme=st.sampled_from(["ckks", "bfv"]),
    data=st.data(),
)
def test_weighted_sum_property(n, dim, scheme, data):
    x = data.draw(arrays(np.float64, (n, dim), elements=st.floats(-1, 1, allow_subnormal=False)))
    w = np.array(data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n)), dtype=np.float64)
    result = secagg.aggregate(x, protection="ckks", weights=w, scheme=scheme)
    exact = (w[:, None] * x).sum(0)
    assert np.max(np.abs(result.total - exact)) <= result.max_quantization_error
    assert np.max(np.abs(result.total / w.sum() - exact / w.sum())) < 1e-6  # the FedAvg mean


def test_context_with_evaluation_keys_is_refused():
    r = Round(2, 10)
    r.holder._ctx.generate_galois_keys()
    p = r.config.params
    with_keys = r.holder._ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                        save_relin_keys=True)
    forged = seal(HeContext(r.config.round_id, "server", p.scheme, p.poly_modulus_degree, p.coeff_mod_bit_sizes,
                            p.scale_bits, p.plain_modulus_bits, with_keys, r.holder.fingerprint),
                  KEYHOLDER_ID, r.holder.identity)
    with pytest.raises(KeyRoleError):
        HeServer(r.config, forged, r.holder.public_key, {})


@pytest.mark.parametrize("kw", [{}, {"scheme": "bfv", "key_holders": 2}])
def test_key_holder_verification_cannot_be_switched_off(kw):
    x = np.random.default_rng(11).uniform(-1, 1, (3, 200))
    result = secagg.aggregate(x, protection="ckks", **kw)
    assert np.max(np.abs(result.total - x.sum(0))) <= result.max_quantization_error
    assert "audit" not in result.parameters
    for switch in ({"audit": False}, {"verify": False}):
        with pytest.raises(ConfigError, match="unknown option|does not take"):
            secagg.aggregate(x, protection="ckks", **switch, **kw)
