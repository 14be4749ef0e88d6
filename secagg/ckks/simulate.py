"""``aggregate_ckks``: run one real CKKS (or BFV) round in process.

Real keys, real ciphertexts, real signatures: a key holder, one client object per row and
a key-less server exchange the same sealed bytes a deployment would send. The only
shortcut is that simulated clients share one loaded copy of the (identical) public
context.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager

import numpy as np

from secagg.ckks.params import HeParams
from secagg.ckks.roles import (
    KEYHOLDER_ID,
    HeServer,
    KeyHolder,
    RoundConfig,
    SplitClient,
    combine_shares,
    new_round_id,
)
from secagg.ckks.session import (
    ClientSession,
    KeyHolderSession,
    Outcome,
    Roster,
    ServerSession,
    Timer,
)
from secagg.errors import ConfigError, InputError
from secagg.keys import IdentityKey
from secagg.result import AggregateResult

# A client listed under any of these stages never uploads and is left out of the sum.
PRE_UPLOAD_STAGES = ("advertise", "share", "masked_input", "upload")
# Stages after the upload (the masking protocol's names): the ciphertext is already in.
POST_UPLOAD_STAGES = ("consistency", "unmask", "decrypt")


def aggregate_ckks(
    updates: np.ndarray,
    *,
    dropouts: Mapping[str, Sequence[int]] | None = None,
    clip: float | None = None,
    weights: Sequence[float] | None = None,
    scheme: str = "ckks",
    params: HeParams | None = None,
    value_bound: float | None = None,
    min_clients: int = 2,
    release_grid_bits: int | None = None,
    precompute: bool = True,
    key_holders: int = 1,
    keyholders: Sequence[IdentityKey] | None = None,
    **unsupported,
) -> AggregateResult:
    """Sum the rows of ``updates`` under homomorphic encryption; see :func:`secagg.aggregate`.

    ``scheme`` picks the default parameters of "ckks" (poly 8192, [60, 40], scale 2^40) or
    "bfv" (quantized, half the upload); ``params`` overrides them. ``clip`` clips each row
    to that L2 norm first. ``value_bound`` (default: ``clip``, else the largest |x|) is the
    public per-coordinate bound every client checks. With ``weights`` (sample counts),
    ``total`` is the weighted sum sum_i w_i x_i over ``included``: each client encrypts
    f_i * x_i and f_i = w_i / sum(w) in an extra slot, so the weight sum of exactly the
    summed clients comes back from the decryption, and the server never sees a weight.
    FedAvg is ``total / parameters["weight_sum"]`` (the decrypted weight sum, equal to
    ``sum(weights[included])`` up to the error bound). ``key_holders`` > 1 (with
    ``scheme="bfv"``) splits every update into additive shares, one per key holder, so that
    no single key holder can decrypt anything (the upload grows by that factor). Every key
    holder always re-adds the signed uploads the server forwards and refuses an aggregate
    that is not their sum (it is not optional; its time is in ``keyholder.decrypt``).
    ``keyholders``: the Ed25519 identities of the key holder(s) (default: fresh ones); every
    client is built with their public keys and accepts only contexts they signed.
    ``timings`` for ``client.*`` are per client means.
    """
    if unsupported:
        raise ConfigError(
            f"the ckks protocol does not take {sorted(unsupported)}; distributed DP noise and fixed-point "
            "options belong to the masking protocol (add central DP noise to the decrypted sum instead)"
        )
    x = np.asarray(updates, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise InputError(f"updates must be a non-empty (n_clients, dim) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("updates contain NaN or infinity")
    n, d = x.shape
    if params is None:
        params = HeParams.ckks() if scheme == "ckks" else HeParams.bfv() if scheme == "bfv" else None
        if params is None:
            raise ConfigError(f"scheme must be 'ckks' or 'bfv', got {scheme!r}")
    if clip is not None:
        if not clip > 0:
            raise ConfigError(f"clip must be positive, got {clip}")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x * np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    dropped, skip = _dropouts(dropouts, n)
    fractions = _fractions(weights, n)
    bound = float(value_bound if value_bound is not None else clip if clip is not None else np.max(np.abs(x)))
    if bound <= 0:
        bound = 1.0  # all-zero updates
    grid = {} if release_grid_bits is None else {"release_grid_bits": release_grid_bits}
    round = RoundConfig(new_round_id(), d, n, params, bound, fractions is not None, min_clients,
                        key_holders=key_holders, **grid)
    split = key_holders > 1

    if keyholders is not None and len(keyholders) != key_holders:
        raise ConfigError(f"keyholders lists {len(keyholders)} identities, the round has {key_holders} key holders")
    identities = {i: IdentityKey.generate() for i in range(n)}
    times = PhaseTimes()
    if split:
        result, upload_bytes = _split_round(round, x, skip, fractions, precompute, keyholders, identities, times)
        total, error, weight_sum, included = result.values, result.error_bound, result.weight_sum, result.included
    else:
        out, upload_bytes = _single_round(round, x, skip, fractions, precompute, keyholders, identities, times)
        total, error, weight_sum, included = out.total, out.error_bound, out.weight_sum, out.included
    senders = max(n - len(skip), 1)
    timings = {
        "keyholder.keygen": times["keyholder.keygen"],
        "server.setup": times["server.setup"],
        "client.setup": times["client.setup"] / senders,
        "client.precompute": times["client.precompute"] / senders,
        "client.encrypt": (times["client.encrypt"] + times["client.sign"]) / senders,
        "server.sum": times["server.receive"] + times["server.aggregate"],
        "keyholder.decrypt": times["keyholder.verify"] + times["keyholder.release"],
    }
    extra: dict[str, float] = {}
    if fractions is not None:
        w_total = float(np.sum(np.asarray(weights, dtype=np.float64)))
        total, error = total * w_total, error * w_total
        # the included clients' weight sum, as decrypted from the weight slots
        extra["weight_sum"] = float(weight_sum) * w_total
    return AggregateResult(
        total=total,
        included=included,
        bytes_up_per_param=upload_bytes / d,
        timings=timings,
        protocol="ckks",
        max_quantization_error=float(error),
        dropped=dropped,
        parameters={
            "scheme": params.scheme,
            "poly_modulus_degree": params.poly_modulus_degree,
            "coeff_mod_bit_sizes": ",".join(map(str, params.coeff_mod_bit_sizes)),
            "scale_bits": params.scale_bits,
            "plain_modulus_bits": params.plain_modulus_bits,
            "slots": params.slots,
            "value_bound": round.value_bound,
            "release_grid_bits": round.release_grid_bits if params.scheme == "ckks" else 0,
            "min_clients": round.min_clients,
            "key_holders": round.key_holders,
            **extra,
        },
    )


class PhaseTimes:
    """A session timer (see :mod:`secagg.ckks.session`): total seconds per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started

    def __getitem__(self, phase: str) -> float:
        return self.seconds.get(phase, 0.0)


