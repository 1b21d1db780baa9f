"""Slot headers: 64 bytes in front of each block of an arena that peers read without its owner.

A peer reads a block with a one-sided Get while the owner keeps computing, so
the owner may free the block, or free it and put another block in its place,
during the read. The header lets the reader tell: the owner writes it *last*
when a block's bytes are in place, and overwrites it with a tombstone *first*
when the block is freed or rewritten. A reader that sees the expected header
both before and after copying the bytes copied exactly that block (seqlock
style; the argument is spelled out in :mod:`cascade_kv.cluster.rma`).

A generation number, unique per write in the process and never reused, names
one incarnation of a slot: a reader holding an old location finds another
generation (or a tombstone) there and retries through the directory. Hashing
the bytes on every remote read was rejected: BLAKE3 at ~7 GB/s would halve a
14 GB/s Get. The digest prefix still guards the case a generation cannot:
an arena reopened by a new process, whose counter starts again.

This is cluster knowledge, so it lives here and not in the host tier: a
:class:`SlotArena` stores each block in a plain :class:`~cascade_kv.tiers.HostTier`
as header + bytes under the block's id, and the tier never learns that anyone
else reads its memory.

Layout (little endian, one cache line, so the header never straddles two)::

    0   magic       u64   MAGIC: this is a slot header at all
    8   generation  u64   0 = free / being written (tombstone)
    16  nbytes      u64   the block's size
    24  digest16    16 B  first 16 bytes of the block id
    40  padding     24 B  zero
"""
from __future__ import annotations

import functools
import itertools
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import InternalError
from ..ids import BlockId
from ..memcopy import copy_bytes
from ..tiers import HostTier, Tier, TierTraits
from ..tiers.host import copy_view_into
from ..tiers.base import RoomModel

SLOT_HEADER = 64
"""Bytes of header in front of each block (one allocator alignment unit, so blocks stay aligned)."""

MAGIC = int.from_bytes(b"CKVSLOT1", "little")
TOMBSTONE = 0
"""The generation of a slot that holds no readable block."""

DIGEST_PREFIX = 16

_FIELDS = "QQQ16s"  # magic, generation, size, digest prefix
_LAYOUT = struct.Struct(f"<{_FIELDS}24x")
HEADER_FIELDS = 40
"""Bytes of a header that carry fields (the rest is padding): all a reader needs to fetch and compare."""
if _LAYOUT.size != SLOT_HEADER or struct.calcsize(f"<{_FIELDS}") != HEADER_FIELDS:  # peers read these offsets
    raise InternalError(f"slot header layout is {_LAYOUT.size} B with {struct.calcsize(f'<{_FIELDS}')} B of fields, "
                        f"not {SLOT_HEADER} and {HEADER_FIELDS}")

# One counter for the whole process rather than one per arena: a window's memory can outlive an arena
# (reopened on the same memory), and a generation must never name two different incarnations.
# next() on itertools.count is atomic under the GIL, so concurrent writers draw distinct numbers.
_generations = itertools.count(1)


def next_generation() -> int:
    """A generation never handed out before in this process (> 0)."""
    return next(_generations)


@dataclass(frozen=True, slots=True)
class SlotHeader:
    """One decoded header."""

    magic: int
    generation: int
    """0 (:data:`TOMBSTONE`) while the slot is free or its bytes are being written."""
    nbytes: int
    digest16: bytes
    """The first 16 bytes of the block id (the start of the block's digest)."""

    @property
    def live(self) -> bool:
        return self.magic == MAGIC and self.generation != TOMBSTONE


def digest16_of(block_id: BlockId) -> bytes:
    """The part of a block id a header carries."""
    return bytes(block_id[:DIGEST_PREFIX])


def pack_header(buf: memoryview, offset: int, generation: int, nbytes: int, digest16: bytes) -> None:
    """Write a live header at ``buf[offset:offset + 64]``."""
    _LAYOUT.pack_into(buf, offset, MAGIC, generation, nbytes, digest16)


