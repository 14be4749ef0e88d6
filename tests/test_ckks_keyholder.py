"""The key holder is never a decryption oracle (CKKS, BFV, split trust), and BFV range checks.

Attacks are driven against the real :class:`KeyHolder` from a lying server that holds a
valid server identity: it signs an "aggregate" made of ciphertexts it built itself, lists
every client as included, and sends it for decryption. Decrypting such a ciphertext hands
the server the round's secret key: (0, c) decrypts to c * s. The key holder must refuse
before decrypting anything, whatever the ciphertext's content.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

pytest.importorskip("tenseal")

import tenseal as ts
import tenseal.sealapi as sealapi

from secagg.ckks import HeClient, HeParams, HeServer, KeyHolder, HeRoundConfig, SplitClient, combine_shares, new_round_id
from secagg.ckks.messages import HeAggregateHeader, HeCiphertexts, chunks_digest
from secagg.ckks.params import BFV_HEADROOM_BITS
from secagg.ckks.roles import SERVER_ID
from secagg.errors import AlreadyFinalized, InvalidCiphertext, MaliciousServerDetected, ReplayError
from secagg.keys import IdentityKey
from secagg.wire import decode, encode, seal
from tests.test_ckks import _varint

CKKS = HeParams.ckks()
BFV = HeParams.bfv()


# --------------------------------------------------------------------------- a lying server's tools


def _data_prime(params: HeParams) -> int:
    """q0, the prime ciphertexts travel at (SEAL picks it deterministically from the bit sizes)."""
    return sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))[0].value()


def _seal_header(version: bytes, size: int) -> bytes:
    return struct.pack("<HB", 0xA15E, 16) + version + struct.pack("<BHQ", 0, 0, size)  # uncompressed


def forge_chunk(honest_chunk: bytes, ctx, params: HeParams, size: int, c0: np.ndarray, c1: np.ndarray) -> bytes:
    """TenSEAL vector bytes of the ciphertext (c0, c1), built by the server from scratch.

    The SEAL layout (parms_id, NTT flag, size, degree, modulus count, scale, correction
    factor, then the coefficients in a nested DynArray) is written uncompressed; the
    metadata is read from an honest ciphertext through TenSEAL's API.
    """
    load = ts.ckks_vector_from if params.scheme == "ckks" else ts.bfv_vector_from
    (ct,) = load(ctx, honest_chunk).ciphertext()
    n = params.poly_modulus_degree
    members = struct.pack("<4Q", *ct.parms_id()) + bytes([ct.is_ntt_form()])
    members += struct.pack("<QQQdQ", 2, n, 1, ct.scale, 1)
    array = struct.pack("<Q", 2 * n) + np.concatenate([c0, c1]).astype("<u8").tobytes()
    pos = honest_chunk.index(b"\x5e\xa1")  # the SEAL header inside TenSEAL's protobuf
    version = honest_chunk[pos + 3 : pos + 5]
    body = members + _seal_header(version, 16 + len(array)) + array
    blob = _seal_header(version, 16 + len(body)) + body
    out = b"\x0a" + _varint(len(_varint(size))) + _varint(size) + b"\x12" + _varint(len(blob)) + blob
    if params.scheme == "ckks":
        out += b"\x19" + struct.pack("<d", params.scale)
    return out


def forged_aggregate(config: HeRoundConfig, server: HeServer, key_fingerprint: bytes, chunks) -> bytes:
    """The server signs its own ciphertexts as the sum over every client of the round."""
    chunks = tuple(chunks)
    header = HeAggregateHeader(config.round_id, key_fingerprint, config.dim, config.weighted,
                               tuple(range(config.n_clients)), len(chunks), chunks_digest(b"aggregate", chunks))
    return encode(HeCiphertexts(seal(header, SERVER_ID, server.identity), chunks))


class Deployment:
    """k key holders, one server state per key holder, n honest clients that all uploaded."""

    def __init__(self, params: HeParams, k: int, n: int = 3, dim: int = 100, **kw) -> None:
        self.config = HeRoundConfig(new_round_id(), dim, n, params, key_holders=k, **kw)
        self.holders = [KeyHolder(self.config) for _ in range(k)]
        self.ids = [IdentityKey.generate() for _ in range(n)]
        self.keys = {i: ident.public_bytes for i, ident in enumerate(self.ids)}
        self.servers = [HeServer(self.config, h.context_for_server(), h.public_key, self.keys) for h in self.holders]
        ctxs, hkeys = [h.context_for_clients() for h in self.holders], [h.public_key for h in self.holders]
        self.x = np.random.default_rng(5).uniform(-1, 1, (n, dim))
        for i in range(n):
            if k == 1:
                parts = (HeClient(i, self.config, ctxs[0], hkeys[0], self.ids[i]).encrypt(self.x[i]),)
            else:
                parts = SplitClient(i, self.config, ctxs, hkeys, self.ids[i]).encrypt(self.x[i])
            for server, part in zip(self.servers, parts):
                server.receive(part)

    def honest_chunk(self, j: int = 0) -> bytes:
        return decode(self.servers[j].uploads[0], expect=HeCiphertexts).chunks[0]


# --------------------------------------------------------------------------- (a) server-built ciphertexts


@pytest.mark.parametrize("c1_kind", ["2^28", "-2^27", "uniform"])
def test_ckks_server_built_aggregate_is_refused_and_nothing_is_released(c1_kind):
    d = Deployment(CKKS, 1)
    holder, server = d.holders[0], d.servers[0]
    n, q0 = CKKS.poly_modulus_degree, _data_prime(CKKS)
    c1 = {
        "2^28": np.full(n, 2**28, dtype=np.uint64),  # decrypts to 2^28 * s
        "-2^27": np.full(n, q0 - 2**27, dtype=np.uint64),  # decrypts to -2^27 * s
        "uniform": np.random.default_rng(1).integers(0, q0, n, dtype=np.uint64),  # any c1 the server picks
    }[c1_kind]
    chunk = forge_chunk(d.honest_chunk(), server._ctx, CKKS, d.config.dim, np.zeros(n, np.uint64), c1)
    if c1_kind != "uniform":
        # The attack is real: the forged ciphertext passes every structural check and decrypts
        # (c0 + c1 * s) to values inside the range check, so only verification can stop it.
        leak = np.asarray(ts.ckks_vector_from(holder._ctx, chunk).decrypt())
        assert 0 < np.max(np.abs(leak)) < d.config.release_bound(d.config.n_clients)
    attack = forged_aggregate(d.config, server, holder.fingerprint, [chunk])
    with pytest.raises(MaliciousServerDetected, match="not the sum"):
        holder.decrypt(attack, server.public_key, server.uploads, d.keys)
    # nothing is released, not even the honest sum afterwards: one request per round
    with pytest.raises(AlreadyFinalized):
        holder.decrypt(server.aggregate(), server.public_key, server.uploads, d.keys)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bfv_server_built_aggregates_are_refused_by_every_key_holder(k):
    """Key holder j gets (0, floor(q/t) * 3^j): combined, the releases would spell every secret key."""
    d = Deployment(BFV, k)
    n, t, q0 = BFV.poly_modulus_degree, BFV.plain_modulus, _data_prime(BFV)
    for j, (holder, server) in enumerate(zip(d.holders, d.servers)):
        c1 = np.zeros(n, dtype=np.uint64)
        c1[0] = (q0 // t) * 3**j
        chunk = forge_chunk(d.honest_chunk(j), server._ctx, BFV, sum(d.config.chunk_sizes),
                            np.zeros(n, np.uint64), c1)
        # decrypting it gives 3^j * s: the secret key itself
        assert len(ts.bfv_vector_from(holder._ctx, chunk).decrypt()) == d.config.chunk_sizes[0]
        attack = forged_aggregate(d.config, server, holder.fingerprint, [chunk])
        with pytest.raises(MaliciousServerDetected):
            if k == 1:
                holder.decrypt(attack, server.public_key, server.uploads, d.keys)
            else:
                holder.decrypt_share(attack, server.public_key, server.uploads, d.keys)
        with pytest.raises(AlreadyFinalized):
            holder.verify(server.aggregate(), server.public_key, server.uploads, d.keys)


def test_a_server_cannot_pass_off_uploads_it_signed_itself_or_another_rounds():
    d = Deployment(CKKS, 1)
    holder, server = d.holders[0], d.servers[0]
    impostor = {i: server.identity.public_bytes for i in d.keys}  # the server's key in place of a client's
    with pytest.raises(InvalidCiphertext, match="signed by a registered client"):
        holder.decrypt(server.aggregate(), server.public_key, server.uploads, impostor)
    other = Deployment(CKKS, 1)
    with pytest.raises((InvalidCiphertext, ReplayError)):  # uploads of another round, under another key
        other.holders[0].decrypt(other.servers[0].aggregate(), other.servers[0].public_key,
                                 d.servers[0].uploads, d.keys)


def test_verified_sum_is_released_once_and_only_by_its_key_holder():
    d = Deployment(CKKS, 1)
    holder, server = d.holders[0], d.servers[0]
    verified = holder.verify(server.aggregate(), server.public_key, server.uploads, d.keys)
    out = holder.release(verified)
    assert np.max(np.abs(out.values - d.x.sum(0))) <= out.error_bound
    with pytest.raises(Exception, match="once"):
        holder.release(verified)
    other = Deployment(CKKS, 1)
    with pytest.raises(Exception, match="its own verify"):
        other.holders[0].release(verified)


# --------------------------------------------------------------------------- (c) BFV out of range, corrupted


def _round_with_cheater(values_of_cheater: np.ndarray, mutate=None, params: HeParams = BFV):
    """Client 0 honest (zeros), client 1 skips its own range check (or corrupts its bytes)."""
    config = HeRoundConfig(new_round_id(), 10, 2, params, value_bound=1.0)
    holder = KeyHolder(config)
    ids = [IdentityKey.generate() for _ in range(2)]
    keys = {i: k.public_bytes for i, k in enumerate(ids)}
    server = HeServer(config, holder.context_for_server(), holder.public_key, keys)
    cctx = holder.context_for_clients()
    server.receive(HeClient(0, config, cctx, holder.public_key, ids[0]).encrypt(np.zeros(10)))
    cheat = HeClient(1, config, cctx, holder.public_key, ids[1])
    if params.scheme == "bfv":
        values_of_cheater = config.pack(np.rint(values_of_cheater * config.quantization).astype(np.int64))
    chunks = cheat.encrypt_values(values_of_cheater)  # its own encoding, no range check
    if mutate is not None:
        chunks = tuple(mutate(bytearray(c)) for c in chunks)
    server.receive(cheat.seal_upload(chunks))  # signed: the server cannot tell
    return config, lambda: holder.decrypt(server.aggregate(), server.public_key, server.uploads, keys)


def test_bfv_out_of_range_input_is_refused_at_decryption():
    config, decrypt = _round_with_cheater(np.full(10, 9.0))  # 9.0 with bound 1
    with pytest.raises(InvalidCiphertext, match="exceeds"):
        decrypt()
    # anything beyond n x bound, up to 2^headroom x n x bound, cannot wrap back into range
    config, decrypt = _round_with_cheater(np.full(10, 2.0**BFV_HEADROOM_BITS * 2 - 1.5))
    with pytest.raises(InvalidCiphertext, match="exceeds"):
        decrypt()


@pytest.mark.parametrize("params", [BFV, CKKS], ids=["bfv", "ckks"])
def test_malicious_client_can_shift_the_sum_only_within_n_times_bound(params):
    """The documented residual: a contribution is unchecked on its own; the sum must stay in +-n*B."""
    _, decrypt = _round_with_cheater(np.full(10, 1.9), params=params)  # beyond its own bound, sum <= 2
    out = decrypt()
    assert np.allclose(out.values, 1.9, atol=1e-6)
    _, decrypt = _round_with_cheater(np.full(10, -2.0 - 1e-4), params=params)
    with pytest.raises(InvalidCiphertext, match="exceeds"):
        decrypt()


def test_bfv_re_signed_bit_flips_are_refused_at_decryption():
    """A client flips one bit of its own coefficients and signs: never released with an error."""
    rng = np.random.default_rng(2024)
    outcomes = {"refused": 0, "harmless": 0}
    for _ in range(12):
        def flip(c, pos=None):
            lo = len(c) // 4  # inside the zstd-compressed coefficients, past all headers
            pos = int(rng.integers(lo, len(c) - 1))
            c[pos] ^= 1 << int(rng.integers(0, 8))
            return bytes(c)

        _, decrypt = _round_with_cheater(np.zeros(10), flip)
        try:
            out = decrypt()
        except InvalidCiphertext:
            outcomes["refused"] += 1
            continue
        assert np.max(np.abs(out.values)) <= out.error_bound  # a flip below the noise changes nothing
        outcomes["harmless"] += 1
    assert outcomes["refused"] >= 1


def test_bfv_check_slots_catch_a_corrupted_plaintext_polynomial():
    """Changing one coefficient of the plaintext polynomial by d changes every slot, check slots included."""
    config = HeRoundConfig(new_round_id(), 10, 2, BFV, value_bound=1.0)
    assert config.check_slots == 2 and config.chunk_sizes == (12,)
    from secagg.ckks.roles import _bfv_payload

    t = BFV.plain_modulus
    honest = config.pack(np.arange(10, dtype=np.int64)) % t
    np.testing.assert_array_equal(_bfv_payload(config, honest), np.arange(10))
    corrupted = honest.copy()
    corrupted[-1] = (corrupted[-1] + 1) % t
    with pytest.raises(InvalidCiphertext, match="check slots"):
        _bfv_payload(config, corrupted)


def test_split_bfv_out_of_range_is_refused_after_combining():
    config = HeRoundConfig(new_round_id(), 10, 2, BFV, value_bound=1.0, key_holders=2)
    holders = [KeyHolder(config) for _ in range(2)]
    ids = [IdentityKey.generate() for _ in range(2)]
    keys = {i: k.public_bytes for i, k in enumerate(ids)}
    servers = [HeServer(config, h.context_for_server(), h.public_key, keys) for h in holders]
    ctxs, hkeys = [h.context_for_clients() for h in holders], [h.public_key for h in holders]
    honest = SplitClient(0, config, ctxs, hkeys, ids[0]).encrypt(np.zeros(10))
    cheat = SplitClient(1, config, ctxs, hkeys, ids[1])
    from secagg.ckks.roles import additive_shares

    packed = config.pack(np.rint(np.full(10, 9.0) * config.quantization).astype(np.int64))
    shares = additive_shares(packed, BFV.plain_modulus, 2)
    bad = cheat.seal_uploads([p.encrypt_values(s) for p, s in zip(cheat.parts, shares)])
    for server, a, b in zip(servers, honest, bad):
        server.receive(a)
        server.receive(b)
    parts = [h.decrypt_share(s.aggregate(), s.public_key, s.uploads, keys) for h, s in zip(holders, servers)]
    with pytest.raises(InvalidCiphertext, match="exceeds"):
        combine_shares(config, parts)


# --------------------------------------------------------------------------- the same over the transport mode


def test_transport_key_holder_verifies_uploads_and_refuses_a_server_built_aggregate(pki):
    """The gRPC key holder (its CkksClientRound) gets the uploads with the aggregate and checks them."""
    from federation.transport.certs import Credentials
    from secagg import wire
    from secagg.ckks.messages import (
        CkksContextRequest,
        CkksContexts,
        CkksDecryptRequest,
        CkksDirectory,
        CkksRelease,
    )
    from secagg.ckks.mode import CkksClientRound
    from secagg.rounds import ClientContext

    server_creds = Credentials.load(pki / "ca" / "server")
    creds = {cid: Credentials.load(pki / "ca" / f"client-{cid}") for cid in (1, 2, 3)}  # 1 is a key holder
    dim = 50
    directory = wire.encode(CkksDirectory(
        round=0, round_id=new_round_id(), dim=dim, scheme="ckks", value_bound=1.0, min_clients=2,
        participants=(1, 2, 3), keyholder=1, server_certificate=server_creds.cert_pem,
        certificates={c: cr.cert_pem for c, cr in creds.items()}))
    xs = {c: np.full(dim, 0.1 * c) for c in creds}

    def session(c):
        return CkksClientRound(ClientContext(0, c, creds[c].identity, xs[c], creds[c].verify_peer, keyholder=1),
                               directory)

    def run(make_request):
        rounds = {c: session(c) for c in creds}
        _, contexts = wire.open_sealed(rounds[1].receive(wire.encode(CkksContextRequest(round=0))),
                                       {1: creds[1].identity.public_bytes}.get, expect=CkksContexts)
        config = rounds[1].config
        server = HeServer(config, contexts.for_server, creds[1].identity.public_bytes,
                          {i: creds[c].identity.public_bytes for i, c in enumerate((1, 2, 3))},
                          identity=server_creds.identity)
        for c in (1, 2):  # client 3 drops before uploading
            server.receive(rounds[c].receive(contexts.for_clients))
        return rounds[1].receive(wire.encode(make_request(config, server, rounds[1].holder)))

    sealed = run(lambda cfg, server, holder: CkksDecryptRequest(0, 0, 1, server.aggregate(), server.uploads))
    _, release = wire.open_sealed(sealed, {1: creds[1].identity.public_bytes}.get, expect=CkksRelease)
    assert release.included == (0, 1)
    np.testing.assert_allclose(np.frombuffer(release.values, "<f8"), xs[1] + xs[2], atol=1e-6)

    def forged(cfg, server, holder):
        n = CKKS.poly_modulus_degree
        honest = decode(server.uploads[0], expect=HeCiphertexts).chunks[0]
        chunk = forge_chunk(honest, server._ctx, CKKS, dim, np.zeros(n, np.uint64), np.full(n, 2**28, np.uint64))
        return CkksDecryptRequest(0, 0, 1, forged_aggregate(cfg, server, holder.fingerprint, [chunk]), server.uploads)

    with pytest.raises(MaliciousServerDetected):
        run(forged)
    with pytest.raises(MaliciousServerDetected):  # the real sum, but without the uploads to check it
        run(lambda cfg, server, holder: CkksDecryptRequest(0, 0, 1, server.aggregate(), server.uploads[:1]))


def test_aggregate_names_the_key_holders():
    import secagg

    x = np.random.default_rng(3).uniform(-1, 1, (3, 40))
    ids = [IdentityKey.generate(), IdentityKey.generate()]
    result = secagg.aggregate(x, protection="ckks", scheme="bfv", key_holders=2, keyholders=ids)
    assert np.max(np.abs(result.total - x.sum(0))) <= result.max_quantization_error
    from secagg.errors import ConfigError

    with pytest.raises(ConfigError, match="keyholders lists 1"):
        secagg.aggregate(x, protection="ckks", scheme="bfv", key_holders=2, keyholders=ids[:1])
