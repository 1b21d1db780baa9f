"""The global directory: which rank holds which block, and which digest each key names.

Every rank is home to a share of the digests (:func:`~.homes.home_of_digest`) and
of the keys (:func:`~.homes.home_of_key`). :class:`DirectoryState` is one rank's
share, plain Python with no MPI, so its rules are unit-tested directly;
:class:`Directory` serves it through the rank's :class:`~.service.Service` and
is the client every rank calls (see ``docs/distributed-design.md``, "Directory
protocol").

Handlers only touch local state under the state's lock and never wait on
another rank, as the service requires. A call to one's own rank runs the handler
on the calling thread, concurrently with the service thread, hence the lock.

Claims. ``claim`` is how a put learns whether its bytes must be stored: the home
answers EXISTS (a dedup hit, with the locations), GRANTED (store it, then
``publish``) or PENDING (another rank was granted it and has not published yet;
ask again). EXISTS and GRANTED take a reference (a put in flight, which becomes
the key's reference once ``bind`` succeeds); PENDING takes none, so a caller
that polls does not count twice. A grant is a lease: once past ``lease_s`` the
next caller is granted instead, so a rank that died mid-put cannot wedge the
digest. The dead rank's reference is not given back (the home cannot tell a
dead rank from a slow one); the digest then outlives its last key until the
store closes, a leak preferred to freeing a block a slow rank is about to bind.

Wire format. Every op takes a *batch*: ``u32 count`` then ``count`` records, and
answers with ``count`` results in order, so the client sends one request per
home rank (:meth:`Service.call_many`) and the single-item calls are thin
wrappers. Records are fixed structs plus length-prefixed bytes, no pickle:
digest = ``u8 len`` + bytes; key = ``u32 len`` + the type-tagged key (``b"s"`` +
UTF-8 or ``b"b"`` + raw; a namespaced key ``b"n"`` + u16 length + namespace + one of those: ``homes.encode_key``); location = :data:`LOCATION`;
locations = ``u32 count`` + locations; array metadata = ``u8 len`` + numpy
:func:`dtype_text` (``u16 len`` + ASCII), ``u8 ndim`` + ``ndim`` little-endian u64 dims.
"""
from __future__ import annotations

import enum
import json
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from ..catalog import decode_dtype, encode_dtype
from ..errors import BlockNotFound, InvalidArgument, PeerTimeout
from ..ids import DIGEST_SIZE, TAG_SIZE, Digest, Key, StoreKey
from .homes import decode_key, encode_key, home_of_digest, home_of_key
from .service import Service

T = TypeVar("T")
R = TypeVar("R")

# Ops 16..31 are the directory's; other layers keep out of this range.
OP_CLAIM = 16
OP_PUBLISH = 17
OP_LOCATE = 18
OP_UNREF = 19
OP_MOVE = 20
OP_PROTECT = 21
OP_BIND = 22
OP_LOOKUP = 23
OP_UNBIND = 24
OP_FORGET = 25
OP_DROP_COPY = 26
OP_LOAD = 27
OP_SET_PREFIX = 28
OP_KEYS = 29
OP_SPACE_PROTECTED = 30
OP_BOUND = 31
OPS = range(16, 32)
"""The op numbers reserved for the directory."""

TIER_MEMORY = 0
"""A copy in a rank's arena window: ``offset`` is its slot header's offset, readable one-sidedly."""
TIER_DISK = 1
"""A copy in the shared content-addressed disk tier: any rank reads it by digest (offset, generation 0)."""

LOCATION = struct.Struct("<iBQQQ")
"""rank (i32), tier (u8), offset (u64), nbytes (u64), generation (u64): 29 bytes."""

DEFAULT_LEASE_S = 10.0
"""How long a grant (to store, to load from disk, to free) holds a digest before the next caller is granted."""

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_CLAIM_REQ = struct.Struct("<QB")  # nbytes, prefix; after the digest
_STATUS_REPLY = struct.Struct("<BiII")  # status, pending rank (-1 unless PENDING), protected, refs; then locations
_UNREF_REPLY = struct.Struct("<BB")  # freed, unprotected; then locations
_SPACED_IDS = (DIGEST_SIZE + TAG_SIZE, DIGEST_SIZE + TAG_SIZE + 12)  # lengths of namespaced block ids:
# the digest and the namespace's tag, then (dedup off) the putting rank and a serial (DistributedStore._block_id)
_FIRST_POLL_S = 200e-6
_MAX_POLL_S = 10e-3
"""Bounds of the wait between claims of a PENDING digest (doubling: a store takes ~0.1-10 ms)."""


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


