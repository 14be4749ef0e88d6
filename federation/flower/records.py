"""What the Flower workflow and the client mod put in Flower messages, besides sealed bytes.

Every secure-aggregation message is a Flower ``train`` message whose content holds one
``ConfigRecord`` under :data:`RECORD` with ``stage`` (str), ``round`` (int) and ``payload``
(bytes): the protocol's sealed message (``secagg.wire.seal``), or at the ``hello`` stage the
node's Ed25519 identity public key. The ``advertise`` request also carries ``directory``: a
:class:`FlowerDirectory` naming the round's parties.

Trust. Without a deployment CA the identity keys in the directory are the server's word:
the protocol's signatures then bind every message to the keys the server relayed, which
stops other clients but not a server that substitutes keys from the start. With a CA
(``secagg certs``), every node is given its credential directory in its node config
(``secagg-credentials``); it sends its certificate at ``hello``, the directory carries every
party's certificate, and a node checks each one against the CA before it uses a key. A node
with credentials refuses a directory without certificates. See docs/flower.md.

CKKS (``SecAggWorkflow(protection="ckks")``) runs the stages :data:`CKKS_STAGES` after ``hello``;
their first messages carry ``directory``: a :class:`FlowerCkksDirectory`. It needs the CA:
the clients take the key holder's role from its certificate, and each node names the key
holder it trusts in its node config (:data:`KEYHOLDER`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from privacy.events import SampledGaussianEvent, dpsgd_event
from secagg import wire
from secagg.errors import ConfigError

RECORD = "secagg"
CREDENTIALS = "secagg-credentials"  # node config key: the node's credential directory (secagg certs issue)
HELLO = "hello"  # the stage before the protocol: nodes send their identity keys
STAGES = (HELLO, "advertise", "share", "masked_input", "consistency", "unmask")
KEYHOLDER = "secagg-keyholder"  # node config key (ckks): the client id of the key holder this node trusts
# ckks: the key holder makes the round's keys; every node trains, encrypts and uploads; the key
# holder checks the forwarded uploads (one message per batch) and releases the sum
CKKS_KEYS, CKKS_UPLOAD, CKKS_DECRYPT = "ckks.keys", "ckks.upload", "ckks.decrypt"
CKKS_STAGES = (CKKS_KEYS, CKKS_UPLOAD, CKKS_DECRYPT)

# Metric keys a ClientApp sets (with dp_metrics) to tell the mod what its DP-SGD did.
DP_KEYS = ("secagg.dp.noise_multiplier", "secagg.dp.sample_rate", "secagg.dp.steps", "secagg.dp.max_grad_norm")


@wire.message
class FlowerDirectory(wire.Message):
    """Workflow -> every node at ``advertise``: who is who in this round.

    ``nodes`` maps protocol id -> Flower node id; ``identities`` maps protocol id -> Ed25519
    public key (the server's under ``SERVER_ID``). ``max_weight`` is the public normaliser of sample counts
    (weight = num_examples / max_weight). ``dp`` is the per-round DP-SGD spend the server
    records in its ledger: [noise_multiplier, sample_rate, steps, max_grad_norm], or empty.
    """

    TYPE = "flower.directory"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"identities": 32, "certificates": 8192}
    round: int
    nodes: dict[int, int]
    identities: dict[int, bytes]
    certificates: dict[int, bytes]  # protocol id -> CA-signed PEM (0: the server), or empty
    max_weight: float
    dp: tuple[float, ...]


@wire.message
class FlowerCkksDirectory(wire.Message):
    """Workflow -> nodes at the first ckks stage they take part in: the round's parties.

    ``ckks`` is the encoded :class:`~secagg.ckks.messages.CkksDirectory` (parameters, key
    holder, CA-signed certificates), which every node checks as over gRPC; ``nodes`` maps
    client id (from the certificates) -> Flower node id; ``max_weight`` and ``dp`` as in
    :class:`FlowerDirectory`.
    """

    TYPE = "flower.ckks_directory"
    round: int
    nodes: dict[int, int]
    max_weight: float
    dp: tuple[float, ...]
    ckks: bytes


@dataclass(frozen=True)
class FlowerPrivacy:
    """Record-level DP-SGD the ClientApps run, as the workflow records it in the ledger.

    Each round is recorded as one DP-SGD event of ``steps`` steps at sampling rate
    ``sample_rate`` with ``noise_multiplier`` (the worst client's: the largest rate, the most
    steps). Clients check, before they upload, that their own training is covered by it
    (the mod refuses otherwise), so the ledger never under-counts. ``ledger`` is the SQLite
    file; ``budget_epsilon`` and ``delta`` its budget.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    budget_epsilon: float
    ledger: str
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError("noise_multiplier must be positive")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError("sample_rate must be in (0, 1]")
        if self.steps < 1:
            raise ConfigError("steps (DP-SGD steps per round) must be at least 1")
        if not self.max_grad_norm > 0:
            raise ConfigError("max_grad_norm must be positive")

    def event(self) -> SampledGaussianEvent:
        return dpsgd_event(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                           steps=self.steps, max_grad_norm=self.max_grad_norm)

    def wire_plan(self) -> tuple[float, ...]:
        return (float(self.noise_multiplier), float(self.sample_rate), float(self.steps), float(self.max_grad_norm))


def dp_metrics(*, noise_multiplier: float, sample_rate: float, steps: int, max_grad_norm: float) -> dict[str, float]:
    """Metrics a ClientApp returns from ``fit`` to say what its DP-SGD did this round.

    The mod compares them with the spend the server records and refuses to upload an
    update the ledger would under-count; it never forwards them (nor any other metric).
    """
    return {
        DP_KEYS[0]: float(noise_multiplier), DP_KEYS[1]: float(sample_rate),
        DP_KEYS[2]: float(steps), DP_KEYS[3]: float(max_grad_norm),
    }
