"""Baselines measured beside every benchmark: warm medians, never one cold timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Collection

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.graph import Graph
from secagg.keys import LABEL_PAIRWISE_MASK, KeyPair, agree

BASELINE_RUNS = 5


def warm_median(fn: Callable[[], object], runs: int = BASELINE_RUNS,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of ``runs`` calls of ``fn`` after one untimed warm-up call: wall time, or
    ``clock=time.process_time`` for this process's CPU time (what a busy machine distorts least)."""
    fn()
    times = []
    for _ in range(runs):
        started = clock()
        fn()
        times.append(clock() - started)
    return statistics.median(times)


def keystream_rate(size: int = 1 << 26, runs: int = BASELINE_RUNS, chunk: int = 1 << 20,
                   clock: Callable[[], float] = time.perf_counter) -> float:
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

    return size // chunk * chunk / warm_median(one_pass, runs, clock)


def agreement_seconds(count: int = 200, runs: int = BASELINE_RUNS,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per pairwise seed (X25519 exchange + HKDF-SHA256), warm median over ``count`` agreements.

    Each pairwise mask needs one agreement before its keystream, so at small d the time to
    agree the seeds, not the keystream, is a party's floor: the benchmarks report it beside
    the keystream limit, measured in the same run.
    """
    mine = KeyPair.generate()
    peers = [KeyPair.generate().public_bytes for _ in range(count)]

    def agree_all() -> None:
        for i, peer in enumerate(peers):
            agree(mine.private, peer, label=LABEL_PAIRWISE_MASK, context=i.to_bytes(8, "big"))

    return warm_median(agree_all, runs, clock) / count


def round_floor(graph: Graph, clients: Collection[int], lost: Collection[int], survivors: Collection[int],
                dim: int) -> tuple[int, int]:
    """(pairwise key agreements, mask keystream bytes) a masking round cannot do without.

    The clients agree one share key per neighbour, and one mask seed per neighbour when they
    reach the masked-input stage (``lost``: the clients that vanish there); the server agrees
    one seed per mask it rebuilds (a lost client's mask towards each surviving neighbour) and
    expands every self mask of a survivor. Priced at :func:`agreement_seconds` and
    :func:`keystream_rate` measured in the same run, this is the round's compute floor, so a
    benchmark's round time reads as a multiple of it.
    """
    survivors = frozenset(survivors)
    lost = frozenset(lost)
    rebuilt = len(survivors) + sum(len(graph.neighbours(o) & survivors) for o in lost)  # graph.neighbours holds the client itself
    share_keys = sum(len(graph.neighbours(c)) - 1 for c in clients)
    mask_seeds = sum(len(graph.neighbours(c)) - 1 for c in clients if c not in lost)
    agreements = share_keys + mask_seeds + rebuilt - len(survivors)
    keystream = (mask_seeds + len(clients) - len(lost)) * dim * 4 + rebuilt * dim * 4
    return agreements, keystream