def run_round(server: ServerSession, parties: Mapping[int, KeyHolderSession | ClientSession]) -> Outcome:
    """Drive one round in process: deliver each stage's messages, hand back the replies.

    A party missing from ``parties`` never answers (it dropped before the stage).
    """
    out = server.start()
    while not server.done:
        for pid, payload in out.items():
            if pid in parties:
                server.receive(pid, parties[pid].receive(payload))
        out = server.close_stage()
    return server.outcome()


def single_round_sessions(
    round: RoundConfig, updates: np.ndarray, *, skip: AbstractSet[int] = frozenset(), fractions: np.ndarray | None = None,
    precompute: bool = True, keyholder: IdentityKey | None = None,
    identities: Mapping[int, IdentityKey] | None = None, timer: Timer | None = None,
) -> tuple[ServerSession, dict[int, KeyHolderSession | ClientSession]]:
    """The server and parties of an in-process round: rows are clients 0..n-1, the key holder
    is the separate party :data:`KEYHOLDER_ID` (it contributes no update here)."""
    n = updates.shape[0]
    identities = identities or {i: IdentityKey.generate() for i in range(n)}
    holder = keyholder or IdentityKey.generate()
    server_identity = IdentityKey.generate()
    roster = Roster(0, tuple(range(n)), KEYHOLDER_ID, {i: identities[i].public_bytes for i in range(n)},
                    holder.public_bytes, server_identity.public_bytes)
    parties: dict[int, KeyHolderSession | ClientSession] = {
        KEYHOLDER_ID: KeyHolderSession(round, roster, holder, timer=timer)
    }
    for i in range(n):
        if i not in skip:
            weight = None if fractions is None else float(fractions[i])
            parties[i] = ClientSession(round, roster, i, identities[i], updates[i], weight=weight,
                                       precompute=precompute, timer=timer)
    return ServerSession(round, roster, server_identity, timer=timer), parties


