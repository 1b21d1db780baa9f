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
UTF-8 or ``b"b"`` + raw, as in ``homes.py``); location = :data:`LOCATION`;
locations = ``u32 count`` + locations; array metadata = ``u8 len`` + numpy
``dtype.str`` (ASCII), ``u8 ndim`` + ``ndim`` little-endian u64 dims.
"""
from __future__ import annotations

import enum
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..arrays import check_key
from ..errors import BlockNotFound, PeerTimeout
from ..ids import Digest, Key
from .homes import home_of_digest, home_of_key
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
OPS = range(16, 32)
"""The op numbers reserved for the directory."""

LOCATION = struct.Struct("<iBQQQ")
"""rank (i32), tier (u8), offset (u64), nbytes (u64), generation (u64): 29 bytes."""

DEFAULT_LEASE_S = 10.0
"""How long a GRANTED claim holds a digest before the next caller is granted instead."""

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_CLAIM_REQ = struct.Struct("<Q")  # nbytes, after the digest
_CLAIM_REPLY = struct.Struct("<Bi")  # status, pending rank (-1 unless PENDING); then locations
_STR_TAG, _BYTES_TAG = b"s", b"b"
_FIRST_POLL_S = 200e-6
_MAX_POLL_S = 10e-3
"""Bounds of the wait between claims of a PENDING digest (doubling: a store takes ~0.1-10 ms)."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where one copy of a block lies."""

    rank: int
    """Rank whose tier holds the copy."""
    tier: int
    """Which tier of that rank (the store's numbering: memory, disk, ...)."""
    offset: int
    """Offset of the slot in the tier (the slot header's offset in an arena)."""
    nbytes: int
    """Size of the block."""
    generation: int
    """Allocation generation of the slot: a reader that finds another one there knows the copy moved."""

    def pack(self) -> bytes:
        return LOCATION.pack(self.rank, self.tier, self.offset, self.nbytes, self.generation)


class ClaimStatus(enum.IntEnum):
    EXISTS = 0
    """The block is stored already (a dedup hit): nothing to transfer; a reference was taken."""
    GRANTED = 1
    """The caller must store the block and ``publish`` it; a reference was taken."""
    PENDING = 2
    """Another rank holds the grant and has not published: ask again later; no reference was taken."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A home's answer to ``claim``."""

    status: ClaimStatus
    locations: tuple[Location, ...] = ()
    """The copies, when ``status`` is EXISTS."""
    pending_rank: int = -1
    """The rank holding the grant, when ``status`` is PENDING."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What a key names: a digest and the array metadata to rebuild the value."""

    digest: Digest
    dtype: str
    """numpy ``dtype.str`` (e.g. ``"<f4"``): plain dtypes only, no structured or object dtypes."""
    shape: tuple[int, ...]
    prefix: bool = False
    """The key is a prefix (its block is protected from leaving cluster memory)."""


@dataclass(slots=True)
class _DigestEntry:
    nbytes: int
    refs: int = 0
    """Keys bound to the digest plus puts in flight (claims answered EXISTS or GRANTED)."""
    protected: int = 0
    """Prefix keys among the references."""
    locations: list[Location] = field(default_factory=list)
    pending_rank: int = -1
    """Rank holding an unpublished grant, or -1."""
    pending_deadline: float = 0.0
    """``now`` past which the grant lapses (the caller's clock: ``time.monotonic`` on the home)."""


