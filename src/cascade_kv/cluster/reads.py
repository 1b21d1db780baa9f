"""The read path: where each block of a get is read from.

A sealed copy in this rank's arena is read in place; a peer's memory copy is read one-sidedly
(:func:`.rma.remote_read_many`, one epoch for the batch; one copy chosen at random spreads readers over
replicas); a block on disk only is read by one rank under a load lease, which keeps it in memory for the
others. A copy that moved meanwhile is refused by its slot header and looked up again, backing off, until
the store's timeout (``PeerTimeout``). A block with no copy left raises ``BlockNotFound``.
"""
from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np

from ..arrays import byte_view, check_out, finish_outs, needs_staging
from ..errors import BlockNotFound, InternalError, PeerTimeout
from ..ids import BlockId, Key, StoreKey, block_name
from ..namespace import Space
from .bindings import Bindings
from .context import RankContext
from .diskio import SharedDisk, Vanished
from .directory import KeyRecord, LoadStatus, Location, dtype_of
from .eviction import Eviction
from .replication import Replication
from .rma import SlotRef, remote_read_many
from .slots import digest16_of

LOCATION_CACHE = 65536
"""Last known locations of blocks this rank read from peers (a few MB of Python objects at most)."""
RETRY_SLEEP_S = 0.5e-3
"""First pause before looking up again a block whose copy moved, or that another rank is loading."""
MAX_RETRY_SLEEP_S = 2e-3


def nbytes_of(r: KeyRecord) -> int:
    """The size of the value a key record names."""
    return dtype_of(r.dtype).itemsize * int(np.prod(r.shape, dtype=np.int64))


