"""One rank's share of the global directory: the state machine, plain Python with no MPI.

Every rank is home to a share of the digests (:func:`~..homes.home_of_digest`) and of the keys
(:func:`~..homes.home_of_key`); :class:`DirectoryState` holds that share and its rules, so they are
unit-tested directly. :mod:`.rpc` serves it to the other ranks.

Claims. ``claim`` is how a put learns whether its bytes must be stored: the home answers EXISTS (a
dedup hit, with the locations), GRANTED (store it, then ``publish``) or PENDING (another rank was
granted it and has not published yet; ask again). EXISTS and GRANTED take a reference (a put in
flight, which becomes the key's reference once ``bind`` succeeds); PENDING takes none, so a caller
that polls does not count twice. A grant is a lease: once past ``lease_s`` the next caller is granted
instead, so a rank that died mid-put cannot wedge the digest. The dead rank's reference is not given
back (the home cannot tell a dead rank from a slow one); the digest then outlives its last key until
the store closes, a leak preferred to freeing a block a slow rank is about to bind.

Stats. :meth:`DirectoryState.stats` is read by metrics scrapes and callers polling counters, so it must
not walk the entries (8.4 ms at 50k blocks, seconds at millions): every change to an entry takes the
entry's share out of its namespace's :class:`_Tally` before and puts it back after (``_untally`` /
``_tally``), which costs a few field updates per operation.
"""
from __future__ import annotations

import functools
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ...errors import BlockNotFound, InvalidArgument
from ...ids import Key, SpacedKey, StoreKey
from .records import (DEFAULT_LEASE_S, TIER_DISK, TIER_MEMORY, Claim, ClaimStatus, CopyStatus, HomeStats, KeyRecord,
                      LoadStatus, Located, Location, Released, dtype_of, space_tag)


@dataclass(slots=True)
class _DigestEntry:
    nbytes: int
    refs: int = 0
    """Keys bound to the digest plus puts in flight (claims answered EXISTS or GRANTED)."""
    protected: int = 0
    """Prefix keys (and prefix puts in flight) among the references."""
    locations: list[Location] = field(default_factory=list)
    pending_rank: int = -1
    """Rank holding an unexpired grant (to store, load or free the block), or -1."""
    pending_deadline: float = 0.0
    """``now`` past which the grant lapses (the caller's clock: ``time.monotonic`` on the home)."""

    def pending(self, now: float) -> bool:
        return self.pending_rank >= 0 and now < self.pending_deadline



@dataclass(slots=True)
class _Tally:
    """One namespace's share of a home's stats (or every namespace's), kept as the entries change."""

    keys: int = 0
    logical_bytes: int = 0
    """Bytes of the keys' values (a block bound under two keys counts twice)."""
    blocks: int = 0
    """Digests with at least one reference."""
    unique_bytes: int = 0
    protected_blocks: int = 0
    """Referenced digests with a prefix reference."""
    protected_in_memory: int = 0
    disk_blocks: int = 0
    disk_bytes: int = 0
    protected_bytes: int = 0
    """Bytes of the digests with a prefix reference, referenced or not (a namespace's quota use)."""

    def add_digest(self, e: _DigestEntry, sign: int) -> None:
        if e.protected > 0:
            self.protected_bytes += sign * e.nbytes
        if not e.refs:
            return
        self.blocks += sign
        self.unique_bytes += sign * e.nbytes
        memory = disk = False
        for loc in e.locations:
            if loc.tier == TIER_MEMORY:
                memory = True
            elif loc.tier == TIER_DISK:
                disk = True
        if e.protected > 0:
            self.protected_blocks += sign
            self.protected_in_memory += sign * memory
        if disk:
            self.disk_blocks += sign
            self.disk_bytes += sign * e.nbytes

    def add_key(self, r: KeyRecord, sign: int) -> None:
        self.keys += sign
        self.logical_bytes += sign * _itemsize(r.dtype) * math.prod(r.shape)


@functools.lru_cache(maxsize=1024)
def _itemsize(dtype: str) -> int:
    """A dtype's item size by its directory text (parsing it costs ~1 us; a home binds the same few over and over)."""
    return dtype_of(dtype).itemsize


def _space_of(key: StoreKey) -> str | None:
    return key.space if isinstance(key, SpacedKey) else None


