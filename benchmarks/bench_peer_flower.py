"""Same-run comparison with Flower's SecAgg+ hot paths: writes benchmarks/results/peer_flower.json.

Times, in one process on this machine, Flower's own secure-aggregation functions (imported from
an installed ``flwr``, never copied) doing the work its SecAgg+ workflow does at unmasking and its
client mod does at masking, beside this project's primitives doing the equivalent work, the full
``run_masking_bench`` round as a cross-check, and a plain float32 sum of the same updates.

flwr is not a dependency of this project: run it from a throwaway virtualenv outside the repo:

    python3 -m venv /tmp/flwr-venv
    /tmp/flwr-venv/bin/pip install 'flwr==1.42.*' numpy cryptography msgpack
    /tmp/flwr-venv/bin/pip install -e /path/to/this/repo --no-deps
    nice -n 5 /tmp/flwr-venv/bin/python benchmarks/bench_peer_flower.py

What is timed, per configuration (N clients, d parameters, 10 % of clients never deliver a
masked vector, the same neighbourhoods and the same dropped clients for both libraries):

* Flower server: ``combine_shares`` once per secret with every share the survivors return (its
  workflow's unmask loop), for each survivor's self-mask seed and each dropped client's secret
  key; then, as the loop does, ``pseudo_rand_gen`` for every self mask and, per dropped client,
  ECDH (``generate_shared_key``) + ``pseudo_rand_gen`` for every neighbour it lists (the workflow
  iterates over all neighbours of a dropped client, dropped ones included), with the int64
  additions/subtractions and the final modulo. If the reconstructions would exceed
  ``--flower-budget-s``, a proportional subset of secrets is timed and the total extrapolated
  linearly (reported in the output and the JSON).
* Flower client: ``create_shares`` for its two secrets (32-byte seed, PEM private key) to its
  neighbourhood, then ECDH + ``pseudo_rand_gen`` for 1 self mask + one pairwise mask per
  neighbour, added to an int64 vector, and the modulo.
* This project: ``secagg.shamir.split`` / ``reconstruct`` (t holders, Lagrange weights cached per
  holder set, cache cleared before timing) and ``secagg.prg.MaskAccumulator`` with the same mask
  counts (pairwise masks only towards survivors, as the protocol needs), plus key agreement.

Flower's server reconstructs shares of one client's secrets for every owner: the cost of its
Shamir code does not depend on the secret's value, only on its length and the number of shares.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    import flwr
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        f"flwr is not importable ({exc}). It is not a dependency of this project; create a throwaway venv:\n"
        "  python3 -m venv /tmp/flwr-venv\n"
        "  /tmp/flwr-venv/bin/pip install 'flwr==1.42.*' numpy cryptography msgpack\n"
        "  /tmp/flwr-venv/bin/pip install -e . --no-deps\n"
        "  nice -n 5 /tmp/flwr-venv/bin/python benchmarks/bench_peer_flower.py"
    )

import numpy as np

from secagg import shamir
from secagg.bench.masking import run_masking_bench
from secagg.graph import complete_graph, sparse_graph
from secagg.keys import KeyPair
from secagg.prg import MaskAccumulator
from secagg.protocol.common import pairwise_seed, pairwise_sign

RESULTS = Path(__file__).parent / "results"
MOD_RANGE = 1 << 32  # Flower's default modulus_range
ROUND_ID = b"bench-peer-flower"


def _dropped_ids(clients: int, dropout: float) -> list[int]:
    n_drop = round(dropout * clients)
    # Same choice of dropped clients as secagg.bench.masking (every k-th), ids are 1-based.
    return [int(i) + 1 for i in np.linspace(0, clients - 1, n_drop, dtype=int)] if n_drop else []


def _plain_sum(updates: np.ndarray, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        updates.sum(axis=0, dtype=np.float32)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- Flower ------------------------------------------------------------------------------------


def flower_client(dim: int, threshold: int, neighbours: list[int], me: int, pub_pem: dict[int, bytes]) -> dict:
    """One surviving client's share creation and masking, as Flower's SecAgg+ mod does it."""
    num_shares = len(neighbours)  # Flower's neighbourhood includes the client itself
    sk, _pk = generate_key_pairs()
    sk_bytes = private_key_to_bytes(sk)
    rd_seed = os.urandom(32)
    started = time.perf_counter()
    seed_shares = create_shares(rd_seed, threshold, num_shares)
    sk_shares = create_shares(sk_bytes, threshold, num_shares)
    share_s = time.perf_counter() - started

    quantized = [np.random.default_rng(1).integers(0, 1 << 22, size=dim, dtype=np.int64)]
    dims = [a.shape for a in quantized]
    peers = [p for p in neighbours if p != me]
    peer_keys = {p: bytes_to_public_key(pub_pem[p]) for p in peers}
    started = time.perf_counter()
    private_mask = pseudo_rand_gen(rd_seed, MOD_RANGE, dims)
    quantized = parameters_addition(quantized, private_mask)
    for p in peers:
        shared_key = generate_shared_key(sk, peer_keys[p])
        pairwise_mask = pseudo_rand_gen(shared_key, MOD_RANGE, dims)
        if me > p:
            quantized = parameters_addition(quantized, pairwise_mask)
        else:
            quantized = parameters_subtraction(quantized, pairwise_mask)
    quantized = parameters_mod(quantized, MOD_RANGE)
    mask_s = time.perf_counter() - started
    return {
        "share_s": share_s, "mask_s": mask_s, "masks": 1 + len(peers), "num_shares": num_shares,
        "seed": rd_seed, "sk_bytes": sk_bytes, "seed_shares": seed_shares, "sk_shares": sk_shares,
        "sk_pem_bytes": len(sk_bytes), "share_bytes_seed": len(seed_shares[0]), "share_bytes_sk": len(sk_shares[0]),
    }


def flower_server(dim: int, graph, survivors: set[int], dropped: list[int], client: dict,
                  pub_pem: dict[int, bytes], budget_s: float) -> dict:
    """Flower's unmask stage: combine_shares per secret with every received share, then regenerate masks."""
    # Shares an owner's secret can be rebuilt from: one per surviving member of its neighbourhood.
    # Share indices follow the neighbourhood order (Flower numbers shares 1..num_shares).
    def received(owner: int, shares: list[bytes]) -> list[bytes]:
        members = sorted(graph.neighbours(owner))
        return [shares[i] for i, m in enumerate(members) if m in survivors]

    seed_jobs = [received(o, client["seed_shares"]) for o in sorted(survivors)]
    sk_jobs = [received(o, client["sk_shares"]) for o in dropped]

    # Probe one of each to decide whether the full set fits the budget.
    probe = {}
    for kind, jobs, secret in (("seed", seed_jobs, client["seed"]), ("sk", sk_jobs, client["sk_bytes"])):
        if not jobs:
            probe[kind] = ([], 0.0)
            continue
        started = time.perf_counter()
        assert combine_shares(jobs[0]) == secret
        probe[kind] = ([time.perf_counter() - started], 0.0)
    estimate = (len(seed_jobs) * (probe["seed"][0] or [0])[0] + len(sk_jobs) * (probe["sk"][0] or [0])[0])
    fraction = 1.0 if estimate <= budget_s else budget_s / estimate
    timed = {}
    for kind, jobs, secret in (("seed", seed_jobs, client["seed"]), ("sk", sk_jobs, client["sk_bytes"])):
        times = list(probe[kind][0])
        want = len(jobs) if fraction >= 1.0 else max(1, math.ceil(fraction * len(jobs)))
        for job in jobs[len(times):want]:
            started = time.perf_counter()
            assert combine_shares(job) == secret
            times.append(time.perf_counter() - started)
        per = statistics.fmean(times) if times else 0.0
        timed[kind] = {
            "secrets": len(jobs), "timed": len(times), "shares_per_secret": len(jobs[0]) if jobs else 0,
            "mean_s": per, "measured_s": sum(times), "total_s": per * len(jobs),
            "extrapolated": len(times) < len(jobs),
        }
    reconstruct_s = timed["seed"]["total_s"] + timed["sk"]["total_s"]

    # Mask regeneration as the workflow's loop does it (all of it timed, nothing extrapolated).
    masked_vector = [np.random.default_rng(2).integers(0, MOD_RANGE, size=dim, dtype=np.int64)]
    dims = [a.shape for a in masked_vector]
    pairwise = 0
    started = time.perf_counter()
    for owner in sorted(graph.clients):
        if owner in survivors:
            private_mask = pseudo_rand_gen(client["seed"], MOD_RANGE, dims)
            masked_vector = parameters_subtraction(masked_vector, private_mask)
        elif owner in dropped:
            sk = bytes_to_private_key(client["sk_bytes"])
            for nb in sorted(graph.neighbours(owner) - {owner}):
                shared_key = generate_shared_key(sk, bytes_to_public_key(pub_pem[nb]))
                pairwise_mask = pseudo_rand_gen(shared_key, MOD_RANGE, dims)
                pairwise += 1
                if owner > nb:
                    masked_vector = parameters_addition(masked_vector, pairwise_mask)
                else:
                    masked_vector = parameters_subtraction(masked_vector, pairwise_mask)
    parameters_mod(masked_vector, MOD_RANGE)
    masks_s = time.perf_counter() - started
    return {
        "reconstruct_s": reconstruct_s, "reconstruct": timed, "reconstruct_fraction_timed": fraction,
        "reconstruct_estimate_s": estimate, "remove_masks_s": masks_s,
        "self_masks": len(seed_jobs), "pairwise_masks": pairwise,
        "unmask_s": reconstruct_s + masks_s,
        "extrapolated": timed["seed"]["extrapolated"] or timed["sk"]["extrapolated"],
    }