class Reads:
    """Reads keys' values and blocks for this rank, from wherever a copy lies."""

    def __init__(self, ctx: RankContext, disk: SharedDisk | None, eviction: Eviction,
                 replication: Replication, bindings: Bindings) -> None:
        self.ctx = ctx
        self.bindings = bindings
        self.disk = disk
        self.eviction = eviction
        self.replication = replication
        self._where: dict[BlockId, tuple[Location, int]] = {}  # last good remote copy per digest (see _read_elsewhere)

    def get_many(self, space: Space, keys: list[Key], outs: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
        """Read ``keys`` (checked, with ``outs``: ``arrays.key_list``, ``arrays.check_outs``) into ``outs``."""
        records = self.records([space.internal(k) for k in keys], count_misses=space, remembered=True)
        results = [np.empty(r.shape, dtype_of(r.dtype)) if outs is None or outs[i] is None
                   else check_out(outs[i], keys[i], dtype_of(r.dtype), r.shape) for i, r in enumerate(records)]
        staged = [np.empty(o.shape, o.dtype) if needs_staging(o) else o for o in results]
        # one read per distinct block; duplicates are copied from the first out after
        first: dict[BlockId, int] = {}
        for i, r in enumerate(records):
            first.setdefault(r.digest, i)
        lead = list(first.values())
        self.read_blocks([records[i].digest for i in lead], [byte_view(staged[i]) for i in lead])
        for i, r in enumerate(records):
            j = first[r.digest]
            if j != i:  # same bytes under another key (possibly another dtype or shape)
                np.copyto(staged[i].reshape(-1).view(np.uint8), staged[j].reshape(-1).view(np.uint8))
            if staged[i] is not results[i]:
                np.copyto(results[i], staged[i])
        with self.ctx.arena.lock:
            self.ctx.counters.gets += len(keys)
            space.counters.gets += len(keys)
        return results if outs is None else finish_outs(outs, results)  # torch outs: staged copies land

    def records(self, keys: list[StoreKey], count_misses: Space | None = None,
                remembered: bool = False) -> list[KeyRecord]:
        """Each key's record; BlockNotFound for a key that is not bound (counted as a miss if asked).
        ``remembered``: a record this rank looked up before is taken as it is while its home's binding version
        says it still holds (:mod:`.bindings`: the read path's, where no one is asked for keys read before)."""
        lookup = self.ctx.directory.lookup_many
        records = self.bindings.records(keys, lookup) if remembered else lookup(keys)
        for k, r in zip(keys, records):
            if r is None:
                if count_misses is not None:
                    with self.ctx.arena.lock:
                        self.ctx.counters.misses += 1
                        count_misses.counters.misses += 1
                raise BlockNotFound(f"key {k!r} is not in the store")
        return records  # type: ignore[return-value]

    def read_blocks(self, digests: list[BlockId], outs: list[memoryview]) -> None:
        """Fill ``outs[i]`` with block ``digests[i]`` (distinct): local copies, then peers' memory, then disk.
        A copy that moved during the read, or a block another rank is loading from disk, is looked up again
        until the store's timeout; a round that read nothing backs off (0.5 -> 2 ms: a 16 MiB load from disk
        takes ~10 ms, and every waiter polls its home)."""
        ctx, arena, c = self.ctx, self.ctx.arena, self.ctx.counters
        todo = list(range(len(digests)))
        deadline = time.monotonic() + ctx.timeout
        pause = RETRY_SLEEP_S
        while True:
            before = len(todo)
            elsewhere = []
            for i, copy in zip(todo, arena.readable_many([digests[i] for i in todo])):
                if copy is None:
                    elsewhere.append(i)
                    continue
                try:
                    arena.tier.read_into(digests[i], outs[i])
                finally:
                    arena.unpin(copy)
                with arena.lock:
                    c.host.hits += 1
                    c.host.bytes_read += outs[i].nbytes
            if not elsewhere:
                return
            todo = self._read_elsewhere([digests[i] for i in elsewhere], [outs[i] for i in elsewhere], elsewhere)
            if not todo:
                return
            if time.monotonic() >= deadline:
                raise PeerTimeout(f"rank {ctx.rank}: {len(todo)} block(s) still moving or being loaded by another "
                                  f"rank after {ctx.timeout:g} s (first: {block_name(digests[todo[0]])[:16]})")
            if len(todo) < before:
                pause = RETRY_SLEEP_S  # progress: ask again at once
                continue
            time.sleep(pause)
            pause = min(2 * pause, MAX_RETRY_SLEEP_S)

    def _read_elsewhere(self, digests: list[BlockId], outs: list[memoryview], index: list[int]) -> list[int]:
        """One round of reading blocks this rank holds no copy of; the indices (into ``index``) still to read.

        A copy this rank read before is tried at its last known location first, without asking the home:
        the slot-header check refuses it if it moved, and only then is the home asked. That is sound because
        the *key* was looked up afresh, and a slot whose header still shows the generation and digest read
        last time still holds exactly that block."""
        ctx = self.ctx
        remote: list[tuple[int, Location, int]] = []
        cached = [(j, hit) for j, d in enumerate(digests) if (hit := self._where.get(d)) is not None]
        if cached:
            missed = self._read_remote(digests, outs, [(j, loc, protected) for j, (loc, protected) in cached])
            for j in missed:
                self._where.pop(digests[j], None)
            ask = sorted(set(range(len(digests))) - {j for j, _ in cached} | set(missed))
        else:
            ask = list(range(len(digests)))
        on_disk, again = [], []
        for j, where in zip(ask, ctx.directory.locate_many([digests[j] for j in ask]) if ask else []):
            digest = digests[j]
            memory = [loc for loc in where.memory if loc.rank != ctx.rank]
            if memory:
                remote.append((j, random.choice(memory), where.protected))  # spreads readers over replicas
            elif digest in ctx.arena:  # stored here since the first look: read locally next round
                again.append(j)
            elif where.locations or (self.disk is not None and self.disk.exists(digest)):
                on_disk.append(j)
            else:
                raise BlockNotFound(f"block {block_name(digest)[:16]} has no copy left (dropped, or deleted "
                                    f"while being read)")
        if remote:
            again += self._read_remote(digests, outs, remote)
        if on_disk:
            again += self._load([digests[j] for j in on_disk], [outs[j] for j in on_disk], on_disk)
        return [index[j] for j in sorted(again)]

    def _read_remote(self, digests: list[BlockId], outs: list[memoryview],
                     remote: list[tuple[int, Location, int]]) -> list[int]:
        """Read ``(j, location, protected)`` copies out of peers' windows in one epoch; the ``j`` that failed
        their slot-header check (moved or freed since)."""
        ctx, c = self.ctx, self.ctx.counters
        refs = [SlotRef(loc.rank, loc.offset, loc.nbytes, loc.generation, digest16_of(digests[j]))
                for j, loc, _ in remote]
        failed = []
        hits = nbytes = 0
        for (j, loc, protected), good in zip(remote, remote_read_many(ctx.window, refs, [outs[j] for j, _, _ in remote])):
            if not good:
                failed.append(j)
                continue
            hits += 1
            nbytes += loc.nbytes
            self._remember(digests[j], loc, protected)
            self.replication.note_remote_read(digests[j], outs[j], protected)
        with ctx.arena.lock:  # once per batch, not per block
            c.remote.hits += hits
            c.remote.bytes_read += nbytes
            c.host.misses += hits
            c.bytes_received += nbytes
        return failed

    def _remember(self, digest: BlockId, loc: Location, protected: int) -> None:
        where = self._where
        if where.get(digest) == (loc, protected):
            return  # read again where it was last time: most reads of a hot block, no need to reorder
        where.pop(digest, None)
        where[digest] = (loc, protected)
        if len(where) > LOCATION_CACHE:
            del where[next(iter(where))]  # the oldest entry (dicts keep insertion order)

    def _load(self, digests: list[BlockId], outs: list[memoryview], index: list[int]) -> list[int]:
        """Blocks found on disk only: read under a load lease and keep them in memory for the other ranks.
        The indices to try again (another rank is loading them, or they reached memory meanwhile)."""
        ctx = self.ctx
        # Ask for a share of the leases only, starting at a rank-dependent place: ranks reading the same blocks
        # then load different ones from disk at the same time, and read the rest from each other's memory
        # next round. Asking for all at once gave the first rank every lease and the others nothing to do.
        share = -(-len(digests) // ctx.size)
        start = ctx.rank * share % len(digests)
        order = [(start + k) % len(digests) for k in range(len(digests))]
        asked, again = order[:share], [index[k] for k in order[share:]]
        digests, outs, index = [digests[k] for k in asked], [outs[k] for k in asked], [index[k] for k in asked]
        for digest, out, j, lease in zip(digests, outs, index, ctx.directory.load_many(digests)):
            if lease.status in (LoadStatus.IN_MEMORY, LoadStatus.PENDING):
                again.append(j)
                continue
            if lease.status is LoadStatus.MISSING and (self.disk is None or not self.disk.exists(digest)):
                raise BlockNotFound(f"block {block_name(digest)[:16]} has no copy left (dropped, or deleted "
                                    f"while being read)")
            if self.disk is None:  # the home listed a disk copy, which only a store with a disk tier writes
                raise InternalError(f"rank {ctx.rank}: block {block_name(digest)[:16]} has a disk lease "
                                    f"({lease.status.name}) but this store has no disk tier")
            try:
                try:
                    self.disk.read(digest, out)
                except Vanished:  # deleted meanwhile: the next round asks the home again (a miss, or its new copy)
                    if lease.status is LoadStatus.GRANTED:
                        ctx.directory.forget_many([digest])
                    again.append(j)
                    continue
                c = None
                if lease.status is LoadStatus.GRANTED:
                    c = self.eviction.place(digest, out, protected=lease.protected > 0)
            except BaseException:
                if lease.status is LoadStatus.GRANTED:
                    ctx.directory.forget_many([digest])
                raise
            if c is not None:
                self.eviction.publish_pinned(c)  # ends the lease: the others read this copy
            elif lease.status is LoadStatus.GRANTED:
                ctx.directory.forget_many([digest])  # no room here: the others read the file themselves
        return again


__all__ = ["LOCATION_CACHE", "Reads", "nbytes_of"]