class DirectoryState:
    """The directory entries one rank is home for. Thread-safe; never talks to other ranks."""

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
    def claim(self, digest: bytes, nbytes: int, rank: int, now: float) -> Claim:
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None:
                entry = self._digests[digest] = _DigestEntry(nbytes)
            elif entry.nbytes != nbytes:
                raise ValueError(f"digest {digest.hex()}: claimed with {nbytes} B, known with {entry.nbytes} B")
            if entry.locations:
                entry.refs += 1
                return Claim(ClaimStatus.EXISTS, tuple(entry.locations))
            if entry.pending_rank >= 0 and now < entry.pending_deadline:
                return Claim(ClaimStatus.PENDING, pending_rank=entry.pending_rank)
            entry.refs += 1
            entry.pending_rank, entry.pending_deadline = rank, now + self.lease_s
            return Claim(ClaimStatus.GRANTED)

    def publish(self, digest: bytes, location: Location) -> None:
        """Record a stored copy; it completes the claim (a lapsed claimant may publish too: one more copy)."""
        with self._lock:
            entry = self._entry(digest)
            if location.nbytes != entry.nbytes:
                raise ValueError(f"digest {digest.hex()}: published {location.nbytes} B, claimed {entry.nbytes} B")
            if location not in entry.locations:
                entry.locations.append(location)
            entry.pending_rank = -1

    def locate(self, digest: bytes) -> list[Location]:
        """The copies of ``digest``; empty for an unknown or not yet published digest (a miss)."""
        with self._lock:
            entry = self._digests.get(digest)
            return list(entry.locations) if entry is not None else []

    def unref(self, digest: bytes) -> list[Location]:
        """Drop a reference; at zero the digest is forgotten and its copies returned, for their owners to free."""
        with self._lock:
            entry = self._entry(digest)
            assert entry.refs > 0, (digest.hex(), entry)  # an entry at zero refs is deleted below
            entry.refs -= 1
            if entry.refs:
                return []
            del self._digests[digest]
            return entry.locations

    def move(self, digest: bytes, old: Location, new: Location) -> bool:
        """Replace copy ``old`` by ``new``; False (nothing changed) when ``old`` is not a copy any more."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None or old not in entry.locations:
                return False
            entry.locations[entry.locations.index(old)] = new
            return True

    def set_protected(self, digest: bytes, delta: int) -> int:
        """Add ``delta`` to the count of prefix keys referencing ``digest``; returns the new count."""
        with self._lock:
            entry = self._entry(digest)
            if entry.protected + delta < 0:
                raise ValueError(f"digest {digest.hex()}: protected count {entry.protected} {delta:+d} < 0")
            entry.protected += delta
            return entry.protected

    # ------------------------------------------------------------------ keys
    def bind(self, key: Key, record: KeyRecord) -> Digest | None:
        """Point ``key`` at ``record``; returns the digest it named before (for the caller to unref), or None."""
        with self._lock:
            old = self._keys.get(key)
            self._keys[key] = record
            return old.digest if old is not None else None

    def lookup(self, key: Key) -> KeyRecord | None:
        with self._lock:
            return self._keys.get(key)

    def unbind(self, key: Key) -> Digest | None:
        """Forget ``key``; returns its digest (for the caller to unref), or None if it was not bound."""
        with self._lock:
            old = self._keys.pop(key, None)
            return old.digest if old is not None else None


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
        return s.unpack(self.take(s.size))

    def u8(self) -> int:
        return self.unpack(_U8)[0]

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def digest(self) -> bytes:
        return self.take(self.u8())

    def key(self) -> Key:
        raw = self.take(self.u32())
        tag, body = raw[:1], raw[1:]
        if tag == _STR_TAG:
            return body.decode("utf-8", "surrogatepass")
        if tag == _BYTES_TAG:
            return body
        raise ValueError(f"key with unknown type tag {tag!r}")

    def location(self) -> Location:
        return Location(*self.unpack(LOCATION))

    def locations(self) -> tuple[Location, ...]:
        return tuple(self.location() for _ in range(self.u32()))

    def record(self) -> KeyRecord:
        digest = Digest(self.digest())
        dtype = self.take(self.u8()).decode("ascii")
        shape = tuple(self.unpack(_U64)[0] for _ in range(self.u8()))
        return KeyRecord(digest, dtype, shape, bool(self.u8()))

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ValueError(f"payload has {len(self.buf) - self.pos} B after its last record")


def _digest(digest: bytes) -> bytes:
    if not isinstance(digest, (bytes, bytearray)) or not 0 < len(digest) < 256:
        raise ValueError(f"digest must be 1..255 bytes, got {digest!r:.80}")
    return _U8.pack(len(digest)) + digest


def _key(key: Key) -> bytes:
    check_key(key)
    raw = _STR_TAG + key.encode("utf-8", "surrogatepass") if isinstance(key, str) else _BYTES_TAG + key
    return _U32.pack(len(raw)) + raw


def _locations(locations: Iterable[Location]) -> bytes:
    locations = list(locations)
    return _U32.pack(len(locations)) + b"".join(loc.pack() for loc in locations)


def _record(record: KeyRecord) -> bytes:
    dtype = record.dtype.encode("ascii")
    if len(dtype) > 255 or len(record.shape) > 255:
        raise ValueError(f"dtype {record.dtype!r} or shape {record.shape} too long to encode")
    return (_digest(record.digest) + _U8.pack(len(dtype)) + dtype + _U8.pack(len(record.shape))
            + b"".join(_U64.pack(d) for d in record.shape) + _U8.pack(record.prefix))


def _optional_digest(digest: bytes | None) -> bytes:
    return b"\x00" if digest is None else _digest(digest)


def _read_optional_digest(r: _Reader) -> Digest | None:
    n = r.u8()
    return Digest(r.take(n)) if n else None


# -------------------------------------------------------------------- directory
class Directory:
    """One rank's directory: serves its :class:`DirectoryState` and calls the other homes.

    Collective in effect: build it on every rank before any rank calls (the handlers
    must be registered before requests arrive; a barrier after construction does it).
    """

    def __init__(self, service: Service, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.service = service
        self.rank, self.size = service.rank, service.size
        self.state = DirectoryState(lease_s=lease_s)
        s = self.state
        # Each handler: decode the batch, apply each record to the state, encode the results.
        self._serve(OP_CLAIM, lambda src, r: self._claim_one(src, r.digest(), r.unpack(_CLAIM_REQ)[0]))
        self._serve(OP_PUBLISH, lambda src, r: (s.publish(self._mine(r.digest()), r.location()), b"")[1])
        self._serve(OP_LOCATE, lambda src, r: _locations(s.locate(self._mine(r.digest()))))
        self._serve(OP_UNREF, lambda src, r: _locations(s.unref(self._mine(r.digest()))))
        self._serve(OP_MOVE, lambda src, r: _U8.pack(s.move(self._mine(r.digest()), r.location(), r.location())))
        self._serve(OP_PROTECT, lambda src, r: _U32.pack(s.set_protected(self._mine(r.digest()),
                                                                         r.unpack(_I32)[0])))
        self._serve(OP_BIND, lambda src, r: _optional_digest(s.bind(self._my_key(r.key()), r.record())))
        self._serve(OP_LOOKUP, lambda src, r: self._lookup_one(self._my_key(r.key())))
        self._serve(OP_UNBIND, lambda src, r: _optional_digest(s.unbind(self._my_key(r.key()))))

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

    def _claim_one(self, source: int, digest: bytes, nbytes: int) -> bytes:
        c = self.state.claim(self._mine(digest), nbytes, source, time.monotonic())
        return _CLAIM_REPLY.pack(c.status, c.pending_rank) + _locations(c.locations)

    def _lookup_one(self, key: Key) -> bytes:
        record = self.state.lookup(key)
        return b"\x00" if record is None else b"\x01" + _record(record)

    # ---------------------------------------------------------------- calling
    def _fan_out(self, op: int, items: Sequence[T], home: Callable[[T], int], encode: Callable[[T], bytes],
                 decode: Callable[[_Reader], R]) -> list[R]:
        """One request per home rank holding ``items``' records; the results back in ``items``' order."""
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
    def claim_many(self, items: Sequence[tuple[bytes, int]]) -> list[Claim]:
        """``claim`` each ``(digest, nbytes)`` at its home."""
        def decode(r: _Reader) -> Claim:
            status, pending = r.unpack(_CLAIM_REPLY)
            return Claim(ClaimStatus(status), r.locations(), pending)

        return self._fan_out(OP_CLAIM, items, self._by_digest, lambda it: _digest(it[0]) + _CLAIM_REQ.pack(it[1]),
                             decode)

    def claim(self, digest: bytes, nbytes: int) -> Claim:
        return self.claim_many([(digest, nbytes)])[0]

    def claim_settled_many(self, items: Sequence[tuple[bytes, int]], timeout: float | None = None) -> list[Claim]:
        """``claim_many``, asking again for the PENDING ones until each is EXISTS or GRANTED (what a put does).

        Waits at most ``timeout`` seconds (default: the service's); a grant lapses after the
        home's lease, so a timeout above the lease only expires when the claimant keeps
        being replaced. Raises :class:`~cascade_kv.errors.PeerTimeout` naming the rank that
        still holds a grant.
        """
        deadline = time.monotonic() + (self.service.timeout if timeout is None else timeout)
        results = self.claim_many(items)
        sleep = _FIRST_POLL_S
        while waiting := [i for i, c in enumerate(results) if c.status is ClaimStatus.PENDING]:
            if time.monotonic() >= deadline:
                c = results[waiting[0]]
                raise PeerTimeout(f"rank {self.rank}: digest {bytes(items[waiting[0]][0]).hex()} still pending "
                                  f"on rank {c.pending_rank} ({len(waiting)} claim(s) pending) after "
                                  f"{self.service.timeout if timeout is None else timeout:g} s")
            # The claimant is storing the bytes: polling faster than a store takes only loads the home.
            time.sleep(min(sleep, max(0.0, deadline - time.monotonic())))
            sleep = min(2 * sleep, _MAX_POLL_S)
            for i, c in zip(waiting, self.claim_many([items[i] for i in waiting]), strict=True):
                results[i] = c
        return results

    def claim_settled(self, digest: bytes, nbytes: int, timeout: float | None = None) -> Claim:
        return self.claim_settled_many([(digest, nbytes)], timeout)[0]

    def publish_many(self, items: Sequence[tuple[bytes, Location]]) -> None:
        self._fan_out(OP_PUBLISH, items, self._by_digest, lambda it: _digest(it[0]) + it[1].pack(), lambda r: None)

    def publish(self, digest: bytes, location: Location) -> None:
        self.publish_many([(digest, location)])

    def bind_many(self, items: Sequence[tuple[Key, KeyRecord]]) -> list[Digest | None]:
        """Bind each key at its home; the digests they named before (to ``unref``), or None."""
        return self._fan_out(OP_BIND, items, self._by_key, lambda it: _key(it[0]) + _record(it[1]),
                             _read_optional_digest)

    def bind(self, key: Key, record: KeyRecord) -> Digest | None:
        return self.bind_many([(key, record)])[0]

    def unref_many(self, digests: Sequence[bytes]) -> list[tuple[Location, ...]]:
        """Drop a reference to each digest; for those that reached zero, the copies to free."""
        return self._fan_out(OP_UNREF, [(d,) for d in digests], self._by_digest, lambda it: _digest(it[0]),
                             _Reader.locations)

    def unref(self, digest: bytes) -> tuple[Location, ...]:
        return self.unref_many([digest])[0]

    def unbind_many(self, keys: Sequence[Key]) -> list[Digest | None]:
        return self._fan_out(OP_UNBIND, [(k,) for k in keys], self._by_key, lambda it: _key(it[0]),
                             _read_optional_digest)

    def unbind(self, key: Key) -> Digest | None:
        return self.unbind_many([key])[0]

    # get side
    def lookup_many(self, keys: Sequence[Key]) -> list[KeyRecord | None]:
        return self._fan_out(OP_LOOKUP, [(k,) for k in keys], self._by_key, lambda it: _key(it[0]),
                             lambda r: r.record() if r.u8() else None)

    def lookup(self, key: Key) -> KeyRecord | None:
        return self.lookup_many([key])[0]

    def locate_many(self, digests: Sequence[bytes]) -> list[tuple[Location, ...]]:
        return self._fan_out(OP_LOCATE, [(d,) for d in digests], self._by_digest, lambda it: _digest(it[0]),
                             _Reader.locations)

    def locate(self, digest: bytes) -> tuple[Location, ...]:
        return self.locate_many([digest])[0]

    # moves and protection
    def move(self, digest: bytes, old: Location, new: Location) -> bool:
        return self._fan_out(OP_MOVE, [(digest,)], self._by_digest,
                             lambda it: _digest(it[0]) + old.pack() + new.pack(), lambda r: bool(r.u8()))[0]

    def set_protected(self, digest: bytes, delta: int) -> int:
        return self._fan_out(OP_PROTECT, [(digest,)], self._by_digest,
                             lambda it: _digest(it[0]) + _I32.pack(delta), lambda r: r.u32())[0]


__all__ = ["DEFAULT_LEASE_S", "LOCATION", "OPS", "Claim", "ClaimStatus", "Directory", "DirectoryState",
           "KeyRecord", "Location"]
