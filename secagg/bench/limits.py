"""Argument checks shared by the benchmarks: sizes a run can hold, before anything is allocated."""

from __future__ import annotations

import math
import os

from secagg.errors import ConfigError
from secagg.protocol.messages import MAX_DIM

#: bytes a benchmark holds per update entry at its peak (the float32 inputs, their encoded
#: and masked copies, the server's running sum): a generous estimate, so a refused size
#: would really not fit
BYTES_PER_ENTRY = 16


def check_bench_size(*, clients: object, dim: object, dropout: object = 0.0) -> tuple[int, int]:
    """(clients, dim) as integers; a size that is not a count, or cannot fit, is a ConfigError."""
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 2:
        raise ConfigError(f"--clients must be a whole number >= 2 (a sum needs two clients), got {clients}")
    if isinstance(dim, bool) or not isinstance(dim, (int, float)) or not math.isfinite(dim) \
            or dim != int(dim) or dim < 1:
        raise ConfigError(f"--dim must be a whole number >= 1 (e.g. 1e5), got {dim}")
    if int(dim) > MAX_DIM:
        raise ConfigError(f"--dim {int(dim):.3g} exceeds the largest update a client accepts "
                          f"({MAX_DIM:,} = 2^28 parameters)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"--dropout is the fraction of clients dropping, in [0, 1); got {dropout}")
    need = clients * int(dim) * BYTES_PER_ENTRY
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound known
        have = None
    if have and need > have:
        raise ConfigError(f"{clients} clients x {int(dim):,} parameters need about {need / 2**30:.0f} GiB of "
                          f"memory; this machine has {have / 2**30:.0f} GiB. Lower --clients or --dim")
    return clients, int(dim)
