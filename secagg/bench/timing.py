"""Baselines measured beside every benchmark: warm medians, never one cold timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BASELINE_RUNS = 5


def warm_median(fn: Callable[[], object], runs: int = BASELINE_RUNS) -> float:
    """Median wall time of ``runs`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def keystream_rate(size: int = 1 << 26, runs: int = BASELINE_RUNS, chunk: int = 1 << 20) -> float:
    """AES-256-CTR keystream bytes per second on one thread (warm median over ``size`` bytes).

    Masks are AES-256-CTR keystream, so generating the keystream a party needs is the
    floor under its masking time: the "keystream limit" benchmarks compare against. The
    keystream goes into one reused ``chunk``-byte buffer, as the mask accumulator does.
    """
    zeros = memoryview(bytes(chunk))
    out = bytearray(chunk + 16)

    def one_pass() -> None:
        enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
        for _ in range(size // chunk):
            enc.update_into(zeros, out)

    return size // chunk * chunk / warm_median(one_pass, runs)
