"""Large vectors without copies: the sealed masked input is built in place and read in place,
and the server's sum is decoded inside the buffer of its own result."""

from __future__ import annotations

import numpy as np
import pytest

from secagg import encoding, wire
from secagg.encoding import FixedPointCodec, sum_in_result_buffer
from secagg.errors import WireError
from secagg.keys import IdentityKey
from secagg.protocol.messages import MaskedInput

ROUND = bytes(range(16))


@pytest.mark.parametrize("nbytes", [0, 200, 4000, 70_000, wire.BORROW_MIN_BYTES + 4])
def test_a_sealed_buffer_is_byte_for_byte_the_sealed_message(nbytes):
    identity = IdentityKey.generate()
    content = np.frombuffer(bytes(range(256)) * (nbytes // 256 + 1), dtype=np.uint8)[:nbytes]
    builder = wire.SealedBuffer(MaskedInput(ROUND, 7, b""), 7, nbytes)
    assert nbytes == 0 or builder.tail.ctypes.data % 16 == 0  # viewable as uint32 words
    builder.tail[:] = content
    sealed = builder.seal(identity)
    assert bytes(sealed) == wire.seal(MaskedInput(ROUND, 7, content.tobytes()), 7, identity)
    sender, msg = wire.open_sealed(sealed, {7: identity.public_bytes}.get, expect=MaskedInput)
    assert sender == 7 and bytes(msg.vector) == content.tobytes()


def test_a_large_borrowed_field_is_a_view_of_the_received_bytes_and_others_are_copies():
    identity = IdentityKey.generate()
    big = wire.seal(MaskedInput(ROUND, 3, bytes(wire.BORROW_MIN_BYTES)), 3, identity)
    _, msg = wire.open_sealed(big, {3: identity.public_bytes}.get)
    assert isinstance(msg.vector, memoryview) and msg.vector.readonly
    assert np.shares_memory(np.frombuffer(msg.vector, np.uint8), np.frombuffer(big, np.uint8))
    small = wire.seal(MaskedInput(ROUND, 3, bytes(1000)), 3, identity)
    assert type(wire.open_sealed(small, {3: identity.public_bytes}.get)[1].vector) is bytes
    # A field not declared borrowable is never a view, whatever its size.
    sender, payload, _ = wire.unverified_envelope(big)
    assert isinstance(payload, memoryview) and sender == 3
    with pytest.raises(WireError, match="truncated|malformed"):
        wire.open_sealed(big[:-10], {3: identity.public_bytes}.get)


def test_sealed_buffer_refuses_a_field_it_cannot_write_in_place():
    with pytest.raises(WireError, match="borrowed last field"):
        wire.SealedBuffer(MaskedInput(ROUND, 1, b"x"), 1, 8)


@pytest.mark.parametrize("bits", [32, 20])
def test_decoding_the_sum_inside_its_result_buffer_equals_decoding_a_copy(monkeypatch, bits):
    monkeypatch.setattr(encoding, "ENCODE_CHUNK", 64)  # many chunks, so the overlap is exercised
    codec = FixedPointCodec(clip=1.0, scale=2.0 ** (bits - 8), bits=bits, max_clients=4, clip_mode="coordinate")
    dim = 1000
    result, total = sum_in_result_buffer(dim)
    assert not total.any() and np.shares_memory(result, total)
    words = np.random.default_rng(1).integers(0, 1 << bits, dim, dtype=np.uint64).astype(np.uint32)  # test data
    total[:] = words
    expected = codec.decode_sum(words.copy())
    assert codec.decode_sum(total, out=result) is result
    np.testing.assert_array_equal(result, expected)


def test_the_inflight_budget_makes_a_payload_wait_until_bytes_are_given_back():
    import asyncio

    from federation.transport.frames import ByteBudget

    async def scenario():
        budget = ByteBudget(100)
        first = await budget.take(60)
        waiting = asyncio.ensure_future(budget.take(60))
        await asyncio.sleep(0.01)
        assert not waiting.done() and budget.used == 60  # 120 would exceed the budget
        budget.give(first)
        second = await asyncio.wait_for(waiting, 5)
        budget.give(second)
        assert await budget.take(500) == 100  # larger than the whole budget: reserved alone
        assert budget.used == 100

    asyncio.run(scenario())


# -- the server's memory over gRPC, against the formula in docs/deployment.md ---------------

@pytest.mark.slow
def test_server_peak_memory_stays_within_the_documented_bound():
    """A real masking round over gRPC + mutual TLS with the server in its own process
    (benchmarks/bench_server_memory.py): its peak resident memory (VmHWM) must stay below its
    idle baseline, measured in the same process before the round, plus
    ``server_memory_bound(n, d)`` (docs/deployment.md, section 4). The margin is the bound's
    own per-connection allowance; no timing is checked. The in-flight budget admits two of
    the four uploads at a time, so the round also shows that the others wait and get their
    turn. Before the masked inputs were parsed in place and the aggregate was sent without a
    copy per client, this round (without a budget) grew by 256 MiB against a bound of 160 MiB."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server_memory.py"
    out = subprocess.run([sys.executable, str(script), "--clients", "4", "--dim", str(1 << 22), "--inflight", "2"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    row = json.loads(out)
    assert row["ok"] == [True]  # every client got its turn within the budget
    grown, bound = row["grown_bytes"], row["bound_bytes (server_memory_bound)"]
    assert 0 < grown <= bound, f"server grew by {grown >> 20} MiB; the documented bound is {bound >> 20} MiB"
