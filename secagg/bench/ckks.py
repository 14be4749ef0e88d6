"""CKKS / BFV benchmark: one real round in process, beside a plain float32 sum of the same updates.

Runs the same sessions as ``secagg.aggregate(protection="ckks")`` and the gRPC mode
(:mod:`secagg.ckks.session`, driven by :func:`secagg.ckks.simulate.run_round`) and times
each phase through the sessions' timing callback:

* client: ``precompute_s_per_client`` (the encryptions of zero, done before the update is
  known), ``encrypt_online_s_per_client`` (encode, add to them, TenSEAL serialize),
  ``encrypt_total_s_per_client`` (both: what a client really spends; ``encrypt_params_per_s``
  is per total), ``encrypt_oneshot_s_per_client`` (one public-key encryption from scratch,
  for comparison) and ``sign_s_per_client`` (digest and signature);
* server: ``server_sum_s`` (signature check, structural check, TenSEAL parse, add, seal the
  aggregate); ``server_deserialize_add_s`` is TenSEAL's deserialize + add alone over the
  same bytes, the figure other CKKS aggregators report;
* key holder: ``keyholder_verify_s`` (it re-checks every upload and recomputes the sum,
  always), ``decrypt_s`` (decryption, range and check-slot checks, release rounding).

Every baseline -- the plain float32 sum and TenSEAL's bare deserialize + add -- is the
median of several warm runs (one untimed run first), never one cold timing.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from secagg.bench.limits import check_bench_size
from secagg.bench.timing import warm_median
from secagg.ckks.messages import HeCiphertexts
from secagg.ckks.params import HeParams
from secagg.ckks.roles import HeClient, HeRoundConfig, SplitClient, new_round_id, ts
from secagg.ckks.simulate import round_sessions, run_round
from secagg.rounds import PhaseTimes
from secagg.wire import decode

BASELINE_RUNS = 7


def add_ckks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=10, help="number of clients (default 10)")
    parser.add_argument("--dim", type=float, default=1e5, help="parameters per update (default 1e5)")
    parser.add_argument("--scheme", choices=["ckks", "bfv"], default="ckks",
                        help="ckks (default: poly 8192, [60, 40], scale 2^40) or bfv (quantized, half the upload)")
    parser.add_argument("--poly-modulus-degree", type=int, default=None, help="override the poly modulus degree")
    parser.add_argument("--coeff-mod-bit-sizes", type=str, default=None,
                        help="override the coefficient moduli, e.g. 60,40")
    parser.add_argument("--scale-bits", type=int, default=None, help="CKKS: override the scale (log2)")
    parser.add_argument("--release-grid-bits", type=int, default=None,
                        help="CKKS: round the released sum to 2^-bits (default 22; 0 = raw decryption)")
    parser.add_argument("--key-holders", type=int, default=1,
                        help="bfv only: split every update into additive shares, one per key holder (default 1)")
    parser.add_argument("--no-precompute", dest="precompute", action="store_false",
                        help="encrypt from scratch instead of adding to precomputed encryptions of zero")


def run_ckks_bench(
    clients: int, dim: float, *, scheme: str = "ckks", poly_modulus_degree: int | None = None,
    coeff_mod_bit_sizes: str | None = None, scale_bits: int | None = None,
    release_grid_bits: int | None = None, precompute: bool = True, key_holders: int = 1,
) -> dict:
    """Return the benchmark figures as a flat dict (see ``secagg bench ckks --help``)."""
    clients, dim = check_bench_size(clients=clients, dim=dim)
    params = _params(scheme, poly_modulus_degree, coeff_mod_bit_sizes, scale_bits)
    updates = np.random.default_rng(0).uniform(-1, 1, size=(clients, dim)).astype(np.float32)
    plain_sum_s = warm_median(lambda: updates.sum(axis=0, dtype=np.float32), runs=BASELINE_RUNS)
    plain = updates.sum(axis=0, dtype=np.float32)
    exact = updates.astype(np.float64).sum(axis=0)

    grid = {} if release_grid_bits is None else {"release_grid_bits": release_grid_bits}
    config = HeRoundConfig(new_round_id(), dim, clients, params, value_bound=1.0, key_holders=key_holders, **grid)
    times = PhaseTimes()
    server, parties = round_sessions(config, updates.astype(np.float64), precompute=precompute, timer=times)
    released = run_round(server, parties)
    holders = [parties[h].holder for h in server.roster.keyholders]
    client_ctxs = [h.context_for_clients() for h in holders]
    setup, pre = times["client.setup"] / clients, times["client.precompute"] / clients
    enc, sign = times["client.encrypt"] / clients, times["client.sign"] / clients
    oneshot = _oneshot_encrypt_s(config, client_ctxs, server.roster.keyholder_keys, updates[0].astype(np.float64))
    server_sum_s = times["server.receive"] + times["server.aggregate"]
    verify_s = times["keyholder.verify"]
    decrypt_s = times["keyholder.release"] + times["server.combine"]
    keygen_s = times["keyholder.keygen"] / key_holders
    deserialize_add_s = sum(
        warm_median(lambda s=s: _tenseal_only_sum(list(s.uploads), s.tenseal_context, params), runs=3)
        for s in server.he_servers
    )
    total = enc + pre
    max_abs_error = float(np.max(np.abs(released.total - exact)))
    bytes_up = sum(float(np.mean([len(u) for u in s.uploads])) for s in server.he_servers) / dim
    return {
        "clients": clients,
        "dim": dim,
        "scheme": params.scheme,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": ",".join(map(str, params.coeff_mod_bit_sizes)),
        "scale_bits": params.scale_bits,
        "plain_modulus_bits": params.plain_modulus_bits,
        "precompute": precompute,
        "key_holders": key_holders,
        "precompute_s_per_client": pre,
        "encrypt_online_s_per_client": enc,
        "encrypt_total_s_per_client": total,
        "encrypt_oneshot_s_per_client": oneshot,
        "encrypt_params_per_s": dim / total,
        "encrypt_online_params_per_s": dim / enc,
        "sign_s_per_client": sign,
        "client_setup_s": setup,
        "server_sum_s": server_sum_s,
        "server_deserialize_add_s": deserialize_add_s,
        "keyholder_verify_s": verify_s,
        "keyholder_verify_over_server_sum": verify_s / server_sum_s,
        "decrypt_s": decrypt_s,
        "keygen_s": keygen_s,
        "plain_sum_s": plain_sum_s,
        "plain_sum_runs": BASELINE_RUNS,
        "encrypt_total_over_plain_sum": total / plain_sum_s,
        "server_sum_over_plain_sum": server_sum_s / plain_sum_s,
        "keyholder_verify_over_plain_sum": verify_s / plain_sum_s,
        "decrypt_over_plain_sum": decrypt_s / plain_sum_s,
        "bytes_up_per_param": bytes_up,
        "float32_bytes_per_param": 4.0,
        "client_context_bytes": len(client_ctxs[0]),
        "server_context_bytes": len(holders[0].context_for_server()),
        "max_abs_error": max_abs_error,
        "error_bound": released.error_bound,
        "float32_sum_max_abs_error": float(np.max(np.abs(plain.astype(np.float64) - exact))),
        "release_grid_bits": config.release_grid_bits if params.scheme == "ckks" else 0,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def _oneshot_encrypt_s(config: HeRoundConfig, client_ctxs, holder_keys, x: np.ndarray) -> float:
    """One client's encryption without precomputation (a throwaway client; its upload is not sent)."""
    if config.key_holders == 1:
        client = HeClient(0, config, client_ctxs[0], holder_keys[0])
    else:
        client = SplitClient(0, config, client_ctxs, holder_keys)
    started = time.perf_counter()
    client.encrypt_chunks(x)
    return time.perf_counter() - started


def _params(scheme, poly, coeff, scale_bits) -> HeParams:
    base = HeParams.ckks() if scheme == "ckks" else HeParams.bfv()
    return HeParams(
        base.scheme,
        poly or base.poly_modulus_degree,
        tuple(int(b) for b in coeff.split(",")) if coeff else base.coeff_mod_bit_sizes,
        scale_bits if scale_bits is not None else base.scale_bits,
        base.plain_modulus_bits,
    )


def _tenseal_only_sum(uploads: list[bytes], ctx, params: HeParams) -> float:
    """TenSEAL deserialize + add over the same ciphertext bytes (no authentication, no checks)."""
    chunks = [decode(u, max_bytes=len(u), expect=HeCiphertexts).chunks for u in uploads]
    load = ts.ckks_vector_from if params.scheme == "ckks" else ts.bfv_vector_from
    started = time.perf_counter()
    acc = [load(ctx, c) for c in chunks[0]]
    for row in chunks[1:]:
        for a, c in zip(acc, row):
            a.add_(load(ctx, c))
    return time.perf_counter() - started