def dtype_of(text: str) -> np.dtype:
    """Inverse of :func:`dtype_text`."""
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

    def __len__(self) -> int:
        """Digests known here (for tests and stats)."""
        return len(self._digests)

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
            if entry.locations:
                status = ClaimStatus.EXISTS
            elif entry.pending(now):
                return Claim(ClaimStatus.PENDING, pending_rank=entry.pending_rank)
            else:
                status = ClaimStatus.GRANTED
                entry.pending_rank, entry.pending_deadline = rank, now + self.lease_s
            entry.refs += 1
            entry.protected += bool(prefix)
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
                entry.locations.append(location)
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
            assert entry.refs > 0, (digest.hex(), entry)  # an entry at zero refs holds no locations
            if prefix and entry.protected <= 0:
                raise ValueError(f"digest {digest.hex()}: unref of a prefix reference, but none is counted")
            entry.refs -= 1
            entry.protected -= bool(prefix)
            if entry.pending_rank == rank and not entry.locations:
                entry.pending_rank = -1
            if entry.refs == 0:
                locations, entry.locations = tuple(entry.locations), []
                if locations:
                    entry.pending_rank, entry.pending_deadline = rank, now + self.lease_s
                else:
                    del self._digests[digest]
                return Released(True, False, locations)
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
                del self._digests[digest]

    def move(self, digest: bytes, old: Location, new: Location) -> bool:
        """Replace copy ``old`` by ``new``; False (nothing changed) when ``old`` is not a copy any more.
        Moving to disk where the shared file is listed already just removes ``old``."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None or old not in entry.locations:
                return False
            entry.locations.remove(old)
            if new not in entry.locations and not (
                    new.tier == TIER_DISK and any(loc.tier == TIER_DISK for loc in entry.locations)):
                entry.locations.append(new)
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
                entry.locations.remove(location)
                return CopyStatus.REMOVED, entry.protected
            return CopyStatus.LAST, entry.protected

    def set_protected(self, digest: bytes, delta: int) -> Located:
        """Add ``delta`` to the count of prefix keys referencing ``digest``; the new count and the copies."""
        with self._lock:
            entry = self._entry(digest)
            if entry.protected + delta < 0:
                raise ValueError(f"digest {digest.hex()}: protected count {entry.protected} {delta:+d} < 0")
            entry.protected += delta
            return Located(tuple(entry.locations), entry.protected)

    # ------------------------------------------------------------------ keys
    def bind(self, key: Key, record: KeyRecord) -> KeyRecord | None:
        """Point ``key`` at ``record``; returns what it named before (for the caller to unref), or None."""
        with self._lock:
            old = self._keys.get(key)
            self._keys[key] = record
            return old

    def lookup(self, key: Key) -> KeyRecord | None:
        with self._lock:
            return self._keys.get(key)

    def unbind(self, key: Key) -> KeyRecord | None:
        """Forget ``key``; returns its record (for the caller to unref), or None if it was not bound."""
        with self._lock:
            return self._keys.pop(key, None)

    def set_prefix(self, key: Key, prefix: bool, digest: bytes | None = None) -> KeyRecord | None:
        """Mark ``key`` as a prefix or not (only while it names ``digest``, if given); returns its record
        *before* the change (None: not bound; another digest: nothing changed)."""
        with self._lock:
            old = self._keys.get(key)
            if old is not None and old.prefix != prefix and (digest is None or old.digest == digest):
                self._keys[key] = KeyRecord(old.digest, old.dtype, old.shape, prefix)
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
            return sum(e.nbytes for d, e in self._digests.items() if e.protected > 0 and space_tag(d) == tag)

    def stats(self, space: tuple[Callable[[StoreKey], bool], bytes] | None = None) -> HomeStats:
        """What this rank is home for; ``space``: only one namespace's (its key test and its tag)."""
        with self._lock:
            live = [e for d, e in self._digests.items() if e.refs and (space is None or space_tag(d) == space[1])]
            keys = [r for k, r in self._keys.items() if space is None or space[0](k)]
            protected = [e for e in live if e.protected > 0]
            return HomeStats(
                keys=len(keys), blocks=len(live),
                logical_bytes=sum(dtype_of(r.dtype).itemsize * math.prod(r.shape) for r in keys),
                unique_bytes=sum(e.nbytes for e in live), protected_blocks=len(protected),
                protected_in_memory=sum(any(loc.tier == TIER_MEMORY for loc in e.locations) for e in protected),
                disk_blocks=len(on_disk := [e for e in live if any(loc.tier == TIER_DISK for loc in e.locations)]),
                disk_bytes=sum(e.nbytes for e in on_disk))


