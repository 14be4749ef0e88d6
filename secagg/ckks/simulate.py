"""``aggregate_ckks``: run one real CKKS (or BFV) round in process.

The in-process link: the same sessions the gRPC mode drives (:mod:`secagg.ckks.session`),
moved by the one round loop, :func:`secagg.rounds.drive`. Real keys, real ciphertexts, real
signatures: the key holder(s), one client session per row and a key-less server exchange
the same sealed bytes a deployment would send. The only shortcut is that simulated clients share one loaded copy
of the (identical) public context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from secagg.ckks.mode import CkksServerRound
from secagg.ckks.params import HeParams
from secagg.ckks.roles import HeRoundConfig, new_round_id
from secagg.ckks.session import (
    FORWARD_BYTES,
    ClientSession,
    KeyHolderSession,
    Outcome,
    Roster,
    ServerSession,
)
from secagg.errors import ConfigError, InputError
from secagg.keys import IdentityKey
from secagg.rounds import RoundOutcome
from secagg.rounds import InMemoryLink, PhaseTimes, Timer, drive

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
) -> RoundOutcome:
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
    plan = plan_ckks(updates, dropouts=dropouts, clip=clip, weights=weights, scheme=scheme, params=params,
                     value_bound=value_bound, min_clients=min_clients, release_grid_bits=release_grid_bits,
                     key_holders=key_holders, unsupported=unsupported)
    if keyholders is not None and len(keyholders) != key_holders:
        raise ConfigError(f"keyholders lists {len(keyholders)} identities, the round has {key_holders} key holders")
    times = PhaseTimes()
    server, parties = round_sessions(plan.round, plan.x, skip=plan.skip, fractions=plan.fractions,
                                     precompute=precompute, keyholders=keyholders, timer=times)
    return ckks_result(plan, server, run_round(server, parties), times)


@dataclass(frozen=True)
class CkksPlan:
    """One ckks round planned from a caller's updates and options, before any party exists.

    ``x`` are the (clipped) updates, row i is party i; ``skip`` the rows that never upload;
    ``fractions`` the weight fractions (None: unweighted). Every link (in process, Ray)
    builds its parties from this and hands the outcome to :func:`ckks_result`.
    """

    round: HeRoundConfig
    x: np.ndarray
    dropped: dict[str, tuple[int, ...]]
    skip: frozenset[int]
    fractions: np.ndarray | None
    weights: Sequence[float] | None


def plan_ckks(
    updates: np.ndarray, *, dropouts: Mapping[str, Sequence[int]] | None = None, clip: float | None = None,
    weights: Sequence[float] | None = None, scheme: str = "ckks", params: HeParams | None = None,
    value_bound: float | None = None, min_clients: int = 2, release_grid_bits: int | None = None,
    key_holders: int = 1, unsupported: Mapping[str, object] | None = None,
) -> CkksPlan:
    """Check the inputs and plan the round (see :func:`aggregate_ckks` for the arguments)."""
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
    round = HeRoundConfig(new_round_id(), d, n, params, bound, fractions is not None, min_clients,
                        key_holders=key_holders, **grid)
    return CkksPlan(round, x, dropped, frozenset(skip), fractions, weights)


def ckks_result(plan: CkksPlan, server: ServerSession, out: Outcome, times: PhaseTimes) -> RoundOutcome:
    """The :class:`RoundOutcome` of a finished round; ``times`` holds every party's phases."""
    round, params = plan.round, plan.round.params
    n, d = plan.x.shape
    total, error, weight_sum = out.total, out.error_bound, out.weight_sum
    # bytes one client uploads: its part for every key holder
    upload_bytes = sum(float(np.mean([len(u) for u in he.uploads])) for he in server.he_servers)
    senders = max(n - len(plan.skip), 1)
    timings = {
        "keyholder.keygen": times["keyholder.keygen"],
        "server.setup": times["server.setup"],
        "client.setup": times["client.setup"] / senders,
        "client.precompute": times["client.precompute"] / senders,
        "client.encrypt": (times["client.encrypt"] + times["client.sign"]) / senders,
        "server.sum": times["server.receive"] + times["server.aggregate"],
        "keyholder.decrypt": times["keyholder.verify"] + times["keyholder.release"] + times["server.combine"],
    }
    extra: dict[str, float] = {}
    if plan.fractions is not None:
        w_total = float(np.sum(np.asarray(plan.weights, dtype=np.float64)))
        total, error = total * w_total, error * w_total
        # the included clients' weight sum, as decrypted from the weight slots
        extra["weight_sum"] = float(weight_sum) * w_total
    return RoundOutcome(
        total=total,
        included=out.included,
        bytes_up_per_param=upload_bytes / d,
        timings=timings,
        protection="ckks",
        max_quantization_error=float(error),
        dropped=plan.dropped,
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


def run_round(server: ServerSession, parties: Mapping[int, KeyHolderSession | ClientSession]) -> Outcome:
    """Drive one round in process (:func:`secagg.rounds.drive` over an in-memory link).

    A party missing from ``parties`` never answers (it dropped before the stage).
    """
    drive(CkksServerRound(server), InMemoryLink(parties))
    return server.outcome()


def round_sessions(
    round: HeRoundConfig, updates: np.ndarray, *, skip: AbstractSet[int] = frozenset(),
    fractions: np.ndarray | None = None, precompute: bool = True, keyholders: Sequence[IdentityKey] | None = None,
    timer: Timer | None = None, forward_bytes: int = FORWARD_BYTES,
) -> tuple[ServerSession, dict[int, KeyHolderSession | ClientSession]]:
    """The server and parties of an in-process round. Rows are clients 0..n-1; the key
    holders are separate parties n, n+1, ... (they contribute no update here) with the
    identities ``keyholders`` (default: fresh ones), which every client's roster pins.
    Clients in ``skip`` are left out (they never answer). ``forward_bytes``: see
    :class:`~secagg.ckks.session.ServerSession`."""
    n, k = updates.shape[0], round.key_holders
    identities = [IdentityKey.generate() for _ in range(n)]
    holders = list(keyholders) if keyholders is not None else [IdentityKey.generate() for _ in range(k)]
    server_identity = IdentityKey.generate()
    roster = Roster(0, tuple(range(n)), tuple(range(n, n + k)), {i: ident.public_bytes for i, ident in enumerate(identities)},
                    tuple(h.public_bytes for h in holders), server_identity.public_bytes)
    parties: dict[int, KeyHolderSession | ClientSession] = {
        n + j: KeyHolderSession(round, roster, n + j, ident, timer=timer) for j, ident in enumerate(holders)
    }
    for i in range(n):
        if i not in skip:
            weight = None if fractions is None else float(fractions[i])
            parties[i] = ClientSession(round, roster, i, identities[i], updates[i], weight=weight,
                                       precompute=precompute, timer=timer)
    return ServerSession(round, roster, server_identity, timer=timer, forward_bytes=forward_bytes), parties


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
