"""The directory's value types: where a copy lies, what a key names, and the homes' answers.

Plain frozen values with no behaviour beyond their own fields, shared by the state machine
(:mod:`.state`), the wire codec (:mod:`.codec`), the client (:mod:`.rpc`) and the store's parts.
"""
from __future__ import annotations

import enum
import functools
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from ...catalog import decode_dtype, encode_dtype
from ...ids import DIGEST_SIZE, TAG_SIZE, Digest

TIER_MEMORY = 0
"""A copy in a rank's arena window: ``offset`` is its slot header's offset, readable one-sidedly."""
TIER_DISK = 1
"""A copy in the shared content-addressed disk tier: any rank reads it by digest (offset, generation 0)."""

LOCATION = struct.Struct("<iBQQQ")
"""rank (i32), tier (u8), offset (u64), nbytes (u64), generation (u64): 29 bytes."""

DEFAULT_LEASE_S = 10.0
"""How long a grant (to store, to load from disk, to free) holds a digest before the next caller is granted."""

_SPACED_IDS = (DIGEST_SIZE + TAG_SIZE, DIGEST_SIZE + TAG_SIZE + 12)  # lengths of namespaced block ids:
# the digest and the namespace's tag, then (dedup off) the putting rank and a serial (see writes.block_id)


@dataclass(frozen=True, slots=True)
class Location:
    """Where one copy of a block lies."""

    rank: int
    """Rank whose tier holds the copy (for :data:`TIER_DISK`, the rank that wrote the file)."""
    tier: int
    """:data:`TIER_MEMORY` or :data:`TIER_DISK`."""
    offset: int
    """Offset of the slot in the tier (the slot header's offset in an arena)."""
    nbytes: int
    """Size of the block."""
    generation: int
    """Allocation generation of the slot: a reader that finds another one there knows the copy moved."""

    def pack(self) -> bytes:
        return LOCATION.pack(self.rank, self.tier, self.offset, self.nbytes, self.generation)

    @property
    def in_memory(self) -> bool:
        return self.tier == TIER_MEMORY


class ClaimStatus(enum.IntEnum):
    EXISTS = 0
    """The block is stored already (a dedup hit): nothing to transfer; a reference was taken."""
    GRANTED = 1
    """The caller must store the block and ``publish`` it; a reference was taken."""
    PENDING = 2
    """Another rank holds the grant and has not published: ask again later; no reference was taken."""


class LoadStatus(enum.IntEnum):
    IN_MEMORY = 0
    """A memory copy exists: read it (``locations``)."""
    GRANTED = 1
    """Only a disk copy exists and the caller holds the load lease: read the file, keep it in memory, publish."""
    PENDING = 2
    """Another rank is loading it from disk: ask again (it will be in memory shortly)."""
    MISSING = 3
    """No copy at all: the block was dropped, or freed since the key was looked up."""


class CopyStatus(enum.IntEnum):
    REMOVED = 0
    """The copy is no longer listed (another copy keeps the block where it must be): free it."""
    LAST = 1
    """The copy is the block's last one where it must be (memory, for a protected block): move it instead."""
    GONE = 2
    """The copy was not listed (the block was freed or moved meanwhile): free it."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A home's answer to ``claim``."""

    status: ClaimStatus
    locations: tuple[Location, ...] = ()
    """The copies, when ``status`` is EXISTS."""
    pending_rank: int = -1
    """The rank holding the grant, when ``status`` is PENDING."""
    protected: int = 0
    """Prefix references to the digest after this claim (0 when PENDING)."""


@dataclass(frozen=True, slots=True)
class Located:
    """A home's answer to ``locate``, ``load`` and ``set_protected``."""

    locations: tuple[Location, ...]
    protected: int
    """Prefix keys (and prefix puts in flight) referring to the digest."""
    status: LoadStatus = LoadStatus.IN_MEMORY
    """For ``load``: what the caller must do."""
    pending_rank: int = -1
    refs: int = field(default=0, compare=False)
    """References to the digest (keys bound and puts in flight): filled by ``locate`` only."""

    @property
    def memory(self) -> tuple[Location, ...]:
        return tuple(loc for loc in self.locations if loc.tier == TIER_MEMORY)

    @property
    def disk(self) -> Location | None:
        return next((loc for loc in self.locations if loc.tier == TIER_DISK), None)


@dataclass(frozen=True, slots=True)
class Released:
    """A home's answer to ``unref``."""

    freed: bool
    """The last reference went: free ``locations`` (every copy), then ``forget`` the digest."""
    unprotected: bool
    """The last prefix reference went while others remain: tell ``locations``' owners."""
    locations: tuple[Location, ...] = ()


def dtype_text(dt: np.dtype) -> str:
    """A key's dtype as the directory carries it, losslessly: ``dt.str`` for a plain dtype (``dt.str`` alone
    turned a structured dtype into ``|V8``), else the JSON of the journal's codec (:mod:`cascade_kv.catalog`)."""
    encoded = encode_dtype(dt)
    return encoded if isinstance(encoded, str) else json.dumps(encoded, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def dtype_of(text: str) -> np.dtype:
    """Inverse of :func:`dtype_text`; remembered per text (a get builds one per key: ~1 us each, and a cache
    holds few distinct dtypes)."""
    return decode_dtype(json.loads(text)) if text[:1] in ("{", "[") else np.dtype(text)


def space_tag(digest: bytes) -> bytes:
    """The namespace tag a block id carries (``b""``: the default namespace's)."""
    return digest[DIGEST_SIZE:DIGEST_SIZE + TAG_SIZE] if len(digest) in _SPACED_IDS else b""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What a key names: a digest and the array metadata to rebuild the value."""

    digest: Digest
    dtype: str
    """:func:`dtype_text`: ``dtype.str`` (``"<f4"``) for a plain dtype, the journal's JSON for a structured one."""
    shape: tuple[int, ...]
    prefix: bool = False
    """The key is a prefix (its block is protected from leaving cluster memory)."""


@dataclass(frozen=True, slots=True)
class HomeStats:
    """What one rank is home for (summed over ranks: the cluster's totals)."""

    keys: int
    blocks: int
    """Digests with at least one reference."""
    logical_bytes: int
    unique_bytes: int
    protected_blocks: int
    protected_in_memory: int
    disk_blocks: int = 0
    """Digests with a copy in the shared disk tier."""
    disk_bytes: int = 0



__all__ = ["DEFAULT_LEASE_S", "LOCATION", "TIER_DISK", "TIER_MEMORY", "Claim", "ClaimStatus", "CopyStatus", "HomeStats",
           "KeyRecord", "LoadStatus", "Located", "Location", "Released", "dtype_of", "dtype_text", "space_tag"]
