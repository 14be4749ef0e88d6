import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import wire
from secagg.errors import InvalidSignature, SecAggError, WireError
from secagg.keys import IdentityKey
from secagg.protocol.messages import ConsistencyRequest, EncryptedShares, MaskedInput

ROUND = bytes(16)
KEY = IdentityKey.generate()


def lookup(party):
    return KEY.public_bytes if party == 3 else None


def test_round_trip_of_a_signed_message():
    msg = EncryptedShares(ROUND, 3, {4: b"abc", 7: b"def"}, bytes(32))
    sender, decoded = wire.open_sealed(wire.seal(msg, 3, KEY), lookup)
    assert (sender, decoded) == (3, msg)


def test_unsigned_message_is_refused_where_a_signature_is_required():
    with pytest.raises(InvalidSignature, match="not signed"):
        wire.open_sealed(wire.encode(MaskedInput(ROUND, 3, b"")), lookup)


def test_unknown_sender_and_bad_signature_are_refused():
    sealed = wire.seal(MaskedInput(ROUND, 3, b"x"), 3, KEY)
    with pytest.raises(InvalidSignature, match="unknown party"):
        wire.open_sealed(sealed, lambda party: None)
    forged = wire.seal(MaskedInput(ROUND, 3, b"x"), 3, IdentityKey.generate())
    with pytest.raises(InvalidSignature):
        wire.open_sealed(forged, lookup)


def test_oversized_message_is_refused_before_parsing():
    sealed = wire.seal(MaskedInput(ROUND, 3, bytes(10_000)), 3, KEY)
    with pytest.raises(WireError, match="exceeds"):
        wire.open_sealed(sealed, lookup, max_bytes=1000)


def test_schema_violations_are_wire_errors():
    def frame(type_name, body, version=wire.WIRE_VERSION, magic=wire.MAGIC):
        return msgpack.packb([magic, version, type_name, body], use_bin_type=True)

    good = {"round_id": ROUND, "survivors": [1, 2]}
    assert wire.decode(frame("masking.consistency_request", good)) == ConsistencyRequest(ROUND, (1, 2))
    cases = [
        (frame("masking.consistency_request", good, version=99), "version"),
        (frame("masking.consistency_request", good, magic="other"), "magic"),
        (frame("nope", good), "unknown message type"),
        (frame("masking.consistency_request", {"round_id": ROUND}), "schema mismatch"),
        (frame("masking.consistency_request", good | {"extra": 1}), "schema mismatch"),
        (frame("masking.consistency_request", {"round_id": ROUND, "survivors": ["1"]}), "expected int"),
        (frame("masking.consistency_request", {"round_id": ROUND, "survivors": [1, 1]}), "duplicate"),
        (frame("masking.consistency_request", {"round_id": b"short", "survivors": [1]}), "round_id"),
        (b"\xc1garbage", "malformed"),
    ]
    for data, needle in cases:
        with pytest.raises(WireError, match=needle):
            wire.decode(data)


def test_expect_rejects_another_type():
    data = wire.encode(ConsistencyRequest(ROUND, (1,)))
    with pytest.raises(WireError, match="expected"):
        wire.decode(data, expect=MaskedInput)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_typed_errors(data):
    for attempt in (lambda: wire.decode(data), lambda: wire.open_sealed(data, lookup)):
        try:
            attempt()
        except SecAggError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 7))
def test_bit_flips_in_a_sealed_message_are_always_detected(position, bit):
    sealed = bytearray(wire.seal(EncryptedShares(ROUND, 3, {4: b"secret share"}, bytes(32)), 3, KEY))
    sealed[position % len(sealed)] ^= 1 << bit
    with pytest.raises(SecAggError):
        wire.open_sealed(bytes(sealed), lookup)


def test_a_message_schema_is_resolved_once_per_class(monkeypatch):
    # The per-class schema cache: decoding many messages of one type resolves its type
    # hints once, and the cached schema still rejects what the fresh one would.
    import typing

    calls = []
    real = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda cls: calls.append(cls) or real(cls))
    wire._schema.cache_clear()
    data = wire.encode(ConsistencyRequest(ROUND, (1, 2, 3)))
    for _ in range(5):
        assert wire.decode(data, expect=ConsistencyRequest).survivors == (1, 2, 3)
    assert calls == [ConsistencyRequest]
    names, fields = wire._schema(ConsistencyRequest)
    assert names == {"round_id", "survivors"}
    hints = real(ConsistencyRequest)
    assert [(name, hint) for name, hint, _ in fields] == [(name, hints[name]) for name in ("round_id", "survivors")]
    bad = msgpack.packb([wire.MAGIC, wire.WIRE_VERSION, ConsistencyRequest.TYPE,
                         {"round_id": ROUND, "survivors": ["1"]}], use_bin_type=True)
    with pytest.raises(WireError, match="survivors"):
        wire.decode(bad)
    wire._schema.cache_clear()


# --------------------------------------------------------------------------- decoding bombs
#
# One msgpack byte (0x90) is an empty array, and msgpack builds a Python list for each:
# ~64 bytes of memory per byte received. Nested arrays are refused from the raw bytes,
# wherever the schema has no container, before msgpack allocates anything.


