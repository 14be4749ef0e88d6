"""Pieces both sides of the masking protocol compute identically."""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Mapping

import numpy as np

from secagg.encoding import FixedPointCodec
from secagg.errors import WireError
from secagg.graph import Graph, complete_graph, sparse_graph
from secagg.keys import LABEL_PAIRWISE_MASK, agree, pair_context
from secagg.protocol.messages import AdvertiseKeys, RoundConfig
from secagg.wire import SERVER_ID  # noqa: F401 -- re-exported for the masking modules

SECRET_BYTES = 32


class Stage(enum.Enum):
    """Protocol stages, in order (Bonawitz et al. 2017, rounds 0-4)."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


STAGE_NAMES: tuple[str, ...] = tuple(s.value for s in Stage)
# A client that drops at one of these stages never delivers its masked input, so it is
# left out of the sum; one that drops later has already uploaded and still counts.
PRE_UPLOAD_STAGE_NAMES: tuple[str, ...] = (Stage.ADVERTISE.value, Stage.SHARE.value, Stage.MASKED_INPUT.value)


def round_digest(round_id: bytes, adverts: Mapping[int, AdvertiseKeys]) -> bytes:
    """Hash of the round id and every signed advert: the graph seed, and what consistency signatures bind.

    The server cannot choose it: the adverts carry every honest client's fresh keys, drawn
    after the round id is fixed. It can only grind, by relaying a different subset of adverts
    or re-drawing its colluders' keys, one hash per try; the planner assumes 2^40 tries
    (``ClientPolicy.grinding_bits``).
    """
    h = hashlib.sha256(b"secagg/v2/round-digest|" + round_id)
    for client in sorted(adverts):
        advert = adverts[client]
        h.update(client.to_bytes(4, "big") + advert.cipher_public_key + advert.mask_public_key)
    return h.digest()


@functools.lru_cache(maxsize=8)
def graph_of(config: RoundConfig, seed: bytes) -> Graph:
    """The round's graph over all its clients; ``seed`` is :func:`round_digest` of the adverts.

    Built once per (configuration, seed) and shared by every party in the process: a sparse
    graph costs one key derivation per client (the public permutation), so n clients
    simulated in one process would otherwise derive n^2 keys. The graph is public, so
    sharing it reveals nothing.
    """
    if config.degree >= len(config.clients) - 1:
        return complete_graph(config.clients, config.threshold)
    return sparse_graph(config.clients, degree=config.degree, threshold=config.threshold, seed=seed)


def codec_of(config: RoundConfig) -> FixedPointCodec:
    return FixedPointCodec(
        clip=config.clip, scale=config.scale, bits=config.bits,
        max_clients=len(config.clients), clip_mode=config.clip_mode, headroom=config.headroom,
    )


def pairwise_seed(round_id: bytes, my_mask_private, me: int, peer: int, peer_mask_public: bytes) -> bytes:
    """The PRG seed two clients share for their pairwise mask in this round."""
    return agree(my_mask_private, peer_mask_public, label=LABEL_PAIRWISE_MASK, context=pair_context(round_id, me, peer))


def pairwise_sign(me: int, peer: int) -> int:
    """The lower id adds the pairwise mask, the higher id subtracts it, so they cancel."""
    return 1 if me < peer else -1


def bytes_per_element(bits: int) -> int:
    return (bits + 7) // 8


def pack_residues(residues: np.ndarray, bits: int) -> bytes:
    """uint32 residues mod 2^bits -> ceil(bits/8) little-endian bytes each."""
    width = bytes_per_element(bits)
    raw = np.ascontiguousarray(residues, dtype="<u4")
    if width == 4:
        return raw.tobytes()
    return raw.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()


def unpack_residues(data: bytes, dim: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_residues`; at 32 bits a read-only view of ``data`` (no copy)."""
    width = bytes_per_element(bits)
    if len(data) != dim * width:
        raise WireError(f"masked vector must be {dim * width} bytes for dim={dim}, bits={bits}; got {len(data)}")
    if width == 4:
        return np.frombuffer(data, dtype="<u4")
    padded = np.zeros((dim, 4), dtype=np.uint8)
    padded[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(dim, width)
    return padded.view("<u4").reshape(dim).astype(np.uint32)


def seed_commitment(round_id: bytes, client: int, seed: bytes) -> bytes:
    """Binding commitment to a self-mask seed (SHA-256, domain separated)."""
    return hashlib.sha256(b"secagg/v1/self-seed|" + round_id + client.to_bytes(8, "big") + seed).digest()