# -- this project -------------------------------------------------------------------------------


def ours_primitives(dim: int, graph, survivors: set[int], dropped: list[int]) -> dict:
    """The same unmasking and masking work with secagg.shamir and secagg.prg."""
    t = graph.threshold
    clients = sorted(graph.clients)
    seeds = {c: os.urandom(32) for c in clients}
    keys = {c: KeyPair.generate() for c in clients}

    # Client: split its two 32-byte secrets to its neighbourhood; mask with 1 + |peers| seeds.
    me = next(c for c in clients if c in survivors)
    holders = sorted(graph.neighbours(me))
    started = time.perf_counter()
    shamir.split([seeds[me], keys[me].private_bytes()], threshold=t, holders=holders)
    client_share_s = time.perf_counter() - started
    encoded = np.random.default_rng(1).integers(0, 1 << 22, size=dim, dtype=np.uint32)
    peers = sorted(graph.neighbours(me) - {me})
    started = time.perf_counter()
    acc = MaskAccumulator(dim, initial=encoded)
    acc.add(seeds[me], 1)
    for p in peers:
        acc.add(pairwise_seed(ROUND_ID, keys[me].private, me, p, keys[p].public_bytes), pairwise_sign(me, p))
    client_mask_s = time.perf_counter() - started

    # Every client's shares (not timed: this is the clients' work), indexed [owner][holder].
    share_of: dict[int, dict[int, np.ndarray]] = {}
    for owner in clients:
        members = sorted(graph.neighbours(owner))
        arr = shamir.split([seeds[owner], keys[owner].private_bytes()], threshold=t, holders=members)
        share_of[owner] = {h: arr[i] for i, h in enumerate(members)}

    # Server: reconstruct with exactly t surviving holders, batching owners with the same holder set.
    shamir.lagrange_at_zero.cache_clear()
    started = time.perf_counter()
    recovered: dict[tuple[str, int], bytes] = {}
    for kind, owners, index in (("seed", sorted(survivors), 0), ("sk", dropped, 1)):
        groups: dict[tuple[int, ...], list[int]] = {}
        for owner in owners:
            hs = tuple(sorted(h for h in graph.neighbours(owner) if h in survivors)[:t])
            groups.setdefault(hs, []).append(owner)
        for hs, group in groups.items():
            shares = np.stack([np.stack([share_of[o][h][index] for o in group]) for h in hs])
            for owner, secret in zip(group, shamir.reconstruct(hs, shares, secret_bytes=32)):
                recovered[(kind, owner)] = secret
    reconstruct_s = time.perf_counter() - started
    assert all(recovered[("seed", o)] == seeds[o] for o in survivors)
    assert all(recovered[("sk", o)] == keys[o].private_bytes() for o in dropped)

    total = np.random.default_rng(2).integers(0, MOD_RANGE, size=dim, dtype=np.uint32)
    pairwise = 0
    started = time.perf_counter()
    acc = MaskAccumulator(dim, initial=total)
    for owner in sorted(survivors):
        acc.add(recovered[("seed", owner)], -1)
    for owner in dropped:
        kp = KeyPair.from_private_bytes(recovered[("sk", owner)])
        for peer in sorted(graph.neighbours(owner) & survivors):
            acc.add(pairwise_seed(ROUND_ID, kp.private, owner, peer, keys[peer].public_bytes),
                    -pairwise_sign(peer, owner))
            pairwise += 1
    masks_s = time.perf_counter() - started
    return {
        "client_share_s": client_share_s, "client_mask_s": client_mask_s, "client_masks": 1 + len(peers),
        "reconstruct_s": reconstruct_s, "remove_masks_s": masks_s, "unmask_s": reconstruct_s + masks_s,
        "self_masks": len(survivors), "pairwise_masks": pairwise, "threshold": t,
    }


