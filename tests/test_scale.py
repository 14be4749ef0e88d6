"""Per-round work that is done once rather than once per message or per party.

Each test checks that a shortcut gives exactly what the long way gives, and that it does
not outlive the data it serves (no wall-clock thresholds: the timings live in
benchmarks/bench_scale.py).
"""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import encoding, prg
from secagg.encoding import FixedPointCodec, check_vector
from secagg.errors import InputError, InvalidPublicKey, InvalidShare, InvalidSignature, OverflowRisk
from secagg.graph import sparse_graph
from secagg.keys import IdentityKey, KeyPair, agree, check_public_key, verify_signature
from secagg.protocol import client as client_module
from secagg.protocol.common import Stage, graph_of
from tests.protocol_harness import make_round, run_until, step


def test_the_graph_is_built_once_per_configuration_and_matches_a_fresh_build():
    session, _ = make_round(n=12, graph="sparse", degree=8)
    run_until(session, Stage.MASKED_INPUT)
    config, seed = session.config, session.server._digest
    assert graph_of(config, seed) is graph_of(config, seed) is session.server.graph
    fresh = sparse_graph(config.clients, degree=config.degree, threshold=config.threshold, seed=seed)
    assert all(graph_of(config, seed).neighbours(c) == fresh.neighbours(c) for c in config.clients)
    other, _ = make_round(n=12, graph="sparse", degree=8)  # a new round has new adverts, so a new seed
    run_until(other, Stage.MASKED_INPUT)
    assert other.server._digest != seed
    assert graph_of(other.config, other.server._digest) is not graph_of(config, seed)


def test_each_share_key_is_agreed_once_and_forgotten_once_shares_are_in(monkeypatch):
    calls = []
    real = client_module.agree
    monkeypatch.setattr(client_module, "agree", lambda *a, **k: calls.append(k["context"]) or real(*a, **k))
    session, updates = make_round(n=5)
    outgoing = run_until(session, Stage.MASKED_INPUT)  # keys agreed to encrypt the shares
    assert len(calls) == len(set(calls)) * 2 == 5 * 4  # both ends of a pair use the same context
    assert all(len(c._share_keys) == 4 for c in session.clients.values())
    outgoing = step(session, outgoing)  # shares decrypted with the same keys, then forgotten
    assert len(calls) == 5 * 4
    assert all(not c._share_keys for c in session.clients.values())
    outgoing = step(session, step(session, outgoing))
    assert outgoing == {}
    assert np.allclose(session.server.result, updates.sum(axis=0), atol=5 * session.server._codec.resolution)


def test_cached_public_keys_still_refuse_bad_keys_and_bad_signatures():
    identity = IdentityKey.generate()
    signature = identity.sign(b"payload")
    for _ in range(2):  # the second pass is served from the cache
        verify_signature(identity.public_bytes, signature, b"payload")
        with pytest.raises(InvalidSignature):
            verify_signature(identity.public_bytes, signature, b"payloaD")
        with pytest.raises(InvalidSignature):
            verify_signature(identity.public_bytes[:31], signature, b"payload")
    mine, peer = KeyPair.generate(), KeyPair.generate()
    first = agree(mine.private, peer.public_bytes, label=b"l", context=b"c")
    assert agree(mine.private, bytearray(peer.public_bytes), label=b"l", context=b"c") == first
    assert agree(peer.private, mine.public_bytes, label=b"l", context=b"c") == first
    with pytest.raises(InvalidShare):
        agree(mine.private, bytes(32), label=b"l", context=b"c")  # the all-zero (low-order) point
    for _ in range(2):  # the probe shares the parsed-key cache; a low-order key is refused every time
        check_public_key(bytearray(peer.public_bytes))
        with pytest.raises(InvalidPublicKey):
            check_public_key(bytes(32))


def _probe_refuses(raw: bytes) -> bool:
    """The long way: does an exchange with a fresh key refuse ``raw`` (all-zero secret)?"""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return True
    return False


