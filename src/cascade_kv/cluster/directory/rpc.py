"""The directory over MPI: :class:`Directory` serves this rank's :class:`~.state.DirectoryState` through the
rank's :class:`~..service.Service` and is the client every rank calls.

Handlers only touch local state under the state's lock and never wait on another rank, as the service
requires. A call to one's own rank runs the handler on the calling thread, concurrently with the service
thread, hence the state's lock. Every op is batched (:mod:`.codec`): the client sends one request per home
rank (:meth:`Service.call_many`) and the single-item calls are thin wrappers.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from ...errors import PeerTimeout
from ...ids import Key, StoreKey
from ..homes import decode_key, encode_key, home_of_digest, home_of_encoded
from ..service import Service
from .codec import (_CLAIM_REQ, _I32, _STATUS_REPLY, _U8, _U32, _U64, _UNREF_REPLY, _digest, _key, _located,
                    _locations, _optional_record, _read_located, _read_optional_record, _Reader, _record)
from .records import DEFAULT_LEASE_S, Claim, ClaimStatus, CopyStatus, KeyRecord, Located, Location, Released
from .state import DirectoryState

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

_FIRST_POLL_S = 200e-6
_MAX_POLL_S = 10e-3
"""Bounds of the wait between claims of a PENDING digest (doubling: a store takes ~0.1-10 ms)."""


# Engines ask about the same keys again and again (a prompt's prefix blocks, by every request that shares
# them): each side remembers what a key costs to encode, decode and hash. Bounded by entries (a key and its
# wire form, ~100-200 B each).
_KEY_CACHE = 1 << 16


@functools.lru_cache(maxsize=_KEY_CACHE)
def _key_route(key: StoreKey, size: int) -> tuple[int, bytes]:
    """A key's home and its wire form (u32 length + :func:`~..homes.encode_key`)."""
    raw = encode_key(key)
    return home_of_encoded(raw, size), _U32.pack(len(raw)) + raw


