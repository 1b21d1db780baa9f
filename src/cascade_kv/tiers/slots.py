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

Layout (little endian, one cache line, so the header never straddles two)::

    0   magic       u64   MAGIC: this is a slot header at all
    8   generation  u64   0 = free / being written (tombstone)
    16  nbytes      u64   the block's size
    24  digest16    16 B  first 16 bytes of the block id
    40  padding     24 B  zero
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from ..ids import BlockId

SLOT_HEADER = 64
"""Bytes of header in front of each block (one allocator alignment unit, so blocks stay aligned)."""

MAGIC = int.from_bytes(b"CKVSLOT1", "little")
TOMBSTONE = 0
"""The generation of a slot that holds no readable block."""

DIGEST_PREFIX = 16

_LAYOUT = struct.Struct("<QQQ16s24x")
HEADER_FIELDS = 40
"""Bytes of a header that carry fields (the rest is padding): all a reader needs to fetch and compare."""
assert _LAYOUT.size == SLOT_HEADER

# One counter for the whole process rather than one per tier: a window's arena can outlive a tier
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


def expected_fields(generation: int, nbytes: int, digest16: bytes) -> bytes:
    """The field bytes a header must hold for the block a reader expects (compare with
    :func:`fields_of`): one bytes comparison on the hot path instead of decoding."""
    if generation == TOMBSTONE:
        raise ValueError("generation 0 is the tombstone: no block is published under it")
    if len(digest16) != DIGEST_PREFIX:
        raise ValueError(f"digest prefix must be {DIGEST_PREFIX} bytes, got {len(digest16)}")
    return _LAYOUT.pack(MAGIC, generation, nbytes, digest16)[:HEADER_FIELDS]


def fields_of(header: memoryview, offset: int = 0) -> memoryview:
    """The field bytes of the header at ``offset`` (padding left out)."""
    return header[offset:offset + HEADER_FIELDS]
