"""Fuzzing the ckks ingestion path in a memory-capped subprocess (slow).

A registered (so correctly signing) but malicious client flips random bits in its own
TenSEAL bytes. Every upload must end in InvalidCiphertext or be a well-formed ciphertext
(CKKS is malleable: a flip inside the coefficients is a valid ciphertext of garbage), and
neither the server nor the key holder may crash, hang or allocate gigabytes. The child
runs under RLIMIT_AS, so a huge allocation kills it and fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tenseal")

CHILD = textwrap.dedent(
    """
    import json, random, resource, sys
    import numpy as np
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))   # 2 GiB
    from secagg.ckks import HeClient, HeParams, HeServer, KeyHolder, HeRoundConfig, new_round_id
    from secagg.ckks.roles import _load_vector
    from secagg.errors import InvalidCiphertext
    from secagg.keys import IdentityKey

    scheme, flips, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    params = HeParams.ckks() if scheme == "ckks" else HeParams.bfv()
    cfg = HeRoundConfig(new_round_id(), 300, 2, params)
    holder = KeyHolder(cfg)
    ident = IdentityKey.generate()
    cctx, sctx = holder.context_for_clients(), holder.context_for_server()
    rng = random.Random(seed)
    counts = {"rejected": 0, "accepted": 0, "decrypted": 0}
    for k in range(flips):
        client = HeClient(0, cfg, cctx, holder.public_key, ident)
        (chunk,) = client.encrypt_chunks(np.full(300, 0.5))
        bad = bytearray(chunk)
        for _ in range(1 + k % 3):
            limit = 96 if k % 2 else len(bad)   # half of the flips hit the headers
            pos = rng.randrange(limit)
            bad[pos] ^= 1 << rng.randrange(8)
        server = HeServer(cfg, sctx, holder.public_key, {0: ident.public_bytes})
        try:
            server.receive(client.seal_upload((bytes(bad),)))
        except InvalidCiphertext:
            counts["rejected"] += 1
            continue
        counts["accepted"] += 1
        try:  # the key holder parses and decrypts what the server accepted
            vec = _load_vector(holder._ctx, bytes(bad), cfg, cfg.chunk_sizes[0])  # BFV: 300 + check slots
            values = vec.decrypt()
            assert len(values) == cfg.chunk_sizes[0]
            counts["decrypted"] += 1
        except InvalidCiphertext:
            pass
    print(json.dumps(counts))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["ckks", "bfv"])
def test_bit_flips_signed_by_a_registered_client_never_crash(scheme):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, scheme, "1500", "2024"],
        check=False, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["rejected"] + counts["accepted"] == 1500
    assert counts["rejected"] > 0
    assert counts["decrypted"] == counts["accepted"]