def test_the_low_order_list_refuses_exactly_the_keys_an_exchange_refuses():
    from secagg.keys import _LOW_ORDER_U, _P25519

    # Every listed point in every encoding X25519 accepts (top bit set or not, u or u + p).
    encodings = [(u + extra) | top for u in _LOW_ORDER_U for extra in (0, _P25519) for top in (0, 1 << 255)
                 if u + extra < 1 << 255]
    assert len(encodings) == 14  # 5 points, 2 of them (0, 1) also encodable as u + p; 2 top bits each
    # Many other keys: the smallest and largest u, every u + p encoding, fresh keys.
    others = [u for u in range(2, 300) if u not in _LOW_ORDER_U] + [_P25519 - u for u in range(2, 300)]
    others += [_P25519 + u for u in range(2, 19)] + [int.from_bytes(KeyPair.generate().public_bytes, "little")
                                                    for _ in range(200)]
    for value in encodings + others:
        raw = value.to_bytes(32, "little")
        assert _probe_refuses(raw) is (value in encodings)
        if value in encodings:
            with pytest.raises(InvalidPublicKey):
                check_public_key(raw)
        else:
            check_public_key(raw)
    with pytest.raises(InvalidPublicKey):
        check_public_key(bytes(31))


def test_a_remembered_signature_is_only_ever_the_exact_one_that_verified():
    from secagg import keys

    identity, other = IdentityKey.generate(), IdentityKey.generate()
    data = b"consistency payload" * 100
    signature = identity.sign(data)
    verify_signature(identity.public_bytes, signature, data)
    assert (identity.public_bytes, signature, hashlib.sha256(data).digest()) in keys._VERIFIED
    for key, sig, message in [(identity.public_bytes, signature, data + b"x"),  # other bytes
                              (other.public_bytes, signature, data),  # other key
                              (identity.public_bytes, identity.sign(b"other"), data)]:  # other signature
        for _ in range(2):  # a failure is never remembered: refused every time
            with pytest.raises(InvalidSignature):
                verify_signature(key, sig, message)
    verify_signature(bytearray(identity.public_bytes), bytearray(signature), memoryview(data))
    # Bounded: once full, each new signature pushes out the oldest one.
    keys._VERIFIED.clear()
    keys._VERIFIED.update(((b"k", b"s", i.to_bytes(32, "big")), None) for i in range(keys.VERIFIED_SIGNATURES_KEPT))
    verify_signature(identity.public_bytes, signature, data)
    assert len(keys._VERIFIED) == keys.VERIFIED_SIGNATURES_KEPT
    assert (b"k", b"s", bytes(32)) not in keys._VERIFIED
    keys._VERIFIED.clear()


# -- large vectors: views instead of copies, chunks instead of whole-vector temporaries ----

@settings(max_examples=100, deadline=None)
@given(bits=st.integers(8, 32), data=st.data())
def test_int32_view_decode_equals_the_int64_centred_lift(bits, data):
    codec = FixedPointCodec(clip=1.0, scale=3.0, bits=bits)
    values = data.draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=50))
    residues = np.array(values, dtype=np.uint32)
    r = residues.astype(np.int64) & (codec.modulus - 1)  # the reference: int64 centred lift
    reference = np.where(r >= codec.modulus >> 1, r - codec.modulus, r).astype(np.float64) / codec.scale
    np.testing.assert_array_equal(codec.decode_sum(residues), reference)
    np.testing.assert_array_equal(codec.decode_sum(residues.astype(np.int64)), reference)
    np.testing.assert_array_equal(codec.decode_sum(list(values)), reference)