def pack_tombstone(buf: memoryview, offset: int) -> None:
    """Mark the slot at ``offset`` as holding no readable block."""
    _LAYOUT.pack_into(buf, offset, MAGIC, TOMBSTONE, 0, bytes(DIGEST_PREFIX))


def unpack_header(buf: memoryview | bytes, offset: int = 0) -> SlotHeader:
    magic, generation, nbytes, digest16 = _LAYOUT.unpack_from(buf, offset)
    return SlotHeader(magic, generation, nbytes, digest16)


def _check_expected(generation: int, digest16: bytes) -> None:
    if generation == TOMBSTONE:
        raise ValueError("generation 0 is the tombstone: no block is published under it")
    if len(digest16) != DIGEST_PREFIX:
        raise ValueError(f"digest prefix must be {DIGEST_PREFIX} bytes, got {len(digest16)}")


def expected_fields(generation: int, nbytes: int, digest16: bytes) -> bytes:
    """The field bytes a header must hold for the block a reader expects (compare with
    :func:`fields_of`): one bytes comparison on the hot path instead of decoding."""
    _check_expected(generation, digest16)
    return _LAYOUT.pack(MAGIC, generation, nbytes, digest16)[:HEADER_FIELDS]


@functools.lru_cache(maxsize=64)
def _fields_of_many(n: int) -> struct.Struct:
    return struct.Struct("<" + _FIELDS * n)


def expected_fields_many(blocks: Sequence[tuple[int, int, bytes]]) -> bytes:
    """:func:`expected_fields` of every ``(generation, nbytes, digest16)``, back to back, in one ``pack``
    (a batch's per-block calls and comparisons cost ~1.5 us a block, more than a 4 KiB copy)."""
    values: list[object] = []
    for generation, nbytes, digest16 in blocks:
        _check_expected(generation, digest16)
        values += (MAGIC, generation, nbytes, digest16)
    return _fields_of_many(len(blocks)).pack(*values)


def fields_of(header: memoryview, offset: int = 0) -> memoryview:
    """The field bytes of the header at ``offset`` (padding left out)."""
    return header[offset:offset + HEADER_FIELDS]


class _SlotRoom(RoomModel):
    """The host tier's what-if room, with a header added to every block."""

    def __init__(self, inner: RoomModel) -> None:
        super().__init__(inner.capacity, inner.used)
        self._inner = inner

    def allocate(self, block_id: BlockId, nbytes: int) -> bool:
        return self._inner.allocate(block_id, nbytes + SLOT_HEADER)

    def free(self, block_id: BlockId, nbytes: int) -> None:
        self._inner.free(block_id, nbytes + SLOT_HEADER)

    def copy(self) -> "_SlotRoom":
        return _SlotRoom(self._inner.copy())


