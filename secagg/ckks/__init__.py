"""CKKS (and quantized BFV) homomorphic aggregation with TenSEAL; the server holds no key.

Recipe: ``secagg.aggregate(updates, protection="ckks")``. Building blocks for a deployment:
:class:`HeRoundConfig` (public round parameters), :class:`KeyHolder` (decryptor: the only
party with a secret key), :class:`HeClient` (public key: encrypt only) and
:class:`HeServer` (no key: authenticate and add). Split-trust BFV rounds
(``HeRoundConfig(key_holders=k)``) use :class:`SplitClient`, :meth:`KeyHolder.decrypt_share`
and :func:`combine_shares`. One round of these roles, as sans-IO state machines that every
link (in process, gRPC, benchmark) drives: :mod:`secagg.ckks.session`. Roles, what each
can learn and what collusion breaks are in docs/threat-model.md; parameters and
measurements in docs/ckks.md.
"""

from secagg.ckks.params import HeParams
from secagg.ckks.roles import (
    KEYHOLDER_ID,
    SERVER_ID,
    DecryptedShare,
    DecryptedSum,
    HeClient,
    HeRoundConfig,
    HeServer,
    KeyHolder,
    SplitClient,
    combine_shares,
    fingerprint,
    new_round_id,
)
from secagg.ckks.simulate import aggregate_ckks

__all__ = [
    "KEYHOLDER_ID",
    "SERVER_ID",
    "DecryptedShare",
    "DecryptedSum",
    "HeClient",
    "HeParams",
    "HeRoundConfig",
    "HeServer",
    "KeyHolder",
    "SplitClient",
    "aggregate_ckks",
    "combine_shares",
    "fingerprint",
    "new_round_id",
]
