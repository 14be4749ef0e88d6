"""CKKS / BFV benchmark: one real round in process, beside a plain float32 sum of the same updates.

Drives the three roles (key holder, clients, key-less server) directly so that each phase
is timed on its own. ``encrypt_s_per_client`` is the online cost once the client has
precomputed its encryptions of zero (``--no-precompute`` measures the one-shot cost):
encode, encrypt and TenSEAL serialize; ``sign_s_per_client`` is the digest and signature
(``upload_s_per_client`` is both); ``encrypt_total_s_per_client`` adds the offline part. ``server_sum_s`` is everything the
server does (signature check, structural check, TenSEAL parse, add, seal the aggregate);
``server_deserialize_add_s`` is TenSEAL's deserialize + add alone over the same bytes, the
figure other CKKS aggregators report.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from secagg.ckks.messages import HeCiphertexts
from secagg.ckks.params import HeParams
from secagg.ckks.roles import (
    HeClient,
    HeServer,
    KeyHolder,
    RoundConfig,
    additive_shares,
    combine_shares,
    new_round_id,
    ts,
)
from secagg.keys import IdentityKey
from secagg.wire import decode


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
    dim = int(dim)
    params = _params(scheme, poly_modulus_degree, coeff_mod_bit_sizes, scale_bits)
    updates = np.random.default_rng(0).uniform(-1, 1, size=(clients, dim)).astype(np.float32)

    started = time.perf_counter()
    plain = updates.sum(axis=0, dtype=np.float32)
    plain_sum_s = time.perf_counter() - started
    exact = updates.astype(np.float64).sum(axis=0)

    grid = {} if release_grid_bits is None else {"release_grid_bits": release_grid_bits}
    config = RoundConfig(new_round_id(), dim, clients, params, value_bound=1.0, key_holders=key_holders, **grid)
    started = time.perf_counter()
    holders = [KeyHolder(config) for _ in range(key_holders)]
    client_ctxs = [h.context_for_clients() for h in holders]
    server_ctxs = [h.context_for_server() for h in holders]
    keygen_s = (time.perf_counter() - started) / key_holders
    ids = [IdentityKey.generate() for _ in range(clients)]
    keys = {i: k.public_bytes for i, k in enumerate(ids)}
    servers = [HeServer(config, c, h.public_key, keys) for c, h in zip(server_ctxs, holders)]

    setup = pre = enc = sign = 0.0
    uploads: list[list[bytes]] = []
    for i in range(clients):
        t0 = time.perf_counter()
        parts = [HeClient(i, config, c, h.public_key, ids[i]) for c, h in zip(client_ctxs, holders)]
        t1 = time.perf_counter()
        if precompute:
            for part in parts:
                part.precompute()
        t2 = time.perf_counter()
        x = updates[i].astype(np.float64)
        if key_holders == 1:
            chunk_sets = [parts[0].encrypt_chunks(x)]
        else:  # what SplitClient.encrypt does, with the signing timed apart
            q = parts[0]._quantize(parts[0]._prepare(x, None))
            shares = additive_shares(q, params.plain_modulus, key_holders)
            chunk_sets = [part._encrypt_values(share) for part, share in zip(parts, shares)]
        t3 = time.perf_counter()
        uploads.append([part.seal_upload(chunks) for part, chunks in zip(parts, chunk_sets)])
        t4 = time.perf_counter()
        setup, pre, enc, sign = setup + t1 - t0, pre + t2 - t1, enc + t3 - t2, sign + t4 - t3
    setup, pre, enc, sign = setup / clients, pre / clients, enc / clients, sign / clients

    started = time.perf_counter()
    aggregates = []
    for j, server in enumerate(servers):
        for sent in uploads:
            server.receive(sent[j])
        aggregates.append(server.aggregate())
    server_sum_s = time.perf_counter() - started

    started = time.perf_counter()
    if key_holders == 1:
        released = holders[0].decrypt(aggregates[0], servers[0].public_key)
    else:
        shares = [h.decrypt_share(a, s.public_key) for h, a, s in zip(holders, aggregates, servers)]
        released = combine_shares(config, shares)
    decrypt_s = time.perf_counter() - started

    deserialize_add_s = sum(
        _tenseal_only_sum([sent[j] for sent in uploads], server._ctx, params) for j, server in enumerate(servers)
    )
    max_abs_error = float(np.max(np.abs(released.values - exact)))
    bytes_up = float(np.mean([sum(map(len, u)) for u in uploads])) / dim
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
        "encrypt_s_per_client": enc,
        "encrypt_params_per_s": dim / enc,
        "sign_s_per_client": sign,
        "upload_s_per_client": enc + sign,
        "precompute_s_per_client": pre,
        "encrypt_total_s_per_client": enc + pre,
        "encrypt_total_params_per_s": dim / (enc + pre),
        "client_setup_s": setup,
        "server_sum_s": server_sum_s,
        "server_deserialize_add_s": deserialize_add_s,
        "decrypt_s": decrypt_s,
        "keygen_s": keygen_s,
        "plain_sum_s": plain_sum_s,
        "encrypt_over_plain_sum": enc / plain_sum_s,
        "server_sum_over_plain_sum": server_sum_s / plain_sum_s,
        "decrypt_over_plain_sum": decrypt_s / plain_sum_s,
        "bytes_up_per_param": bytes_up,
        "float32_bytes_per_param": 4.0,
        "client_context_bytes": len(client_ctxs[0]),
        "server_context_bytes": len(server_ctxs[0]),
        "max_abs_error": max_abs_error,
        "error_bound": released.error_bound,
        "float32_sum_max_abs_error": float(np.max(np.abs(plain.astype(np.float64) - exact))),
        "release_grid_bits": config.release_grid_bits if params.scheme == "ckks" else 0,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


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