@functools.lru_cache(maxsize=_KEY_CACHE)
def _key_at_home(raw: bytes, size: int) -> tuple[StoreKey, int]:
    """The key a request names, and its home."""
    return decode_key(raw), home_of_encoded(raw, size)


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
        self._serve(OP_BIND, lambda src, r: _optional_record(s.bind(self._my_key(r), r.record())))
        self.service.register(OP_LOOKUP, self._lookup_batch)
        self._serve(OP_UNBIND, lambda src, r: _optional_record(s.unbind(self._my_key(r))))
        self.service.register(OP_KEYS, lambda src, payload: b"".join(_key(k) for k in s.keys()))
        self.service.register(OP_BOUND, self._bound)
        self.service.register(OP_SPACE_PROTECTED, lambda src, payload: _U64.pack(s.protected_bytes(bytes(payload))))
        self._serve(OP_SET_PREFIX, lambda src, r: _optional_record(
            s.set_prefix(self._my_key(r), bool(r.u8()), r.digest() or None)))

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

    def _my_key(self, r: _Reader) -> Key:
        """The next key of a request, checked to be homed here (from its wire bytes: no second encoding)."""
        key, home = _key_at_home(r.take(r.u32()), self.size)
        if home != self.rank:
            raise ValueError(f"key {key!r:.80} is homed at rank {home}, not {self.rank}")
        return key

    def _claim_one(self, source: int, r: _Reader) -> bytes:
        digest = self._mine(r.digest())
        nbytes, prefix = r.unpack(_CLAIM_REQ)
        c = self.state.claim(digest, nbytes, source, time.monotonic(), bool(prefix))
        return _STATUS_REPLY.pack(c.status, c.pending_rank, c.protected, 0) + _locations(c.locations)

    def _lookup_batch(self, source: int, payload: memoryview) -> bytes:
        """OP_LOOKUP, the read path's one request per batch: the keys parsed in one loop, looked up under one
        hold of the state's lock, each distinct record encoded once (``_serve``'s per-record calls cost ~2 us
        a key here)."""
        keys = self._keys_of(payload)
        return b"".join([_optional_record(rec) for rec in self.state.lookup_many(keys)])

    def _keys_of(self, payload: memoryview) -> list[Key]:
        """The keys of a batch request that is only keys, each checked to be homed here; ValueError for a
        malformed payload (the codec's :class:`_Reader` says where it ends short or runs long)."""
        r = _Reader(payload)
        keys = [self._my_key(r) for _ in range(r.u32())]
        r.done()
        return keys

    def _bound(self, source: int, payload: memoryview) -> bytes:
        return self.state.bound(self._keys_of(payload))

    def _unref_one(self, source: int, r: _Reader) -> bytes:
        digest = self._mine(r.digest())
        out = self.state.unref(digest, source, time.monotonic(), bool(r.u8()))
        return _UNREF_REPLY.pack(out.freed, out.unprotected) + _locations(out.locations)

    def _drop_copy_one(self, source: int, r: _Reader) -> bytes:
        digest = self._mine(r.digest())
        status, protected = self.state.drop_copy(digest, r.location(), bool(r.u8()))
        return _U8.pack(status) + _U32.pack(protected)

    # ---------------------------------------------------------------- calling
    def _fan_out(self, op: int, items: Sequence[T], route: Callable[[T], tuple[int, bytes]],
                 decode: Callable[[_Reader], R]) -> list[R]:
        """One request per home rank holding ``items``' records; the results back in ``items``' order.
        ``route(item)`` gives the item's home and its encoded request (see :meth:`_by_digest`, :meth:`_by_key`)."""
        if not items:
            return []
        if len(items) == 1:  # the common single-key call: no grouping
            home, piece = route(items[0])
            r = _Reader(self.service.call(home, op, b"\x01\x00\x00\x00" + piece))
            result = decode(r)
            r.done()
            return [result]
        groups: dict[int, list[int]] = {}
        pieces: list[bytes] = []
        for i, item in enumerate(items):
            home, piece = route(item)
            pieces.append(piece)
            groups.setdefault(home, []).append(i)
        requests = [(rank, op, _U32.pack(len(idx)) + b"".join([pieces[i] for i in idx]))
                    for rank, idx in groups.items()]
        results: list[R] = [None] * len(items)  # type: ignore[list-item]  # every slot is filled below
        for (rank, idx), reply in zip(groups.items(), self.service.call_many(requests), strict=True):
            r = _Reader(reply)
            for i in idx:
                results[i] = decode(r)
            r.done()
        return results

    def _by_digest(self, encode: Callable[[T], bytes]) -> Callable[[T], tuple[int, bytes]]:
        """Route items whose first field is a digest to the digest's home; ``encode(item)`` is the request."""
        size = self.size
        return lambda it: (home_of_digest(it[0], size), encode(it))

    def _by_key(self, extra: Callable[[T], bytes] | None = None) -> Callable[[T], tuple[int, bytes]]:
        """Route items whose first field is a key to the key's home; the request is the key's wire form, then
        ``extra(item)``. The key is encoded once for both (encoding and hashing cost ~1 us each per key), and
        once per process for a key asked about again (:func:`_key_route`)."""
        size = self.size

        def route(it: T) -> tuple[int, bytes]:
            home, piece = _key_route(it[0], size)  # type: ignore[index]
            return home, piece if extra is None else piece + extra(it)

        return route

    # put side
    def claim_many(self, items: Sequence[tuple[bytes, int] | tuple[bytes, int, bool]]) -> list[Claim]:
        """``claim`` each ``(digest, nbytes[, prefix])`` at its home (a prefix claim counts as protected)."""
        def decode(r: _Reader) -> Claim:
            status, pending, protected, _ = r.unpack(_STATUS_REPLY)
            return Claim(ClaimStatus(status), r.locations(), pending, protected)

        return self._fan_out(OP_CLAIM, items, self._by_digest(
            lambda it: _digest(it[0]) + _CLAIM_REQ.pack(it[1], bool(it[2]) if len(it) > 2 else 0)), decode)

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
        self._fan_out(OP_PUBLISH, items, self._by_digest(lambda it: _digest(it[0]) + it[1].pack()), lambda r: None)

    def publish(self, digest: bytes, location: Location) -> None:
        self.publish_many([(digest, location)])

    def bind_many(self, items: Sequence[tuple[Key, KeyRecord]]) -> list[KeyRecord | None]:
        """Bind each key at its home; what each named before (to ``unref``), or None."""
        return self._fan_out(OP_BIND, items, self._by_key(lambda it: _record(it[1])), _read_optional_record)

    def bind(self, key: Key, record: KeyRecord) -> KeyRecord | None:
        return self.bind_many([(key, record)])[0]

    def unref_many(self, items: Sequence[bytes | tuple[bytes, bool]]) -> list[Released]:
        """Drop a reference to each digest (``(digest, prefix)`` to drop a prefix reference)."""
        pairs = [(it, False) if isinstance(it, (bytes, bytearray)) else (it[0], bool(it[1])) for it in items]

        def decode(r: _Reader) -> Released:
            freed, unprotected = r.unpack(_UNREF_REPLY)
            return Released(bool(freed), bool(unprotected), r.locations())

        return self._fan_out(OP_UNREF, pairs, self._by_digest(lambda it: _digest(it[0]) + _U8.pack(it[1])), decode)

    def unref(self, digest: bytes, prefix: bool = False) -> Released:
        return self.unref_many([(digest, prefix)])[0]

    def forget_many(self, digests: Sequence[bytes]) -> None:
        self._fan_out(OP_FORGET, [(d,) for d in digests], self._by_digest(lambda it: _digest(it[0])), lambda r: None)

    def unbind_many(self, keys: Sequence[Key]) -> list[KeyRecord | None]:
        return self._fan_out(OP_UNBIND, [(k,) for k in keys], self._by_key(), _read_optional_record)

    def unbind(self, key: Key) -> KeyRecord | None:
        return self.unbind_many([key])[0]

    def set_prefix(self, key: Key, prefix: bool, digest: bytes | None = None) -> KeyRecord | None:
        """Mark ``key`` as a prefix or not at its home, only while it names ``digest`` if given; its record
        before the change (None: not bound)."""
        return self._fan_out(OP_SET_PREFIX, [(key,)], self._by_key(
            lambda it: _U8.pack(prefix) + (_digest(digest) if digest else _U8.pack(0))), _read_optional_record)[0]

    # get side
    def lookup_many(self, keys: Sequence[Key]) -> list[KeyRecord | None]:
        return self._fan_out(OP_LOOKUP, [(k,) for k in keys], self._by_key(), _read_optional_record)

    def lookup(self, key: Key) -> KeyRecord | None:
        return self.lookup_many([key])[0]

    def bound_many(self, keys: Sequence[StoreKey]) -> list[bool]:
        """Whether each key is bound: ``lookup_many`` answering one byte per key instead of its record (a
        prompt's prefix keys are thousands: records would cost ~60 B and a few us to decode each)."""
        return self._fan_out(OP_BOUND, [(k,) for k in keys], self._by_key(), lambda r: bool(r.u8()))

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
        return self._fan_out(OP_LOCATE, [(d,) for d in digests], self._by_digest(lambda it: _digest(it[0])), _read_located)

    def locate(self, digest: bytes) -> Located:
        return self.locate_many([digest])[0]

    def load_many(self, digests: Sequence[bytes]) -> list[Located]:
        """Ask for a load lease on each digest found on disk only (see :class:`LoadStatus`)."""
        return self._fan_out(OP_LOAD, [(d,) for d in digests], self._by_digest(lambda it: _digest(it[0])), _read_located)

    # moves and protection
    def move_many(self, items: Sequence[tuple[bytes, Location, Location]]) -> list[bool]:
        return self._fan_out(OP_MOVE, items, self._by_digest(lambda it: _digest(it[0]) + it[1].pack() + it[2].pack()),
                             lambda r: bool(r.u8()))

    def move(self, digest: bytes, old: Location, new: Location) -> bool:
        return self.move_many([(digest, old, new)])[0]

    def drop_copy(self, digest: bytes, location: Location, force: bool = False) -> tuple[CopyStatus, int]:
        return self._fan_out(OP_DROP_COPY, [(digest,)], self._by_digest(lambda it: _digest(it[0]) + location.pack() + _U8.pack(force)),
                             lambda r: (CopyStatus(r.u8()), r.u32()))[0]

    def set_protected_many(self, items: Sequence[tuple[bytes, int]]) -> list[Located]:
        return self._fan_out(OP_PROTECT, items, self._by_digest(lambda it: _digest(it[0]) + _I32.pack(it[1])), _read_located)

    def set_protected(self, digest: bytes, delta: int) -> Located:
        return self.set_protected_many([(digest, delta)])[0]



__all__ = ["OPS", "Directory"]