class SlotArena(Tier):
    """A host arena whose every block carries a slot header, so peers can read it one-sidedly.

    Each block is one allocation of header + bytes in a plain :class:`~cascade_kv.tiers.HostTier` (composed,
    not subclassed: the tier stays a byte store that knows no readers). :meth:`write` writes the header last;
    :meth:`free` tombstones it first; a caller that fills a block through :meth:`view` publishes it with
    :meth:`seal`. Views, sizes, ``capacity`` and ``used`` leave the headers out: an empty arena takes one
    block of ``capacity`` bytes."""

    traits = TierTraits(name="host", memory=True, persistent=False, addressable=True)

    def __init__(self, capacity: int, buffer: object | None = None) -> None:
        """``buffer``: as for :class:`~cascade_kv.tiers.HostTier` (an MPI window's memory, which the caller
        frees after :meth:`close`)."""
        self._tier = HostTier(capacity, buffer)
        self._mv = memoryview(self._tier.arena)  # released at close, before the tier lets its memory go
        self._blocks = 0
        # Header stores are made under this lock. On x86-64 no load or store is reordered across a lock's
        # atomic instructions (and glibc's non-temporal copies end in sfence), so a tombstone is visible
        # before any later byte of the range, and a block's bytes before its new header.
        self._lock = threading.Lock()

    @property
    def arena(self):  # numpy uint8 array: the whole arena, headers included
        return self._tier.arena

    @property
    def open_seconds(self) -> float:
        return self._tier.open_seconds

    @property
    def capacity(self) -> int:
        return max(self._tier.capacity - SLOT_HEADER, 0)

    @property
    def used(self) -> int:
        return self._tier.used - SLOT_HEADER * self._blocks

    @property
    def largest_hole(self) -> int:
        """Largest block that can be allocated right now."""
        return max(self._tier.largest_hole - SLOT_HEADER, 0)

    def fits(self, nbytes: int) -> bool:
        return self._tier.fits(nbytes + SLOT_HEADER)

    def fits_now(self, sizes: Sequence[int]) -> bool:
        return self._tier.fits_now([n + SLOT_HEADER for n in sizes])

    def room_model(self) -> RoomModel:
        return _SlotRoom(self._tier.room_model())

    def allocate(self, block_id: BlockId, nbytes: int) -> bool:
        with self._lock:
            if not self._tier.allocate(block_id, nbytes + SLOT_HEADER):
                return False
            self._blocks += 1
            # the range may hold an old header or another block's bytes: nothing there is readable
            pack_tombstone(self._mv, self._tier.offset_of(block_id))
            return True

    def _header(self, block_id: BlockId) -> int:
        return self._tier.offset_of(block_id)

    def view(self, block_id: BlockId) -> memoryview:
        return self._tier.view(block_id)[SLOT_HEADER:]

    def write(self, block_id: BlockId, src: memoryview) -> None:
        dst = self.view(block_id)
        if src.nbytes != dst.nbytes:
            raise ValueError(f"host tier: block is {dst.nbytes} B, source is {src.nbytes} B")
        with self._lock:  # a rewrite of a live block must not be read as the old generation: tombstone first
            pack_tombstone(self._mv, self._header(block_id))
        copy_bytes(dst, src.cast("B") if src.format != "B" or src.ndim != 1 else src)
        self.seal(block_id)

    def seal(self, block_id: BlockId) -> int:
        """Publish the block's bytes as they are now under a fresh generation, and return it.
        :meth:`write` seals; a caller that filled the block through :meth:`view` seals it itself,
        else the header stays a tombstone and no peer can read the block."""
        with self._lock:
            generation = next_generation()
            pack_header(self._mv, self._header(block_id), generation, self.size_of(block_id),
                        digest16_of(block_id))
            return generation

    def location(self, block_id: BlockId) -> tuple[int, int, int]:
        """``(header offset in the arena, nbytes, generation)`` of a block, for a directory to
        publish; generation 0 means not readable yet (allocated but not written or sealed)."""
        with self._lock:
            offset = self._header(block_id)
            return offset, self.size_of(block_id), unpack_header(self._mv, offset).generation

    def read_into(self, block_id: BlockId, out: memoryview) -> None:
        copy_view_into(self.view(block_id), out)

    def free(self, block_id: BlockId) -> None:
        with self._lock:
            # before the range can be handed out again: a reader that copied bytes of the next block
            # there will find this tombstone (or a newer header) when it checks again
            pack_tombstone(self._mv, self._header(block_id))
            self._tier.free(block_id)
            self._blocks -= 1

    def contains(self, block_id: BlockId) -> bool:
        return self._tier.contains(block_id)

    def size_of(self, block_id: BlockId) -> int:
        return self._tier.size_of(block_id) - SLOT_HEADER

    def block_ids(self) -> Iterator[BlockId]:
        return self._tier.block_ids()

    def close(self) -> None:
        with self._lock:
            self._mv.release()
            self._tier.close()
            self._blocks = 0


__all__ = ["SLOT_HEADER", "HEADER_FIELDS", "MAGIC", "TOMBSTONE", "SlotArena", "SlotHeader", "digest16_of",
           "expected_fields", "expected_fields_many", "fields_of", "next_generation", "pack_header", "pack_tombstone", "unpack_header"]
