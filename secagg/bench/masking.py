"""Masking benchmark: one real round in process, beside a plain float32 sum of the same updates."""

from __future__ import annotations

import os
import time

import numpy as np

from secagg.bench.limits import check_bench_size
from secagg.prg import MaskAccumulator
from secagg.protocol.simulate import aggregate_masking


def run_masking_bench(
    *, clients: int, dim: int, dropout: float = 0.1, graph: str = "complete", bits: int = 32,
    degree: int | None = None, stage: str = "masked_input",
) -> dict:
    """Return the benchmark figures as a flat dict (see ``secagg bench masking --help``).

    A fraction ``dropout`` of the clients (every k-th) drop at ``stage``; by default they never
    deliver their masked vector, the case that forces the server to reconstruct keys.
    """
    clients, dim = check_bench_size(clients=clients, dim=dim, dropout=dropout)
    updates = _updates(clients, dim)
    started = time.perf_counter()
    plain = updates.sum(axis=0, dtype=np.float32)
    plain_sum_s = time.perf_counter() - started

    n_drop = int(round(dropout * clients))
    dropped = list(np.linspace(0, clients - 1, n_drop, dtype=int)) if n_drop else []
    started = time.perf_counter()
    result = aggregate_masking(updates, graph=graph, bits=bits, degree=degree,
                               dropouts={stage: dropped} if dropped else None)
    wall_s = time.perf_counter() - started

    exact = updates[list(result.included)].astype(np.float64).sum(axis=0)
    timings = result.timings
    server_unmask_s = timings.get("server.unmask", 0.0)
    client_mask_s = timings.get("client.masked_input", 0.0)
    width = (bits + 7) // 8
    return {
        "clients": clients,
        "dim": dim,
        "dropout": dropout,
        "graph": result.parameters["graph"],
        "degree": result.parameters["degree"],
        "threshold": result.parameters["threshold"],
        "bits": bits,
        "included": len(result.included),
        "server_unmask_s": server_unmask_s,
        "server_reconstruct_s": timings.get("server.reconstruct", 0.0),
        "server_remove_masks_s": timings.get("server.remove_masks", 0.0),
        "server_collect_s": timings.get("server.collect", 0.0),
        "client_mask_s": client_mask_s,
        "client_share_s": timings.get("client.share", 0.0),
        "client_total_s": sum(v for k, v in timings.items() if k.startswith("client.")),
        "plain_sum_s": plain_sum_s,
        "server_unmask_over_plain_sum": server_unmask_s / plain_sum_s if plain_sum_s else None,
        "client_mask_over_plain_sum": client_mask_s / plain_sum_s if plain_sum_s else None,
        "prg_bytes_per_s": _prg_throughput(dim),
        "bytes_up_per_param": result.bytes_up_per_param,
        "masked_bytes_per_param": float(width),
        "max_abs_error": float(np.max(np.abs(result.total - exact))),
        "quantization_error_bound": result.max_quantization_error,
        "float32_sum_max_abs_error": float(np.max(np.abs(plain.astype(np.float64) - updates.astype(np.float64).sum(0)))),
        "simulation_wall_s": wall_s,
        "cpu_count": os.cpu_count(),
    }


def _updates(clients: int, dim: int) -> np.ndarray:
    # Benchmark data only (not secret): uniform in [-1, 1].
    return np.random.default_rng(0).uniform(-1, 1, size=(clients, dim)).astype(np.float32)


def _prg_throughput(dim: int, repeats: int = 8) -> float:
    acc = MaskAccumulator(dim)
    seeds = [os.urandom(32) for _ in range(repeats)]
    started = time.perf_counter()
    for seed in seeds:
        acc.add(seed)
    return repeats * dim * 4 / (time.perf_counter() - started)