def _empty_arrays(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n  # array32 of n empty arrays


def _tree(depth: int) -> bytes:
    return b"\x9f" + _tree(depth - 1) * 15 if depth else b"\x90"  # fanout 15


def _decode_peak(call) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    except SecAggError:
        pass
    else:
        raise AssertionError("the bomb was accepted")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _masked_input_frame(vector_field: bytes) -> bytes:
    head = msgpack.packb([wire.MAGIC, wire.WIRE_VERSION, MaskedInput.TYPE], use_bin_type=True)
    body = msgpack.packb({"round_id": ROUND, "client": 3}, use_bin_type=True)
    body = bytes([body[0] + 1]) + body[1:] + msgpack.packb("vector") + vector_field  # fixmap of 3
    return b"\x94" + head[1:] + body


@pytest.mark.parametrize("n", [1 << 20, 1 << 16])
def test_nested_empty_arrays_are_refused_before_allocation(n):
    bomb = _masked_input_frame(_empty_arrays(n))
    with pytest.raises(WireError, match="vector: expected a single value, got a nested array"):
        wire.decode(bomb)
    # without the shape check msgpack alone holds ~64 bytes per input byte (64 MiB for 1 MiB)
    assert _decode_peak(lambda: wire.decode(bomb)) < 3 * len(bomb) + (1 << 20)


def test_a_tree_of_small_arrays_in_a_signed_envelope_is_refused():
    tree = _tree(5)  # 15^5 = 759,375 empty arrays in 813,616 bytes, no array longer than 15
    envelope = msgpack.packb([wire.MAGIC, wire.WIRE_VERSION, "signed"], use_bin_type=True)
    bomb = b"\x96" + envelope[1:] + tree + msgpack.packb(b"p") + msgpack.packb(b"s")
    with pytest.raises(WireError, match="sender: expected a single value"):
        wire.unverified_envelope(bomb)
    assert _decode_peak(lambda: wire.open_sealed(bomb, lookup)) < 3 * len(bomb) + (1 << 20)


def test_deep_nesting_is_refused():
    bomb = _masked_input_frame(b"\x91" * 100_000 + b"\x90")
    with pytest.raises(WireError, match="nested array"):
        wire.decode(bomb)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(1, 1 << 19), min_size=1, max_size=8),
       st.dictionaries(st.integers(4, 99), st.binary(max_size=40)))
def test_shape_check_accepts_every_well_formed_message(survivors, ciphertexts):
    messages = (
        ConsistencyRequest(ROUND, tuple(sorted(survivors))),
        EncryptedShares(ROUND, 3, ciphertexts, bytes(32)),
        MaskedInput(ROUND, 3, bytes(len(survivors))),
    )
    for msg in messages:
        assert wire.decode(wire.encode(msg)) == msg
        assert wire.open_sealed(wire.seal(msg, 3, KEY), lookup) == (3, msg)


def test_a_seal_signs_the_payload_digest_so_any_change_to_a_large_payload_is_refused():
    vector = bytes(range(256)) * 4096  # 1 MiB masked vector
    sealed = wire.seal(MaskedInput(ROUND, 3, vector), 3, KEY)
    sender, msg = wire.open_sealed(sealed, lookup)
    assert (sender, msg.vector) == (3, vector)
    _, _, _, _, payload, signature = msgpack.unpackb(sealed, raw=False)
    other_key = IdentityKey.generate()
    for tampered in (payload[:-1] + bytes([payload[-1] ^ 1]), payload[: len(payload) // 2] + payload[len(payload) // 2:][::-1]):
        forged = msgpack.packb([wire.MAGIC, wire.WIRE_VERSION, "signed", 3, tampered, signature], use_bin_type=True)
        with pytest.raises(InvalidSignature):
            wire.open_sealed(forged, lookup)
    # The signature is bound to the sender id: replaying it under another id fails.
    resent = msgpack.packb([wire.MAGIC, wire.WIRE_VERSION, "signed", 4, payload, signature], use_bin_type=True)
    with pytest.raises(InvalidSignature):
        wire.open_sealed(resent, lambda party: KEY.public_bytes if party == 4 else None)
    # And to the signer's key.
    with pytest.raises(InvalidSignature):
        wire.open_sealed(sealed, lambda party: other_key.public_bytes)


_ITEMS = st.one_of(st.integers(-5, 5), st.binary(max_size=6), st.text(max_size=2), st.none(), st.booleans())


@settings(max_examples=100, deadline=None)
@given(hint=st.sampled_from([tuple[int, ...], dict[int, bytes]]),
       value=st.one_of(st.lists(_ITEMS, max_size=4), st.dictionaries(st.integers(0, 9) | st.text(max_size=1), _ITEMS,
                                                                     max_size=4), _ITEMS))
def test_container_fast_checks_match_the_general_schema_check(hint, value):
    def outcome(checks):
        saved = wire._CONTAINER_CHECKS
        wire._CONTAINER_CHECKS = checks
        try:
            return "ok", wire._check(value, hint, "M.f", 4)
        except WireError as exc:
            return "error", str(exc)
        finally:
            wire._CONTAINER_CHECKS = saved

    assert outcome(wire._CONTAINER_CHECKS) == outcome({})


def test_fast_scalar_skip_still_refuses_containers_and_truncation():
    # dict[int, bytes] and tuple[int, ...] items take the tight loop; a container or a cut-off
    # item in the middle must still be refused there
    good = wire.encode(EncryptedShares(ROUND, 3, {4: b"a" * 40, 5: b"b" * 300}, bytes(32)))
    nested = good.replace(msgpack.packb(b"a" * 40), b"\x91\x90" + b"\xc0" * 40)  # same length
    with pytest.raises(WireError, match="expected a single value, got a nested array"):
        wire.decode(nested)
    for cut in range(1, len(good)):
        with pytest.raises(WireError):
            wire.decode(good[:cut])