# -- driver -------------------------------------------------------------------------------------


def run_config(clients: int, dim: int, graph_kind: str, dropout: float, budget_s: float) -> dict:
    updates = np.random.default_rng(0).uniform(-1, 1, size=(clients, dim)).astype(np.float32)
    plain_s = _plain_sum(updates)
    del updates

    full = run_masking_bench(clients=clients, dim=dim, dropout=dropout, graph=graph_kind)
    ids = tuple(range(1, clients + 1))
    if graph_kind == "complete" or full["degree"] >= clients - 1:
        graph = complete_graph(ids, full["threshold"])
    else:
        graph = sparse_graph(ids, degree=full["degree"], threshold=full["threshold"], seed=os.urandom(32))
    dropped = _dropped_ids(clients, dropout)
    survivors = set(ids) - set(dropped)

    ours = ours_primitives(dim, graph, survivors, dropped)

    # Flower: PEM public keys of every client (its workflow stores these), one surviving client's work.
    pub_pem = {c: public_key_to_bytes(generate_key_pairs()[1]) for c in ids}
    me = next(c for c in ids if c in survivors)
    fc = flower_client(dim, graph.threshold, sorted(graph.neighbours(me)), me, pub_pem)
    fs = flower_server(dim, graph, survivors, dropped, fc, pub_pem, budget_s)

    def ratio(x: float) -> float:
        return x / plain_s if plain_s else float("nan")

    return {
        "clients": clients, "dim": dim, "graph": graph_kind, "degree": graph.degree,
        "threshold": graph.threshold, "dropout": dropout, "dropped": len(dropped), "survivors": len(survivors),
        "plain_sum_s": plain_s,
        "flower": {
            "server_unmask_s": fs["unmask_s"], "server_reconstruct_s": fs["reconstruct_s"],
            "server_remove_masks_s": fs["remove_masks_s"], "server_self_masks": fs["self_masks"],
            "server_pairwise_masks": fs["pairwise_masks"], "reconstruct_detail": fs["reconstruct"],
            "reconstruct_extrapolated": fs["extrapolated"], "reconstruct_fraction_timed": fs["reconstruct_fraction_timed"],
            "client_share_s": fc["share_s"], "client_mask_s": fc["mask_s"], "client_masks": fc["masks"],
            "num_shares": fc["num_shares"], "sk_pem_bytes": fc["sk_pem_bytes"],
            "share_bytes_seed": fc["share_bytes_seed"], "share_bytes_sk": fc["share_bytes_sk"],
            "server_unmask_over_plain_sum": ratio(fs["unmask_s"]),
            "client_total_over_plain_sum": ratio(fc["share_s"] + fc["mask_s"]),
        },
        "ours_primitives": {
            **ours,
            "server_unmask_over_plain_sum": ratio(ours["unmask_s"]),
            "client_total_over_plain_sum": ratio(ours["client_share_s"] + ours["client_mask_s"]),
        },
        "ours_full_round": {
            k: full[k] for k in ("server_unmask_s", "server_reconstruct_s", "server_remove_masks_s", "client_mask_s",
                                 "client_share_s", "plain_sum_s", "degree", "threshold", "included", "max_abs_error",
                                 "bytes_up_per_param")
        },
    }


