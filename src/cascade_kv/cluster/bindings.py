"""Key records a rank remembers, kept right by its homes' binding versions: a get of keys read before asks no one.

A get must learn what each key names now, and the key's home knows: a request that the home's service thread
answers, behind whatever holds the home's GIL (at a peer busy reading, 130-210 us median and ~1 ms at the 90th
percentile in the scaling runs, against 1.8 ms of copies for a 16 MiB batch). Every home publishes, in its
window, a version per bucket of the keys it is home for (:data:`~.window.BINDING_BUCKETS`), moved whenever a
key of the bucket is bound, rebound or unbound there (:meth:`~.window.ArenaWindow.bump_binding`). A reader
reads the versions of a batch's buckets one-sidedly, in one epoch and without the homes: a key whose record it
remembers with the same version is not asked about; the others are, and their records are remembered with the
versions read *before* asking.

Why a remembered record is right. The home moves a bucket's version inside the same hold of its directory
lock as the change, and answers lookups under that lock. Say the version read before a lookup was V, and the
lookup answered R. If a read later shows V again, no change to a key of the bucket happened between the two
reads (each would have moved it, and versions never repeat: 64 bits): the change that R reflects, if any,
was done (its lock held) before the lookup was answered, after the first read, so it moved the version to
something other than V, unless it had already moved it before the first read. So at the second read the key
still names R, and the bytes read after it (checked by their slot headers, :mod:`.rma`) are that value: the
get is as if it happened at that read. A version read torn by the home's update does not complement
(:data:`~.window.BINDING`) and counts as changed. Other keys of the same bucket changing only costs a
lookup.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import blake3
from mpi4py import MPI

from ..ids import StoreKey
from .directory import KeyRecord
from .homes import encode_key
from .window import BINDING, BINDING_BUCKETS, BINDINGS_OFFSET, ArenaWindow, lock_all

REMEMBERED = 65536
"""Key records a rank keeps (a few MB of Python objects at most); past it the oldest are forgotten."""
_TYPED_FROM = 4
"""A home with this many of a batch's buckets is read with one ``Get`` through a derived datatype."""
_MASK = (1 << 64) - 1


@functools.lru_cache(maxsize=REMEMBERED)
def route(key: StoreKey, size: int) -> tuple[int, int]:
    """A key's home among ``size`` ranks (as :func:`~.homes.home_of_key`: the first 8 bytes of BLAKE3 of the
    encoded key) and its binding bucket (the next 4)."""
    h = blake3.blake3(encode_key(key)).digest(length=12)
    return int.from_bytes(h[:8], "little") % size, int.from_bytes(h[8:], "little") % BINDING_BUCKETS


class Bindings:
    """One rank's remembered key records. Thread-safe: lookups of the dict are single operations under the GIL,
    changes are made under a lock, and epochs on the window take turns."""

    def __init__(self, window: ArenaWindow) -> None:
        self.window = window
        self._known: dict[StoreKey, tuple[KeyRecord, int]] = {}
        self._lock = threading.Lock()
        self.confirmed = 0
        """Keys a get took from memory after reading their versions, not from their home (tests, benchmark)."""

    def bump(self, key: StoreKey) -> None:
        """The directory changed ``key``'s binding here (this rank is its home): move its bucket's version."""
        self.window.bump_binding(route(key, self.window.size)[1])

    def records(self, keys: Sequence[StoreKey],
                lookup: Callable[[list[StoreKey]], list[KeyRecord | None]]) -> list[KeyRecord | None]:
        """Each key's record (None: not bound): remembered ones whose bucket's version has not moved, the
        others from ``lookup`` (their homes), remembered for next time."""
        size = self.window.size
        routes = [route(k, size) for k in keys]
        versions = self.versions(routes)
        out: list[KeyRecord | None] = [None] * len(keys)
        ask = []
        known = self._known
        for i, (k, v) in enumerate(zip(keys, versions)):
            hit = known.get(k)
            if hit is not None and v is not None and hit[1] == v:
                out[i] = hit[0]
            else:
                ask.append(i)
        self.confirmed += len(keys) - len(ask)
        if ask:
            answers = lookup([keys[i] for i in ask])
            with self._lock:  # another thread's get may be remembering too: the trim below iterates
                for i, r in zip(ask, answers):
                    out[i] = r
                    k, v = keys[i], versions[i]
                    known.pop(k, None)
                    if r is not None and v is not None:
                        known[k] = (r, v)
                while len(known) > REMEMBERED:
                    del known[next(iter(known))]  # the oldest (dicts keep insertion order)
        return out

    def forget(self) -> None:
        """Drop every remembered record (the next get asks the homes for all of its keys)."""
        with self._lock:
            self._known.clear()

    def versions(self, routes: Sequence[tuple[int, int]]) -> list[int | None]:
        """The version of each ``(home, bucket)`` (None: read mid-update): this rank's own from memory, the
        others one-sidedly, one epoch for all."""
        w, me = self.window, self.window.rank
        out: list[int | None] = [None] * len(routes)
        remote: dict[int, list[int]] = {}
        for i, (home, bucket) in enumerate(routes):
            if home == me:
                out[i] = w.binding(bucket)
            else:
                remote.setdefault(home, []).append(i)
        if not remote:
            return out
        f = BINDING.size
        buf = memoryview(bytearray(f * sum(len(idx) for idx in remote.values())))
        types: list[MPI.Datatype] = []
        try:
            with lock_all(w) as win:
                k = 0
                for home, idx in remote.items():
                    into = buf[k * f:(k + len(idx)) * f]
                    if len(idx) >= _TYPED_FROM:
                        t = MPI.BYTE.Create_hindexed_block(f, [BINDINGS_OFFSET + f * routes[i][1] for i in idx])
                        types.append(t)
                        t.Commit()
                        win.Get([into, MPI.BYTE], home, (0, 1, t))
                    else:
                        for j, i in enumerate(idx):
                            win.Get([into[j * f:(j + 1) * f], MPI.BYTE], home,
                                    (BINDINGS_OFFSET + f * routes[i][1], f, MPI.BYTE))
                    k += len(idx)
        finally:
            for t in types:
                t.Free()
        k = 0
        for idx in remote.values():
            for i in idx:
                version, check = BINDING.unpack_from(buf, k * f)
                out[i] = version if version ^ check == _MASK else None
                k += 1
        return out


__all__ = ["REMEMBERED", "Bindings", "route"]