@pytest.mark.parametrize("clip_mode", ["l2", "coordinate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_encoding_equals_encoding_in_one_pass(monkeypatch, clip_mode, dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 1001).astype(dtype)  # benchmark-style data, not secret
    noise = rng.integers(-20, 20, x.shape[0])
    codec = FixedPointCodec.for_clients(clip=4.0, max_clients=8, clip_mode=clip_mode, bits=24, headroom=1.0)
    seed = bytes(range(32))
    whole = codec.encode(x, rounding_seed=seed, integer_noise=noise)
    monkeypatch.setattr(encoding, "ENCODE_BLOCK", 8)
    monkeypatch.setattr(encoding, "ENCODE_CHUNK", 8)  # the noise check's chunks
    np.testing.assert_array_equal(codec.encode(x, rounding_seed=seed, integer_noise=noise), whole)
    bad = noise.copy()
    bad[-1] = 10**9  # beyond the headroom, in the last chunk
    with pytest.raises(OverflowRisk):
        codec.encode(x, rounding_seed=seed, integer_noise=bad)


def test_prg_streams_read_at_an_offset_are_slices_of_the_whole_stream():
    seed = bytes(32)
    whole = prg.expand_uint32(seed, 3 * prg.CHUNK_ELEMENTS + 5)
    np.testing.assert_array_equal(prg.expand_uint32(seed, 9, offset=prg.CHUNK_ELEMENTS - 4),
                                  whole[prg.CHUNK_ELEMENTS - 4:prg.CHUNK_ELEMENTS + 5])
    words = prg.expand_uint64(seed, 100, label=b"x")
    np.testing.assert_array_equal(prg.expand_uint64(seed, 10, label=b"x", offset=40), words[40:50])
    acc = prg.MaskAccumulator(whole.shape[0])
    acc.add(seed)
    np.testing.assert_array_equal(acc.value, whole)


def test_a_float32_update_is_kept_without_a_copy_and_masked_in_place():
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    assert check_vector(x) is x
    assert check_vector(x.astype(np.float64)).dtype == np.float64
    assert check_vector([1, 2, 3]).dtype == np.float64
    with pytest.raises(InputError, match="1 NaN"):
        check_vector(np.array([1.0, np.nan], dtype=np.float32))
    start = np.arange(8, dtype=np.uint32)
    acc = prg.MaskAccumulator(8, initial=start, copy=False)
    acc.add(bytes(32))
    assert acc.value is start
    kept = np.arange(8, dtype=np.uint32)
    prg.MaskAccumulator(8, initial=kept).add(bytes(32))
    np.testing.assert_array_equal(kept, np.arange(8))


def test_the_largest_update_a_client_accepts_fits_the_masked_input_field():
    from secagg import wire
    from secagg.protocol.client import ClientPolicy
    from secagg.protocol.messages import MaskedInput

    assert MaskedInput.FIELD_LIMITS["vector"] == 4 * ClientPolicy().max_dim > wire.MAX_FIELD_BYTES


# -- benchmark accounting -------------------------------------------------------------------

def test_warm_median_drops_the_cold_call_and_takes_the_median():
    from secagg.bench.timing import warm_median

    calls = []
    warm_median(lambda: calls.append(1), runs=4)
    assert len(calls) == 5


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_masking_bench_counts_the_keystream_each_side_needs_and_the_upload_checks(graph):
    from secagg.bench.masking import run_masking_bench

    n, d = (12, 64) if graph == "complete" else (40, 64)
    row = run_masking_bench(clients=n, dim=d, dropout=0.1, graph=graph)
    lost = round(0.1 * n)
    kept = n - lost
    assert row["included"] == kept
    rate = row["aes256_ctr_bytes_per_s"]
    server_masks = round(row["server_unmask_keystream_limit_s"] * rate / (4 * d))
    client_masks = row["client_mask_keystream_limit_s"] * rate / (4 * d)
    # The CPU view prices the same keystream at the keystream's CPU rate, measured in the same run.
    cpu_limit = row["client_mask_cpu_s"] / row["client_mask_cpu_over_keystream_limit"]
    assert cpu_limit * row["aes256_ctr_bytes_per_cpu_s"] / (4 * d) == pytest.approx(client_masks)
    assert row["client_mask_cpu_s"] > 0
    if row["graph"] == "complete":  # a self mask per survivor, a pairwise mask per (lost, survivor)
        assert server_masks == kept + lost * kept
        assert round(client_masks) == n + 2  # self mask, n - 1 pairwise, 2 rounding words
    else:
        k = row["degree"]
        assert kept + lost * (k - lost + 1) <= server_masks <= kept + lost * k
        assert k - lost + 3 <= client_masks <= k + 3
    # The floor adds one agreement per pairwise mask: the server's rebuilt ones, a client's own.
    agreements = (row["server_unmask_floor_s"] - row["server_unmask_keystream_limit_s"]) / row["agreement_s"]
    assert round(agreements) == server_masks - kept
    client_agreements = (row["client_mask_floor_s"] - row["client_mask_keystream_limit_s"]) / row["agreement_s"]
    assert client_agreements == pytest.approx(client_masks - 3, abs=1e-3)  # a mean over clients: not whole
    assert row["server_upload_check_s"] > 0
    assert row["server_total_s"] >= row["server_unmask_s"] + row["server_upload_check_s"]
    assert row["max_abs_error"] <= row["quantization_error_bound"]


def test_a_round_with_mask_threads_unmasks_exactly_like_the_serial_one(monkeypatch):
    from secagg.protocol.simulate import InMemoryRound

    monkeypatch.setattr(prg, "MIN_ELEMENTS_PER_WORKER", 256)  # so a 2,000-entry vector really is split
    updates = np.random.default_rng(1).uniform(-1, 1, (6, 2000))  # test data, not secret
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=6, clip_mode="coordinate")
    sums = []
    for workers in (1, 2):
        session = InMemoryRound(updates, codec, seed=7, workers=workers)
        session.run({Stage.MASKED_INPUT.value: [2]})  # client 2's masks are rebuilt by the server
        sums.append(session.server.result)
    # Same inputs and rounding seed, fresh keys each round: every mask cancels, so the two sums
    # are the same bits, and equal the plain sum of the included updates to the encoding's error.
    np.testing.assert_array_equal(sums[0], sums[1])
    included = [0, 2, 3, 4, 5]
    assert np.max(np.abs(sums[1] - updates[included].sum(axis=0))) <= codec.sum_error_bound(5)


def test_a_key_directory_is_opened_once_per_process_and_any_difference_is_checked_in_full(monkeypatch):
    from secagg import wire
    from secagg.errors import MaliciousServerDetected
    from secagg.protocol.messages import AdvertiseKeys, KeyDirectory
    from tests.protocol_harness import server_seal

    opened = []
    real_open = wire.open_sealed

    def counting_open(data, key_of, **kwargs):
        if kwargs.get("expect") is AdvertiseKeys:
            opened.append(data)
        return real_open(data, key_of, **kwargs)

    monkeypatch.setattr(wire, "open_sealed", counting_open)
    session, _ = make_round(n=8, graph="sparse", degree=6)
    outgoing = step(session, session.server.start())
    _, directory = real_open(outgoing[1], lambda p: session.identities[p])
    for c in (1, 2, 3):  # the same directory: its 8 adverts are opened by the first client only
        session.clients[c].receive(outgoing[c])
    assert len(opened) == 8
    assert session.clients[2]._digest == session.clients[1]._digest == session.server._digest

    # One advert signed by another key: refused, though the other adverts were seen before.
    forged = dict(directory.adverts)
    forged[5] = wire.seal(AdvertiseKeys(directory.round_id, 5, KeyPair.generate().public_bytes,
                                        KeyPair.generate().public_bytes), 5, IdentityKey.generate())
    with pytest.raises(InvalidSignature):
        session.clients[4].receive(server_seal(session, KeyDirectory(directory.round_id, forged)))
    # The very same directory, but this client knows client 6 by another identity key: refused.
    session.clients[6]._identities[5] = IdentityKey.generate().public_bytes
    with pytest.raises(InvalidSignature):
        session.clients[6].receive(outgoing[6])
    # A low-order key, properly signed by its client: refused as the server's doing.
    low = dict(directory.adverts)
    low[3] = wire.seal(AdvertiseKeys(directory.round_id, 3, bytes(32), KeyPair.generate().public_bytes), 3,
                       session.clients[3]._identity)
    with pytest.raises(MaliciousServerDetected, match="low-order"):
        session.clients[7].receive(server_seal(session, KeyDirectory(directory.round_id, low)))
    # The honest directory still opens for the last client, from the remembered result.
    before = len(opened)
    session.clients[8].receive(outgoing[8])
    assert len(opened) == before and session.clients[8]._digest == session.server._digest
