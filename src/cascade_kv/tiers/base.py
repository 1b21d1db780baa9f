"""The interface every tier implements.

A tier stores, finds and frees bytes under a :data:`~cascade_kv.ids.BlockId`;
it knows nothing of keys, dtypes, protection or other tiers. The store moves
data between tiers and decides what a failure means. The contract:

* ``allocate`` reserves room and answers ``False`` when there is none: running
  out of room is an everyday outcome the store handles (by demoting), not an
  error. It never blocks and never evicts on its own.
* ``write`` fills an allocated block; ``read_into`` copies a whole block into a
  caller's buffer of exactly its size. Both may run outside the store's lock,
  concurrently for *different* blocks; the store guarantees a block is not
  freed while it is being read or written.
* ``free`` releases a block; afterwards ``contains`` is false and its bytes are
  never returned again.
* A tier that cannot do its job (I/O error, corrupted copy) raises; the store
  decides whether another copy makes that a miss.

Batch methods (``read_many``/``write_many``) have working defaults built on the
single-block ones, so every tier has them; a tier overrides them where batching
saves work (the host tier hoists its lookups and checks out of the loop; one
``io_uring`` submission, ...).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..ids import BlockId


class RoomModel:
    """A what-if copy of a tier's room: allocations and frees here change nothing in the tier.

    The store's dry run (:mod:`cascade_kv.dryrun`) replays a put's evictions against these to decide,
    before anything moves, whether the put can fit. This default counts bytes against ``capacity``,
    which is exact for a tier whose ``allocate`` does the same (the disk tier); a tier that can
    fragment (an arena) overrides :meth:`Tier.room_model`."""

    def __init__(self, capacity: int | None, used: int) -> None:
        self.capacity = capacity
        self.used = used

    def allocate(self, block_id: BlockId, nbytes: int) -> bool:
        if self.capacity is not None and self.used + nbytes > self.capacity:
            return False
        self.used += nbytes
        return True

    def free(self, block_id: BlockId, nbytes: int) -> None:
        self.used -= nbytes

    def copy(self) -> "RoomModel":
        return RoomModel(self.capacity, self.used)


@dataclass(frozen=True, slots=True)
class TierTraits:
    """What a tier can do, so the store can plan without knowing tier classes."""

    name: str
    """Short name used in stats and messages ("host", "disk", "gpu", "remote")."""
    memory: bool
    """True for memory tiers (they hold protected blocks; disk does not count as memory)."""
    persistent: bool
    """True when blocks survive the process (a reopened store can find them)."""
    addressable: bool
    """True when :meth:`Tier.view` exposes a block's bytes in place (one-copy reads, RMA windows)."""


class Tier(ABC):
    """Abstract tier: byte storage addressed by block id."""

    traits: TierTraits

    @property
    @abstractmethod
    def capacity(self) -> int | None:
        """Bytes this tier may hold; ``None`` when unlimited."""

    @property
    @abstractmethod
    def used(self) -> int:
        """Bytes currently allocated (including allocator rounding)."""

    @abstractmethod
    def allocate(self, block_id: BlockId, nbytes: int) -> bool:
        """Reserve room for ``nbytes`` under ``block_id``; ``False`` when it does not fit now."""

    @abstractmethod
    def write(self, block_id: BlockId, src: memoryview) -> None:
        """Copy ``src`` (exactly the allocated size, C-contiguous bytes) into the block."""

    @abstractmethod
    def read_into(self, block_id: BlockId, out: memoryview) -> None:
        """Copy the whole block into ``out`` (writable, exactly the block's size)."""

    @abstractmethod
    def free(self, block_id: BlockId) -> None:
        """Release the block. Freeing an unknown id raises ``KeyError``."""

    @abstractmethod
    def contains(self, block_id: BlockId) -> bool:
        """Whether the block is allocated here."""

    @abstractmethod
    def size_of(self, block_id: BlockId) -> int:
        """The block's size in bytes (``KeyError`` if absent)."""

    @abstractmethod
    def block_ids(self) -> Iterator[BlockId]:
        """Every block currently held (a snapshot)."""

    def trusted(self, block_id: BlockId) -> bool:
        """Whether the copy is known to match its digest without reading it. Memory tiers hold only bytes
        the store copied in; a tier whose copies can change behind its back (files) checks."""
        return True

    def fits(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` could ever fit in this tier, empty."""
        return self.capacity is None or nbytes <= self.capacity

    def room_model(self) -> RoomModel:
        """A what-if copy of this tier's room now (see :class:`RoomModel`)."""
        return RoomModel(self.capacity, self.used)

    def fits_now(self, sizes: Sequence[int]) -> bool:
        """Whether blocks of ``sizes`` can all be allocated right now, evicting nothing. May answer False
        when unsure (the store then runs its full dry run); never True when they would not fit."""
        return self.capacity is None or self.used + sum(sizes) <= self.capacity

    def view(self, block_id: BlockId) -> memoryview:
        """The block's bytes in place; only for ``traits.addressable`` tiers."""
        raise NotImplementedError(f"{self.traits.name} tier is not addressable")

    def read_many(self, block_ids: Sequence[BlockId], outs: Sequence[memoryview]) -> None:
        for block_id, out in zip(block_ids, outs, strict=True):
            self.read_into(block_id, out)

    def write_many(self, block_ids: Sequence[BlockId], srcs: Sequence[memoryview]) -> None:
        for block_id, src in zip(block_ids, srcs, strict=True):
            self.write(block_id, src)

    def close(self) -> None:
        """Release the tier's resources; the tier is unusable afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.traits.name} used={self.used} capacity={self.capacity}>"