def _single_round(round, x, skip, fractions, precompute, keyholders, identities, times) -> tuple[Outcome, float]:
    server, parties = single_round_sessions(
        round, x, skip=skip, fractions=fractions, precompute=precompute,
        keyholder=keyholders[0] if keyholders else None, identities=identities, timer=times,
    )
    outcome = run_round(server, parties)
    return outcome, float(np.mean([len(u) for u in server.he_server.uploads]))


def _split_round(round, x, skip, fractions, precompute, keyholders, identities, times):
    """Split-trust BFV round (k key holders, one key-less sum per key); uploads sent per key holder."""
    k = round.key_holders
    client_keys = {i: ident.public_bytes for i, ident in identities.items()}
    with times("keyholder.keygen"):
        holders = [KeyHolder(round, identity) for identity in (keyholders or [None] * k)]
        client_ctxs = [h.context_for_clients() for h in holders]
        server_ctxs = [h.context_for_server() for h in holders]
    # the clients' pinned key-holder keys come from the caller's argument when it names them
    holder_keys = [ident.public_bytes for ident in keyholders] if keyholders else [h.public_key for h in holders]
    with times("server.setup"):
        servers = [HeServer(round, ctx, key, client_keys) for ctx, key in zip(server_ctxs, holder_keys)]
    uploads = []
    for i in range(x.shape[0]):
        if i in skip:
            continue
        with times("client.setup"):
            client = SplitClient(i, round, client_ctxs, holder_keys, identities[i])
        if precompute:
            with times("client.precompute"):
                client.precompute()
        with times("client.encrypt"):
            uploads.append(client.encrypt(x[i], weight=None if fractions is None else float(fractions[i])))
    with times("server.receive"):
        aggregates = []
        for j, server in enumerate(servers):
            for parts in uploads:
                server.receive(parts[j])
            aggregates.append(server.aggregate())
    with times("keyholder.verify"):  # each key holder re-adds the uploads its server state added
        shares = [h.decrypt_share(a, s.public_key, s.uploads, client_keys)
                  for h, a, s in zip(holders, aggregates, servers)]
    result = combine_shares(round, shares)
    return result, float(np.mean([sum(map(len, u)) for u in uploads]))


def _dropouts(dropouts: Mapping[str, Sequence[int]] | None, n: int) -> tuple[dict[str, tuple[int, ...]], set[int]]:
    dropped: dict[str, tuple[int, ...]] = {}
    skip: set[int] = set()
    for stage, rows in (dropouts or {}).items():
        if stage not in PRE_UPLOAD_STAGES + POST_UPLOAD_STAGES:
            raise ConfigError(
                f"unknown dropout stage {stage!r}; ckks knows {PRE_UPLOAD_STAGES + POST_UPLOAD_STAGES}"
            )
        idx = tuple(sorted({int(i) for i in rows}))
        if any(not 0 <= i < n for i in idx):
            raise ConfigError(f"dropout stage {stage!r} lists a client outside 0..{n - 1}")
        dropped[stage] = idx
        if stage in PRE_UPLOAD_STAGES:
            skip.update(idx)
    return dropped, skip


def _fractions(weights: Sequence[float] | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ConfigError(f"weights must have one entry per client ({n}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ConfigError("weights must be positive finite numbers (e.g. sample counts)")
    return w / w.sum()
