"""What a store tells about one key: a value type every store implementation and the daemon's client share
(the distributed store imports it from here, not from the single-node store)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What ``info(key)`` tells about a key, on every store (see :mod:`cascade_kv.contract`)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    prefix: bool
    digest: str
    """Hex digest of the value's bytes (its content address)."""
    tiers: tuple[str, ...]
    """Tiers holding a copy, fastest first."""
    shared_by: int
    """Keys referring to the same block (1 when nothing deduplicated with it)."""