def _fmt(x: float) -> str:
    return f"{x:.4f}" if x < 1 else f"{x:.2f}"


def print_table(rows: list[dict]) -> None:
    print()
    head = (f"{'config':28s} {'who':9s} {'srv recon s':>11s} {'srv masks s':>11s} {'srv unmask s':>12s} "
            f"{'x plain':>9s} {'cli share s':>11s} {'cli mask s':>10s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cfg = f"N={r['clients']} d={r['dim']:.0e} {r['graph']} k={r['degree']} t={r['threshold']}"
        f, o, full = r["flower"], r["ours_primitives"], r["ours_full_round"]
        star = "*" if f["reconstruct_extrapolated"] else ""
        print(f"{cfg:28s} {'Flower':9s} {_fmt(f['server_reconstruct_s']) + star:>11s} {_fmt(f['server_remove_masks_s']):>11s} "
              f"{_fmt(f['server_unmask_s']) + star:>12s} {f['server_unmask_over_plain_sum']:>9.0f} "
              f"{_fmt(f['client_share_s']):>11s} {_fmt(f['client_mask_s']):>10s}")
        print(f"{'':28s} {'secagg':9s} {_fmt(o['reconstruct_s']):>11s} {_fmt(o['remove_masks_s']):>11s} "
              f"{_fmt(o['unmask_s']):>12s} {o['server_unmask_over_plain_sum']:>9.0f} "
              f"{_fmt(o['client_share_s']):>11s} {_fmt(o['client_mask_s']):>10s}")
        print(f"{'':28s} {'(round)':9s} {_fmt(full['server_reconstruct_s']):>11s} {_fmt(full['server_remove_masks_s']):>11s} "
              f"{_fmt(full['server_unmask_s']):>12s} {full['server_unmask_s'] / r['plain_sum_s']:>9.0f} "
              f"{_fmt(full['client_share_s']):>11s} {_fmt(full['client_mask_s']):>10s}")
        print(f"{'':28s} plain float32 sum of {r['clients']} x {r['dim']:.0e}: {r['plain_sum_s']:.4f} s; "
              f"Flower/secagg server unmask: {f['server_unmask_s'] / o['unmask_s']:.0f}x, "
              f"client share+mask: {(f['client_share_s'] + f['client_mask_s']) / (o['client_share_s'] + o['client_mask_s']):.0f}x")
        for kind, d in f["reconstruct_detail"].items():
            if d["secrets"]:
                note = (f"timed {d['timed']} of {d['secrets']}, extrapolated linearly" if d["extrapolated"]
                        else f"all {d['secrets']} timed")
                print(f"{'':28s} Flower combine_shares ({kind}, {d['shares_per_secret']} shares each): "
                      f"{d['mean_s']:.3f} s per secret, {note}")
    if any(r["flower"]["reconstruct_extrapolated"] for r in rows):
        print("\n* Flower reconstruction extrapolated from a timed subset of secrets (see lines above).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--flower-budget-s", type=float, default=180.0,
                        help="max seconds of Flower combine_shares per configuration before timing a subset "
                             "and extrapolating (default 180)")
    parser.add_argument("--quick", action="store_true", help="only N=100 d=1e5 complete")
    parser.add_argument("--no-sparse", action="store_true", help="skip the sparse (SecAgg+) configuration")
    args = parser.parse_args()

    grid = [(100_000, "complete"), (1_000_000, "complete")]
    if not args.no_sparse:
        grid.append((1_000_000, "sparse"))
    if args.quick:
        grid = grid[:1]
    started = time.perf_counter()
    rows = []
    for dim, graph_kind in grid:
        print(f"running N={args.clients} d={dim} {graph_kind} ...", flush=True)
        rows.append(run_config(args.clients, dim, graph_kind, args.dropout, args.flower_budget_s))
        r = rows[-1]
        print(f"  Flower unmask {r['flower']['server_unmask_s']:.2f} s"
              f"{' (extrapolated)' if r['flower']['reconstruct_extrapolated'] else ''}, "
              f"secagg {r['ours_primitives']['unmask_s']:.3f} s, plain sum {r['plain_sum_s']:.4f} s", flush=True)
    print_table(rows)

    load = os.getloadavg()
    meta = {
        "flwr_version": flwr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_after": list(load),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.perf_counter() - started,
        "command": ("nice -n 5 /tmp/flwr-venv/bin/python benchmarks/bench_peer_flower.py " + " ".join(sys.argv[1:])).rstrip(),
        "flower_budget_s": args.flower_budget_s,
        "notes": [
            "Flower functions imported from the installed flwr package; same process, same run.",
            (
                "Flower server reconstructs shares of one benchmark client's secrets for every owner "
                "(cost depends on secret length and share count, not value)."
            ),
            (
                "Flower regenerates pairwise masks towards every neighbour of a dropped client (dropped "
                "ones included), as its workflow loop does; secagg only towards survivors."
            ),
            "Sparse configuration: both libraries use secagg's neighbourhoods and threshold.",
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "peer_flower.json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
        fh.write("\n")
    print(f"\nflwr {flwr.__version__}, {meta['machine']}, {os.cpu_count()} CPUs, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}, {meta['wall_s']:.0f} s; wrote {RESULTS / 'peer_flower.json'}")


if __name__ == "__main__":
    main()
