"""Where a block's copies live: the metadata the store keeps per key and per block.

Kept apart from the store so that its parts (puts, reads, the key table,
placement, the promoter, persistence), which all work on these records, can
live in small modules of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .ids import BlockId, StoreKey

if TYPE_CHECKING:
    from .namespace import Space


class Entry(NamedTuple):
    """What a key refers to. A NamedTuple rather than a frozen dataclass: one is made per key a put stores,
    and a frozen dataclass's ``__init__`` (a ``object.__setattr__`` per field) cost 0.5 us of a 4 KiB put's
    10 us budget, the tuple 0.2 us. Immutable all the same; compared by identity where it matters."""

    block_id: BlockId
    dtype: np.dtype
    shape: tuple[int, ...]
    prefix: bool  # put with is_prefix=True and not unprotected since


@dataclass(slots=True)
class Block:
    """A stored run of bytes, shared by every key whose value has these bytes (with dedup on)."""

    id: BlockId
    nbytes: int
    keys: set[StoreKey] = field(default_factory=set)  # reverse index: a drop must remove every key of the block
    protected: int = 0  # how many of `keys` are prefix keys; > 0 means the block stays in memory
    where: int = 0  # bit i set: tiers[i] holds a copy. A bitmask keeps "fastest copy" a bit trick
    ready: bool = False  # False while the first copy is being written (other puts of these bytes wait)
    pins: int = 0  # copies in flight outside the lock; while > 0 no copy is freed or reused
    moving: bool = False  # being demoted: not a victim again until that finishes
    rising: bool = False  # being copied up into memory (protect, promotion): one such copy at a time
    queued: bool = False  # waiting for the promoter thread: queued once however often it is read meanwhile
    lower_reads: int = 0  # reads served below the top tier since the last promotion
    reads: int = 0  # reads since it was stored, any tier: the policy's reuse class
    lost: bool = False  # every copy failed its digest check; a put of the same bytes heals it
    space: Space | None = None  # the namespace whose keys refer to it (a block id is never shared by two);
    # None: the default one. Events on the block (evictions, demotions, ...) count in its namespace's stats


@dataclass(slots=True)
class Plan:
    """The blocks one put batch touches, pinned from planning until commit or abandon."""

    fresh: list[Block] = field(default_factory=list)  # blocks this put writes (new, or lost and healed)
    held: dict[BlockId, Block] = field(default_factory=dict)  # every distinct block of the batch
    tiers: dict[BlockId, int] = field(default_factory=dict)  # where the dry run placed each fresh block
    placing: bool = False  # counted in the promoter's placements (it waits for them): undone at commit or abandon


def fastest(where: int) -> int:
    return (where & -where).bit_length() - 1

