"""Peak memory of one in-process masking round on large updates.

Builds N float32 updates of d parameters (the input: N x 4 B x d), runs one real round
(complete graph, no dropout, so every client adds N - 1 pairwise masks), and prints the
process's peak resident memory (``resource.getrusage``) against the input size, and the
round's time against the AES-256-CTR keystream it had to generate (measured in the same
run). Run each configuration in a fresh process, since peak RSS never goes down:

    python benchmarks/bench_memory.py --clients 20 --dim 1e7
    python benchmarks/bench_memory.py --clients 3 --dim 1.1e8     # BERT-base sized update
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--dim", type=float, default=1e7)
    args = parser.parse_args()
    n, d = args.clients, int(args.dim)

    from secagg.bench.timing import keystream_rate
    from secagg.protocol.simulate import aggregate_masking

    rate = keystream_rate(runs=3)
    before_input = peak_rss_bytes()
    updates = np.empty((n, d), dtype=np.float32)
    rng = np.random.default_rng(0)  # benchmark data, not secret
    for row in updates:
        row[:] = rng.random(d, dtype=np.float32) * 2 - 1
    input_bytes = updates.nbytes
    started = time.perf_counter()
    result = aggregate_masking(updates, clip=1.0, clip_mode="coordinate")
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    # Keystream the round generates: per client, its self mask, N - 1 pairwise masks and
    # the rounding stream (two words per entry); the server regenerates N self masks.
    keystream = (n * (1 + (n - 1) + 2) + n) * d * 4
    check = slice(0, min(d, 1 << 20))
    exact = np.zeros(check.stop)
    for row in updates:  # one row at a time, so the check adds 8 MB, not N x 8 MB
        exact += row[check]
    error = float(np.max(np.abs(result.total[check] - exact)))
    print(json.dumps({
        "clients": n, "dim": d,
        "input_bytes": input_bytes,
        "peak_rss_bytes": peak,
        "peak_rss_over_input": peak / input_bytes,
        "rss_before_input_bytes (interpreter and libraries)": before_input,
        "peak_minus_input_over_one_update": (peak - input_bytes) / (4 * d),
        "round_s": seconds,
        "aes256_ctr_bytes_per_s": rate,
        "keystream_bytes": keystream,
        "round_over_keystream_limit": seconds / (keystream / rate),
        "timings": result.timings,
        "max_abs_error_first_1Mi": error,
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=1))


if __name__ == "__main__":
    main()