class DirectoryState:
    """The directory entries one rank is home for. Thread-safe; never talks to other ranks.

    Three kinds of grant share one lease per digest, since at most one can be live: a *store* grant
    (a claim while no copy exists), a *load* grant (only a disk copy exists; one rank reads the file
    and publishes its memory copy, so a hot block is read from disk once), and a *free* grant (the
    last reference went; claims wait until the freeing rank has removed the copies and ``forget``s
    the digest, so a new copy can never be deleted by the old block's cleanup).
    """

    def __init__(self, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not lease_s > 0:
            raise ValueError(f"lease_s must be a number of seconds > 0, got {lease_s!r}")
        self.lease_s = float(lease_s)
        self._lock = threading.Lock()
        self._digests: dict[bytes, _DigestEntry] = {}
        self._keys: dict[Key, KeyRecord] = {}
        self._all = _Tally()  # every namespace
        # made on first use by the tallies; readers use .get, so a lookup never adds an empty one
        self._by_space: defaultdict[str | None, _Tally] = defaultdict(_Tally)  # keys, by namespace (None: default)
        self._by_tag: defaultdict[bytes, _Tally] = defaultdict(_Tally)  # digests, by their id's namespace tag
        self.on_change: Callable[[Key], None] | None = None
        """Called under the lock whenever a key's binding changes (bound, rebound, unbound), before any lookup
        can see the change: the store moves the key's binding version (:mod:`..bindings`)."""

    def __len__(self) -> int:
        """Digests known here (for tests and stats)."""
        return len(self._digests)

    # Every change to an entry goes between _untally and _tally (under the lock), so stats() never walks.
    def _tally(self, digest: bytes, entry: _DigestEntry, sign: int = 1) -> None:
        if entry.refs or entry.protected > 0:
            self._all.add_digest(entry, sign)
            self._by_tag[space_tag(digest)].add_digest(entry, sign)

    def _untally(self, digest: bytes, entry: _DigestEntry) -> None:
        self._tally(digest, entry, -1)

    def _tally_key(self, key: Key, record: KeyRecord, sign: int) -> None:
        self._all.add_key(record, sign)
        self._by_space[_space_of(key)].add_key(record, sign)

    def restore_entries(self, keys: dict[Key, KeyRecord],
                        digests: Iterable[tuple[bytes, int, int, int, list[Location]]]) -> None:
        """Add recovered entries: keys, and ``(digest, nbytes, refs, protected, locations)`` (persist, at open)."""
        with self._lock:
            for k, r in keys.items():
                old = self._keys.get(k)
                if old is not None:
                    self._tally_key(k, old, -1)
                self._keys[k] = r
                self._tally_key(k, r, 1)
                self._changed(k)
            for d, nbytes, refs, protected, locations in digests:
                old_entry = self._digests.get(d)
                if old_entry is not None:
                    self._untally(d, old_entry)
                entry = self._digests[d] = _DigestEntry(nbytes, refs, protected, list(locations))
                self._tally(d, entry)

    def _entry(self, digest: bytes) -> _DigestEntry:
        entry = self._digests.get(digest)
        if entry is None:
            raise BlockNotFound(f"digest {digest.hex()} is not in this rank's directory")
        return entry

    # --------------------------------------------------------------- digests
    def claim(self, digest: bytes, nbytes: int, rank: int, now: float, prefix: bool = False) -> Claim:
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None:
                entry = self._digests[digest] = _DigestEntry(nbytes)
            elif entry.nbytes != nbytes:
                raise ValueError(f"digest {digest.hex()}: claimed with {nbytes} B, known with {entry.nbytes} B")
            self._untally(digest, entry)
            if entry.locations:
                status = ClaimStatus.EXISTS
            elif entry.pending(now):
                self._tally(digest, entry)
                return Claim(ClaimStatus.PENDING, pending_rank=entry.pending_rank)
            else:
                status = ClaimStatus.GRANTED
                entry.pending_rank, entry.pending_deadline = rank, now + self.lease_s
            entry.refs += 1
            entry.protected += bool(prefix)
            self._tally(digest, entry)
            return Claim(status, tuple(entry.locations), protected=entry.protected)

    def publish(self, digest: bytes, location: Location) -> None:
        """Record a stored copy; it completes a store or load grant (a lapsed grantee may publish too:
        one more copy). A second disk copy is not listed: there is one shared file per digest. A digest
        no key refers to any more (being freed) raises ``BlockNotFound``: the caller frees its copy."""
        with self._lock:
            entry = self._entry(digest)
            if location.nbytes != entry.nbytes:
                raise ValueError(f"digest {digest.hex()}: published {location.nbytes} B, claimed {entry.nbytes} B")
            if entry.refs == 0:  # a load or replica racing a delete: listing it would outlive every key
                raise BlockNotFound(f"digest {digest.hex()} is being freed (no key refers to it)")
            if location not in entry.locations and not (
                    location.tier == TIER_DISK and any(loc.tier == TIER_DISK for loc in entry.locations)):
                self._untally(digest, entry)
                entry.locations.append(location)
                self._tally(digest, entry)
            entry.pending_rank = -1

    def locate(self, digest: bytes) -> Located:
        """The copies of ``digest``; none for an unknown or not yet published digest (a miss)."""
        with self._lock:
            entry = self._digests.get(digest)
            return (Located((), 0) if entry is None
                    else Located(tuple(entry.locations), entry.protected, refs=entry.refs))

    def load(self, digest: bytes, rank: int, now: float) -> Located:
        """What a reader that found no memory copy should do (see :class:`LoadStatus`)."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None:
                return Located((), 0, LoadStatus.MISSING)
            locs = tuple(entry.locations)
            if any(loc.tier == TIER_MEMORY for loc in locs):
                return Located(locs, entry.protected, LoadStatus.IN_MEMORY)
            if not locs:
                return Located((), entry.protected, LoadStatus.MISSING)
            if entry.pending(now) and entry.pending_rank != rank:
                return Located(locs, entry.protected, LoadStatus.PENDING, entry.pending_rank)
            entry.pending_rank, entry.pending_deadline = rank, now + self.lease_s
            return Located(locs, entry.protected, LoadStatus.GRANTED)

    def unref(self, digest: bytes, rank: int = -1, now: float = 0.0, prefix: bool = False) -> Released:
        """Drop a reference (a prefix one if ``prefix``). At zero the copies are handed to the caller to
        free, under a free grant: call :meth:`forget` when they are gone. A grantee's unref also gives
        back its grant (a put that failed after its claim)."""
        with self._lock:
            entry = self._entry(digest)
            if entry.refs <= 0:  # its copies are being freed already: refused, nothing changes (as below)
                raise InvalidArgument(f"digest {digest.hex()}: unref, but no reference is counted ({entry})")
            if prefix and entry.protected <= 0:
                raise ValueError(f"digest {digest.hex()}: unref of a prefix reference, but none is counted")
            self._untally(digest, entry)
            entry.refs -= 1
            entry.protected -= bool(prefix)
            if entry.pending_rank == rank and not entry.locations:
                entry.pending_rank = -1
            if entry.refs == 0:
                locations, entry.locations = tuple(entry.locations), []
                if locations:
                    entry.pending_rank, entry.pending_deadline = rank, now + self.lease_s
                    self._tally(digest, entry)  # nothing, unless a protected count outlived the references
                else:
                    del self._digests[digest]
                return Released(True, False, locations)
            self._tally(digest, entry)
            if prefix and entry.protected == 0:
                return Released(False, True, tuple(entry.locations))
            return Released(False, False)

    def forget(self, digest: bytes, rank: int) -> None:
        """End ``rank``'s grant on ``digest`` (its copies are freed, or its load failed); a digest that
        nothing refers to any more is forgotten."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None:
                return
            if entry.pending_rank == rank:
                entry.pending_rank = -1
            if entry.refs == 0 and not entry.locations and entry.pending_rank < 0:
                self._untally(digest, entry)
                del self._digests[digest]

    def move(self, digest: bytes, old: Location, new: Location) -> bool:
        """Replace copy ``old`` by ``new``; False (nothing changed) when ``old`` is not a copy any more.
        Moving to disk where the shared file is listed already just removes ``old``."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None or old not in entry.locations:
                return False
            self._untally(digest, entry)
            entry.locations.remove(old)
            if new not in entry.locations and not (
                    new.tier == TIER_DISK and any(loc.tier == TIER_DISK for loc in entry.locations)):
                entry.locations.append(new)
            self._tally(digest, entry)
            return True

    def drop_copy(self, digest: bytes, location: Location, force: bool = False) -> tuple[CopyStatus, int]:
        """An owner wants to free ``location`` (eviction): allowed when another copy keeps the block
        where it must stay (memory if protected; memory or disk otherwise), or nothing refers to it, or
        ``force`` (a drop: nowhere left to put it). Returns the answer and the protected count."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None or location not in entry.locations:
                return CopyStatus.GONE, 0
            others = [loc for loc in entry.locations if loc != location]
            kept = any(loc.tier == TIER_MEMORY for loc in others) or (
                entry.protected == 0 and any(loc.tier == TIER_DISK for loc in others))
            if kept or entry.refs == 0 or force:
                self._untally(digest, entry)
                entry.locations.remove(location)
                self._tally(digest, entry)
                return CopyStatus.REMOVED, entry.protected
            return CopyStatus.LAST, entry.protected

    def set_protected(self, digest: bytes, delta: int) -> Located:
        """Add ``delta`` to the count of prefix keys referencing ``digest``; the new count and the copies."""
        with self._lock:
            entry = self._entry(digest)
            if entry.protected + delta < 0:
                raise ValueError(f"digest {digest.hex()}: protected count {entry.protected} {delta:+d} < 0")
            self._untally(digest, entry)
            entry.protected += delta
            self._tally(digest, entry)
            return Located(tuple(entry.locations), entry.protected)

    # ------------------------------------------------------------------ keys
    def bind(self, key: Key, record: KeyRecord) -> KeyRecord | None:
        """Point ``key`` at ``record``; returns what it named before (for the caller to unref), or None."""
        with self._lock:
            old = self._keys.get(key)
            if old is not None:
                self._tally_key(key, old, -1)
            self._keys[key] = record
            self._tally_key(key, record, 1)
            self._changed(key)
            return old

    def _changed(self, key: Key) -> None:
        if self.on_change is not None:
            self.on_change(key)

    def lookup(self, key: Key) -> KeyRecord | None:
        with self._lock:
            return self._keys.get(key)

    def lookup_many(self, keys: list[Key]) -> list[KeyRecord | None]:
        """:meth:`lookup` of each key, under one hold of the lock."""
        with self._lock:
            get = self._keys.get
            return [get(k) for k in keys]

    def unbind(self, key: Key) -> KeyRecord | None:
        """Forget ``key``; returns its record (for the caller to unref), or None if it was not bound."""
        with self._lock:
            old = self._keys.pop(key, None)
            if old is not None:
                self._tally_key(key, old, -1)
                self._changed(key)
            return old

    def set_prefix(self, key: Key, prefix: bool, digest: bytes | None = None) -> KeyRecord | None:
        """Mark ``key`` as a prefix or not (only while it names ``digest``, if given); returns its record
        *before* the change (None: not bound; another digest: nothing changed)."""
        with self._lock:
            old = self._keys.get(key)
            if old is not None and old.prefix != prefix and (digest is None or old.digest == digest):
                self._keys[key] = KeyRecord(old.digest, old.dtype, old.shape, prefix)
                self._changed(key)
            return old

    def bound(self, keys: Iterable[Key]) -> bytes:
        """One byte per key, 1 where it is bound (under one lock: a prompt asks for thousands at once)."""
        with self._lock:
            return bytes(k in self._keys for k in keys)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._keys)

    def snapshot(self) -> tuple[dict[bytes, tuple[int, int, tuple[Location, ...]]], dict[Key, KeyRecord]]:
        """Copies of this home's entries, ``digest -> (refs, protected, locations)`` and ``key -> record``,
        taken at one instant (for checks against the arenas and the keys of every rank)."""
        with self._lock:
            return ({d: (e.refs, e.protected, tuple(e.locations)) for d, e in self._digests.items()},
                    dict(self._keys))

    def protected_bytes(self, tag: bytes) -> int:
        """Bytes of the protected digests of the namespace whose tag is ``tag`` homed here (its quota's use)."""
        with self._lock:
            tally = self._by_tag.get(tag)
            return 0 if tally is None else tally.protected_bytes

    def stats(self, space: tuple[str | None, bytes] | None = None) -> HomeStats:
        """What this rank is home for; ``space``: only one namespace's (its name, None for the default
        namespace, and its tag). O(1): read off the tallies kept as entries change."""
        with self._lock:
            if space is None:
                keys = digests = self._all
            else:
                keys = self._by_space.get(space[0]) or _Tally()
                digests = self._by_tag.get(space[1]) or _Tally()
            return HomeStats(
                keys=keys.keys, blocks=digests.blocks, logical_bytes=keys.logical_bytes,
                unique_bytes=digests.unique_bytes, protected_blocks=digests.protected_blocks,
                protected_in_memory=digests.protected_in_memory, disk_blocks=digests.disk_blocks,
                disk_bytes=digests.disk_bytes)


__all__ = ["DirectoryState"]
