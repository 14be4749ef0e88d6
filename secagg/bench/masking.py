"""Masking benchmark: one real round in process, beside baselines measured in the same run.

Baselines are warm medians of several runs: a plain float32 sum of the same updates, the
AES-256-CTR keystream rate, which gives each party's "keystream limit" (the time to
generate the keystream its masks need; no masking can be faster), and the time of one
pairwise seed agreement (X25519 + HKDF), which with the keystream limit gives each party's
"floor": at small d the agreements, not the keystream, dominate it. The server's time
includes checking the signature on, decoding and adding every upload.
"""

from __future__ import annotations

import os
import time

import numpy as np

from secagg.bench.limits import check_bench_size
from secagg.bench.timing import agreement_seconds, keystream_rate, warm_median
from secagg.encoding import FixedPointCodec
from secagg.prg import MaskAccumulator
from secagg.protocol.common import Stage
from secagg.protocol.simulate import InMemoryRound


def run_masking_bench(
    *, clients: int, dim: int, dropout: float = 0.1, graph: str = "complete", bits: int = 32,
    degree: int | None = None, stage: str = "masked_input", workers: int = 1,
) -> dict:
    """Return the benchmark figures as a flat dict (see ``secagg bench masking --help``).

    A fraction ``dropout`` of the clients (every k-th) drop at ``stage``; by default they never
    deliver their masked vector, the case that forces the server to reconstruct keys. ``workers``:
    threads each party may use to expand masks (bit-identical results; see secagg.prg.MaskAccumulator).
    """
    clients, dim = check_bench_size(clients=clients, dim=dim, dropout=dropout)
    updates = _updates(clients, dim)
    plain = updates.sum(axis=0, dtype=np.float32)
    plain_sum_s = warm_median(lambda: updates.sum(axis=0, dtype=np.float32))
    rate = keystream_rate()
    rate_cpu = keystream_rate(clock=time.process_time)
    per_agreement = agreement_seconds()

    n_drop = int(round(dropout * clients))
    dropped = [r + 1 for r in np.linspace(0, clients - 1, n_drop, dtype=int).tolist()] if n_drop else []
    # As aggregate_masking(clip=None): the fixed-point range is the batch's largest |coordinate|.
    codec = FixedPointCodec.for_clients(clip=float(np.max(np.abs(updates))) or 1.0, max_clients=clients,
                                        bits=bits, clip_mode="coordinate")
    session = InMemoryRound(updates, codec, graph=graph, degree=degree, dropout_hint=min(dropout, 0.5),
                            workers=workers)
    started = time.perf_counter()
    session.run({stage: dropped})
    wall_s = time.perf_counter() - started

    server = session.server
    included = [c - 1 for c in server.included]
    exact = updates[included].astype(np.float64).sum(axis=0)
    timings = dict(server.timings)
    server_unmask_s = timings.get("server.unmask", 0.0)
    client_mask_s = session.client_seconds.get("masked_input", 0.0)
    client_mask_cpu_s = session.client_cpu_seconds.get("masked_input", 0.0)
    upload_check_s = session.server_receive_seconds.get("masked_input", 0.0)
    server_total_s = sum(timings.get(f"server.{s.value}", 0.0) for s in Stage) + sum(
        session.server_receive_seconds.values())
    # Keystream each side must generate: the server one self mask per survivor and, per client
    # that shared keys but sent no input, one pairwise mask per surviving neighbour; a client
    # its self mask, one pairwise mask per neighbour that shared keys, and two rounding words
    # per entry.
    survivors = frozenset(server.included)
    lost = frozenset(server.dropped_at.get(Stage.MASKED_INPUT.value, ()))
    sharers = survivors | lost
    server_keystream = (len(survivors) + sum(len(server.graph.neighbours(o) & survivors) for o in lost)) * dim * 4
    client_keystream = float(np.mean([len(server.graph.neighbours(c) & sharers) + 2 for c in survivors])) * dim * 4
    # Agreements: the server one per pairwise mask it rebuilds, a client one per neighbour that shared.
    server_agreements = sum(len(server.graph.neighbours(o) & survivors) for o in lost)
    client_agreements = float(np.mean([len((server.graph.neighbours(c) & sharers) - {c}) for c in survivors]))
    server_floor = server_keystream / rate + server_agreements * per_agreement
    client_floor = client_keystream / rate + client_agreements * per_agreement
    width = (bits + 7) // 8
    uploads = [session.clients[c].upload_bytes for c in server.included]
    return {
        "clients": clients,
        "dim": dim,
        "dropout": dropout,
        "graph": "complete" if server.graph.complete else "sparse",
        "degree": session.config.degree,
        "threshold": session.config.threshold,
        "bits": bits,
        "workers": workers,
        "included": len(included),
        "server_unmask_s": server_unmask_s,
        "server_reconstruct_s": timings.get("server.reconstruct", 0.0),
        "server_remove_masks_s": timings.get("server.remove_masks", 0.0),
        "server_upload_check_s": upload_check_s,
        "server_collect_s": timings.get("server.collect", 0.0),
        "server_total_s": server_total_s,
        "client_mask_s": client_mask_s,
        "client_share_s": session.client_seconds.get("share", 0.0),
        "client_total_s": sum(session.client_seconds.values()),
        "plain_sum_s": plain_sum_s,
        "server_unmask_over_plain_sum": server_unmask_s / plain_sum_s if plain_sum_s else None,
        "client_mask_over_plain_sum": client_mask_s / plain_sum_s if plain_sum_s else None,
        "aes256_ctr_bytes_per_s": rate,
        "server_unmask_keystream_limit_s": server_keystream / rate,
        "server_unmask_over_keystream_limit": server_unmask_s / (server_keystream / rate),
        "client_mask_keystream_limit_s": client_keystream / rate,
        "client_mask_over_keystream_limit": client_mask_s / (client_keystream / rate),
        # The same in CPU time (the stage's CPU on all its threads, the keystream's CPU rate on one):
        # what a loaded machine distorts least; with workers > 1 it is the work, not the wait.
        "aes256_ctr_bytes_per_cpu_s": rate_cpu,
        "client_mask_cpu_s": client_mask_cpu_s,
        "client_mask_cpu_over_keystream_limit": client_mask_cpu_s / (client_keystream / rate_cpu),
        "agreement_s": per_agreement,
        "server_unmask_floor_s": server_floor,
        "server_unmask_over_floor": server_unmask_s / server_floor,
        "client_mask_floor_s": client_floor,
        "client_mask_over_floor": client_mask_s / client_floor,
        "prg_bytes_per_s": _prg_throughput(dim),
        "bytes_up_per_param": float(np.mean(uploads)) / dim,
        "masked_bytes_per_param": float(width),
        "max_abs_error": float(np.max(np.abs(server.result - exact))),
        "quantization_error_bound": codec.sum_error_bound(len(included)),
        "float32_sum_max_abs_error": float(np.max(np.abs(plain.astype(np.float64) - updates.astype(np.float64).sum(0)))),
        "simulation_wall_s": wall_s,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
    }


def _updates(clients: int, dim: int) -> np.ndarray:
    # Benchmark data only (not secret): uniform in [-1, 1].
    return np.random.default_rng(0).uniform(-1, 1, size=(clients, dim)).astype(np.float32)


def _prg_throughput(dim: int, seeds: int = 8) -> float:
    """Bytes per second of masks added into a d-entry accumulator (warm median)."""
    acc = MaskAccumulator(dim)
    keys = [os.urandom(32) for _ in range(seeds)]

    def add_all() -> None:
        for key in keys:
            acc.add(key)

    return seeds * dim * 4 / warm_median(add_all)