# --------------------------------------------------------------------- encoding
class _Reader:
    """Reads records off a payload in order; raises ValueError on a short or overlong payload."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf, self.pos = memoryview(buf), 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"payload of {len(self.buf)} B ends inside a record (at {self.pos} + {n})")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple:
        pos, end = self.pos, self.pos + s.size
        if end > len(self.buf):
            raise ValueError(f"payload of {len(self.buf)} B ends inside a record (at {pos} + {s.size})")
        self.pos = end
        return s.unpack_from(self.buf, pos)  # no intermediate bytes: lookups decode a dozen fields each

    def u8(self) -> int:
        pos = self.pos
        if pos >= len(self.buf):
            raise ValueError(f"payload of {len(self.buf)} B ends inside a record (at {pos} + 1)")
        self.pos = pos + 1
        return self.buf[pos]

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def digest(self) -> bytes:
        return self.take(self.u8())

    def key(self) -> StoreKey:
        return decode_key(self.take(self.u32()))

    def location(self) -> Location:
        return Location(*self.unpack(LOCATION))

    def locations(self) -> tuple[Location, ...]:
        return tuple(self.location() for _ in range(self.u32()))

    def record(self) -> KeyRecord:
        digest = Digest(self.digest())
        dtype = self.take(self.unpack(_U16)[0]).decode("ascii")
        ndim = self.u8()
        shape = self.unpack(struct.Struct(f"<{ndim}Q")) if ndim else ()
        return KeyRecord(digest, dtype, shape, bool(self.u8()))

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ValueError(f"payload has {len(self.buf) - self.pos} B after its last record")


def _digest(digest: bytes) -> bytes:
    if not isinstance(digest, (bytes, bytearray)) or not 0 < len(digest) < 256:
        raise ValueError(f"digest must be 1..255 bytes, got {digest!r:.80}")
    return _U8.pack(len(digest)) + digest


def _key(key: StoreKey) -> bytes:
    raw = encode_key(key)
    return _U32.pack(len(raw)) + raw


def _locations(locations: Iterable[Location]) -> bytes:
    locations = list(locations)
    return _U32.pack(len(locations)) + b"".join(loc.pack() for loc in locations)


def _record(record: KeyRecord) -> bytes:
    dtype = record.dtype.encode("ascii")
    if len(dtype) > 65535 or len(record.shape) > 255:
        raise InvalidArgument(f"dtype {record.dtype!r} or shape {record.shape} too long to encode")
    return (_digest(record.digest) + _U16.pack(len(dtype)) + dtype + _U8.pack(len(record.shape))
            + b"".join(_U64.pack(d) for d in record.shape) + _U8.pack(record.prefix))


# -------------------------------------------------------------------- directory
class Directory:
    """One rank's directory: serves its :class:`DirectoryState` and calls the other homes.

    Collective in effect: build it on every rank before any rank calls (the handlers
    must be registered before requests arrive; a barrier after construction does it).
    """

    def __init__(self, service: Service, *, lease_s: float = DEFAULT_LEASE_S,
                 state: DirectoryState | None = None) -> None:
        self.service = service
        self.rank, self.size = service.rank, service.size
        self.state = DirectoryState(lease_s=lease_s) if state is None else state  # persist: a journalled one
        s = self.state
        # Each handler: decode the batch, apply each record to the state, encode the results.
        self._serve(OP_CLAIM, self._claim_one)
        self._serve(OP_PUBLISH, lambda src, r: (s.publish(self._mine(r.digest()), r.location()), b"")[1])
        self._serve(OP_LOCATE, lambda src, r: _located(s.locate(self._mine(r.digest()))))
        self._serve(OP_LOAD, lambda src, r: _located(s.load(self._mine(r.digest()), src, time.monotonic())))
        self._serve(OP_UNREF, self._unref_one)
        self._serve(OP_FORGET, lambda src, r: (s.forget(self._mine(r.digest()), src), b"")[1])
        self._serve(OP_MOVE, lambda src, r: _U8.pack(s.move(self._mine(r.digest()), r.location(), r.location())))
        self._serve(OP_DROP_COPY, self._drop_copy_one)
        self._serve(OP_PROTECT, lambda src, r: _located(s.set_protected(self._mine(r.digest()), r.unpack(_I32)[0])))
        self._serve(OP_BIND, lambda src, r: _optional_record(s.bind(self._my_key(r.key()), r.record())))
        self._serve(OP_LOOKUP, lambda src, r: _optional_record(s.lookup(self._my_key(r.key()))))
        self._serve(OP_UNBIND, lambda src, r: _optional_record(s.unbind(self._my_key(r.key()))))
        self.service.register(OP_KEYS, lambda src, payload: b"".join(_key(k) for k in s.keys()))
        self.service.register(OP_BOUND, self._bound)
        self.service.register(OP_SPACE_PROTECTED, lambda src, payload: _U64.pack(s.protected_bytes(bytes(payload))))
        self._serve(OP_SET_PREFIX, lambda src, r: _optional_record(
            s.set_prefix(self._my_key(r.key()), bool(r.u8()), r.digest() or None)))

    # ---------------------------------------------------------------- serving
    def _serve(self, op: int, one: Callable[[int, _Reader], bytes]) -> None:
        def handler(source: int, payload: memoryview) -> bytes:
            r = _Reader(payload)
            out = [one(source, r) for _ in range(r.u32())]
            r.done()
            return b"".join(out)

        self.service.register(op, handler)

    def _mine(self, digest: bytes) -> bytes:
        if home_of_digest(digest, self.size) != self.rank:  # a client bug, cheap to catch here
            raise ValueError(f"digest {digest.hex()} is homed at rank {home_of_digest(digest, self.size)}, "
                             f"not {self.rank}")
        return digest

    def _my_key(self, key: Key) -> Key:
        if home_of_key(key, self.size) != self.rank:
            raise ValueError(f"key {key!r:.80} is homed at rank {home_of_key(key, self.size)}, not {self.rank}")
        return key

    def _claim_one(self, source: int, r: _Reader) -> bytes:
        digest = self._mine(r.digest())
        nbytes, prefix = r.unpack(_CLAIM_REQ)
        c = self.state.claim(digest, nbytes, source, time.monotonic(), bool(prefix))
        return _STATUS_REPLY.pack(c.status, c.pending_rank, c.protected, 0) + _locations(c.locations)

    def _bound(self, source: int, payload: memoryview) -> bytes:
        r = _Reader(payload)
        keys = [self._my_key(r.key()) for _ in range(r.u32())]
        r.done()
        return self.state.bound(keys)

    def _unref_one(self, source: int, r: _Reader) -> bytes:
        digest = self._mine(r.digest())
        out = self.state.unref(digest, source, time.monotonic(), bool(r.u8()))
        return _UNREF_REPLY.pack(out.freed, out.unprotected) + _locations(out.locations)

    def _drop_copy_one(self, source: int, r: _Reader) -> bytes:
        digest = self._mine(r.digest())
        status, protected = self.state.drop_copy(digest, r.location(), bool(r.u8()))
        return _U8.pack(status) + _U32.pack(protected)

    # ---------------------------------------------------------------- calling
    def _fan_out(self, op: int, items: Sequence[T], home: Callable[[T], int], encode: Callable[[T], bytes],
                 decode: Callable[[_Reader], R]) -> list[R]:
        """One request per home rank holding ``items``' records; the results back in ``items``' order."""
        if not items:
            return []
        if len(items) == 1:  # the common single-key call: no grouping
            r = _Reader(self.service.call(home(items[0]), op, b"\x01\x00\x00\x00" + encode(items[0])))
            result = decode(r)
            r.done()
            return [result]
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(home(item), []).append(i)
        requests = [(rank, op, _U32.pack(len(idx)) + b"".join(encode(items[i]) for i in idx))
                    for rank, idx in groups.items()]
        results: list[R] = [None] * len(items)  # type: ignore[list-item]  # every slot is filled below
        for (rank, idx), reply in zip(groups.items(), self.service.call_many(requests), strict=True):
            r = _Reader(reply)
            for i in idx:
                results[i] = decode(r)
            r.done()
        return results

    def _by_digest(self, item: tuple) -> int:
        return home_of_digest(item[0], self.size)

    def _by_key(self, item: tuple) -> int:
        return home_of_key(item[0], self.size)

    # put side
    def claim_many(self, items: Sequence[tuple[bytes, int] | tuple[bytes, int, bool]]) -> list[Claim]:
        """``claim`` each ``(digest, nbytes[, prefix])`` at its home (a prefix claim counts as protected)."""
        def decode(r: _Reader) -> Claim:
            status, pending, protected, _ = r.unpack(_STATUS_REPLY)
            return Claim(ClaimStatus(status), r.locations(), pending, protected)

        return self._fan_out(OP_CLAIM, items, self._by_digest,
                             lambda it: _digest(it[0]) + _CLAIM_REQ.pack(it[1], bool(it[2]) if len(it) > 2 else 0),
                             decode)

    def claim(self, digest: bytes, nbytes: int, prefix: bool = False) -> Claim:
        return self.claim_many([(digest, nbytes, prefix)])[0]

    def claim_settled_many(self, items: Sequence[tuple[bytes, int] | tuple[bytes, int, bool]],
                           timeout: float | None = None) -> list[Claim]:
        """``claim_many``, asking again for the PENDING ones until each is EXISTS or GRANTED (what a put does).

        Waits at most ``timeout`` seconds (default: the service's); a grant lapses after the
        home's lease, so a timeout above the lease only expires when the claimant keeps
        being replaced. Raises :class:`~cascade_kv.errors.PeerTimeout` naming the rank that
        still holds a grant (the claims already settled keep their references: give them back).
        """
        limit = self.service.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        results = self.claim_many(items)
        sleep = _FIRST_POLL_S
        while waiting := [i for i, c in enumerate(results) if c.status is ClaimStatus.PENDING]:
            if time.monotonic() >= deadline:
                c = results[waiting[0]]
                raise PeerTimeout(f"rank {self.rank}: digest {bytes(items[waiting[0]][0]).hex()} still pending "
                                  f"on rank {c.pending_rank} ({len(waiting)} claim(s) pending) after {limit:g} s")
            # The claimant is storing the bytes: polling faster than a store takes only loads the home.
            time.sleep(min(sleep, max(0.0, deadline - time.monotonic())))
            sleep = min(2 * sleep, _MAX_POLL_S)
            for i, c in zip(waiting, self.claim_many([items[i] for i in waiting]), strict=True):
                results[i] = c
        return results

    def claim_settled(self, digest: bytes, nbytes: int, timeout: float | None = None,
                      prefix: bool = False) -> Claim:
        return self.claim_settled_many([(digest, nbytes, prefix)], timeout)[0]

    def publish_many(self, items: Sequence[tuple[bytes, Location]]) -> None:
        self._fan_out(OP_PUBLISH, items, self._by_digest, lambda it: _digest(it[0]) + it[1].pack(), lambda r: None)

    def publish(self, digest: bytes, location: Location) -> None:
        self.publish_many([(digest, location)])

    def bind_many(self, items: Sequence[tuple[Key, KeyRecord]]) -> list[KeyRecord | None]:
        """Bind each key at its home; what each named before (to ``unref``), or None."""
        return self._fan_out(OP_BIND, items, self._by_key, lambda it: _key(it[0]) + _record(it[1]),
                             _read_optional_record)

    def bind(self, key: Key, record: KeyRecord) -> KeyRecord | None:
        return self.bind_many([(key, record)])[0]

    def unref_many(self, items: Sequence[bytes | tuple[bytes, bool]]) -> list[Released]:
        """Drop a reference to each digest (``(digest, prefix)`` to drop a prefix reference)."""
        pairs = [(it, False) if isinstance(it, (bytes, bytearray)) else (it[0], bool(it[1])) for it in items]

        def decode(r: _Reader) -> Released:
            freed, unprotected = r.unpack(_UNREF_REPLY)
            return Released(bool(freed), bool(unprotected), r.locations())

        return self._fan_out(OP_UNREF, pairs, self._by_digest, lambda it: _digest(it[0]) + _U8.pack(it[1]), decode)

    def unref(self, digest: bytes, prefix: bool = False) -> Released:
        return self.unref_many([(digest, prefix)])[0]

    def forget_many(self, digests: Sequence[bytes]) -> None:
        self._fan_out(OP_FORGET, [(d,) for d in digests], self._by_digest, lambda it: _digest(it[0]), lambda r: None)

    def unbind_many(self, keys: Sequence[Key]) -> list[KeyRecord | None]:
        return self._fan_out(OP_UNBIND, [(k,) for k in keys], self._by_key, lambda it: _key(it[0]),
                             _read_optional_record)

    def unbind(self, key: Key) -> KeyRecord | None:
        return self.unbind_many([key])[0]

    def set_prefix(self, key: Key, prefix: bool, digest: bytes | None = None) -> KeyRecord | None:
        """Mark ``key`` as a prefix or not at its home, only while it names ``digest`` if given; its record
        before the change (None: not bound)."""
        return self._fan_out(OP_SET_PREFIX, [(key,)], self._by_key,
                             lambda it: _key(it[0]) + _U8.pack(prefix) + (_digest(digest) if digest else _U8.pack(0)),
                             _read_optional_record)[0]

    # get side
    def lookup_many(self, keys: Sequence[Key]) -> list[KeyRecord | None]:
        return self._fan_out(OP_LOOKUP, [(k,) for k in keys], self._by_key, lambda it: _key(it[0]),
                             _read_optional_record)

    def lookup(self, key: Key) -> KeyRecord | None:
        return self.lookup_many([key])[0]

    def bound_many(self, keys: Sequence[StoreKey]) -> list[bool]:
        """Whether each key is bound: ``lookup_many`` answering one byte per key instead of its record (a
        prompt's prefix keys are thousands: records would cost ~60 B and a few us to decode each)."""
        return self._fan_out(OP_BOUND, [(k,) for k in keys], self._by_key, lambda it: _key(it[0]),
                             lambda r: bool(r.u8()))

    def keys(self) -> list[Key]:
        """Every key bound anywhere (one request to every rank): a snapshot, in no particular order."""
        out: list[Key] = []
        for reply in self.service.call_many([(r, OP_KEYS, b"") for r in range(self.size)]):
            r = _Reader(reply)
            while r.pos < len(r.buf):
                out.append(r.key())
        return out

    def protected_bytes(self, tag: bytes) -> int:
        """Bytes of a namespace's protected blocks over every home (one request to every rank): a snapshot."""
        return sum(_U64.unpack(reply)[0]
                   for reply in self.service.call_many([(r, OP_SPACE_PROTECTED, tag) for r in range(self.size)]))

    def locate_many(self, digests: Sequence[bytes]) -> list[Located]:
        return self._fan_out(OP_LOCATE, [(d,) for d in digests], self._by_digest, lambda it: _digest(it[0]),
                             _read_located)

    def locate(self, digest: bytes) -> Located:
        return self.locate_many([digest])[0]

    def load_many(self, digests: Sequence[bytes]) -> list[Located]:
        """Ask for a load lease on each digest found on disk only (see :class:`LoadStatus`)."""
        return self._fan_out(OP_LOAD, [(d,) for d in digests], self._by_digest, lambda it: _digest(it[0]),
                             _read_located)

    # moves and protection
    def move_many(self, items: Sequence[tuple[bytes, Location, Location]]) -> list[bool]:
        return self._fan_out(OP_MOVE, items, self._by_digest,
                             lambda it: _digest(it[0]) + it[1].pack() + it[2].pack(), lambda r: bool(r.u8()))

    def move(self, digest: bytes, old: Location, new: Location) -> bool:
        return self.move_many([(digest, old, new)])[0]

    def drop_copy(self, digest: bytes, location: Location, force: bool = False) -> tuple[CopyStatus, int]:
        return self._fan_out(OP_DROP_COPY, [(digest,)], self._by_digest,
                             lambda it: _digest(it[0]) + location.pack() + _U8.pack(force),
                             lambda r: (CopyStatus(r.u8()), r.u32()))[0]

    def set_protected_many(self, items: Sequence[tuple[bytes, int]]) -> list[Located]:
        return self._fan_out(OP_PROTECT, items, self._by_digest, lambda it: _digest(it[0]) + _I32.pack(it[1]),
                             _read_located)

    def set_protected(self, digest: bytes, delta: int) -> Located:
        return self.set_protected_many([(digest, delta)])[0]


def _located(x: Located) -> bytes:
    return _STATUS_REPLY.pack(x.status, x.pending_rank, x.protected, x.refs) + _locations(x.locations)


def _read_located(r: _Reader) -> Located:
    status, pending, protected, refs = r.unpack(_STATUS_REPLY)
    return Located(r.locations(), protected, LoadStatus(status), pending, refs)


def _optional_record(record: KeyRecord | None) -> bytes:
    return b"\x00" if record is None else b"\x01" + _record(record)


def _read_optional_record(r: _Reader) -> KeyRecord | None:
    return r.record() if r.u8() else None


__all__ = ["DEFAULT_LEASE_S", "LOCATION", "OPS", "TIER_DISK", "TIER_MEMORY", "Claim", "ClaimStatus", "CopyStatus",
           "Directory", "DirectoryState", "HomeStats", "KeyRecord", "dtype_of", "dtype_text", "LoadStatus", "Located", "Location", "Released"]
