"""The distributed store: every rank's memory pooled into one content-addressed cache over MPI.

Each rank contributes an arena (an ``MPI.Win.Allocate`` window, :mod:`.arena`)
and runs a service thread (:mod:`.service`) that answers for the share of the
global directory it is home to (:mod:`.directory`) and for the copies its arena
holds. All ranks share one content-addressed disk directory (Lustre on a
cluster) as the cold tier. ``docs/distributed-design.md`` walks through the
protocol; in short:

* **put**: hash locally, ``claim`` the digest at its home (a dedup hit there
  moves no bytes), store granted blocks in the local arena (evicting victims to
  the peer with most room, then to disk), ``publish`` where they lie, then
  ``bind`` the keys at their homes. The put returns after ``bind``, so any
  rank's later ``get`` finds the key: no barrier.
* **get**: ``lookup`` the keys, read local copies in place, ``locate`` the
  others and read them one-sidedly (:func:`.rma.remote_read_many`; a copy that
  moved meanwhile is refused by its slot header and looked up again). A block
  found only on disk is read by one rank under a load lease, which keeps it in
  memory for the others. A block read ``promotion_threshold`` times from peers
  gets a local replica.
* **delete**: ``unbind``, ``unref``; the last reference frees every copy.

Rules that keep it deadlock-free: no thread holds the arena's lock across a
message; handlers (run on the service thread) never send a request to another
rank, only read peers' windows one-sidedly and touch local state. Where a
handler's work changes another home's entries (a peer that demoted blocks to
make room), it returns the changes to the caller, who forwards them.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
from mpi4py import MPI

from ..arrays import byte_view, check_key, check_out, check_outs, finish_outs, key_list, needs_staging, put_items
from ..config import CascadeConfig, format_size
from ..errors import (BlockNotFound, CapacityError, ConfigError, IntegrityError, InvalidArgument, PeerTimeout, StoreClosed)
from ..hashing import Hasher
from ..ids import BlockId, Key, StoreKey, block_name
from ..namespace import Namespace, Space, check_name, check_quota, user_key
from ..stats import StoreStats, TierStats
from ..info import KeyInfo
from ..tiers import DiskTier
from .slots import SLOT_HEADER, digest16_of
from .arena import Arena, Copy
from .counters import Counters, sum_stats
from .durable import Durability
from .directory import (LOCATION, TIER_DISK, TIER_MEMORY, Claim, ClaimStatus, CopyStatus, Directory, HomeStats, KeyRecord,
                        LoadStatus, Location, Released, dtype_of, dtype_text)
from .rma import SlotRef, remote_read, remote_read_many
from .service import RemoteError, Service, _wait
from .window import ArenaWindow

log = logging.getLogger(__name__)

# Ops 32..47: requests to the owner of copies (the directory has 16..31).
OP_ADOPT = 32
OP_FREE = 33
OP_NOTE_PROTECT = 34
OP_MAKE_ROOM = 35

_ADOPT_REQ = struct.Struct("<QQQB")  # nbytes, source slot offset, source generation, protected; after the digest
_ADOPT_REPLY = struct.Struct("<BQQ")  # status, offset, generation
_ADOPTED, _NO_ROOM, _STALE, _HAVE = 0, 1, 2, 3
_FREE_REQ = struct.Struct("<Q")  # generation
_MAKE_ROOM_REQ = struct.Struct("<Q")  # bytes wanted in one hole
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")

LOCATION_CACHE = 65536
"""Last known locations of blocks this rank read from peers (a few MB of Python objects at most)."""
_RETRY_SLEEP_S = 0.5e-3
"""First pause before looking up again a block whose copy moved, or that another rank is loading."""
_MAX_RETRY_SLEEP_S = 2e-3


class _Vanished(Exception):
    """Internal: a block's shared file went while this rank was about to read it; look the block up again."""


def _digest_bytes(d: bytes) -> bytes:
    return _U8.pack(len(d)) + d


def _read_digest(buf: memoryview, pos: int) -> tuple[BlockId, int]:
    n = buf[pos]
    return BlockId(bytes(buf[pos + 1:pos + 1 + n])), pos + 1 + n


class DistributedStore(Durability):
    """One cache over every rank of ``comm`` (default ``MPI.COMM_WORLD``). Construction and :meth:`close`
    are collective; every other method may be called by any rank at any time, from any thread.

    ``timeout`` bounds every wait on a peer (seconds): a rank that does not answer raises
    :class:`~cascade_kv.errors.PeerTimeout` naming it. ``config.disk_path`` must name one directory that
    every rank sees (the shared cold tier). With ``persist=True`` that directory outlives the job: every
    acknowledged write is durable there, and a later job, of any number of ranks, finds every key
    (:mod:`.durable`); a second job opening it meanwhile is refused (StorageError).
    """

    # what this implementation does of the contract's optional parts (cascade_kv.contract): stats() counts
    # what this rank is home to; the arenas evict replicas, then unprotected copies, each in eviction_order
    # (policy.ArenaPolicy; a reuse credit counts this rank's own reads of its copies, not peers')
    supports_persist = True
    supports_demote = True
    stats_scope = "rank"
    ignored_config: frozenset[str] = frozenset()

    def __init__(self, config: CascadeConfig | None = None, comm: MPI.Comm | None = None, *,
                 timeout: float = 30.0, **overrides: object) -> None:
        t0 = time.perf_counter()
        cfg = config if config is not None else CascadeConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        self.comm: MPI.Comm = MPI.COMM_WORLD if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self._hasher = Hasher(cfg.hash_algorithm)
        self._serial = itertools.count(time.time_ns())
        self._closed = False
        self._c = Counters()  # this rank's totals, every namespace
        self._default = Space(None, Counters())  # the store's own API
        self._spaces: dict[str, Space] = {}  # named namespaces this rank made a view of, or found at reopen
        self._spaces_lock = threading.Lock()
        self._remote_reads: dict[BlockId, int] = {}  # per digest: reads served by peers since the last replica
        self._where: dict[BlockId, tuple[Location, int]] = {}  # last good remote copy per digest (see _read_elsewhere)
        self.service = Service(self.comm, timeout=timeout)
        self.window = ArenaWindow(self.comm, cfg.host_capacity + SLOT_HEADER)
        self.arena = Arena(self.window, cfg.host_capacity, rank=self.rank, semantic=cfg.semantic_eviction,
                           order=cfg.eviction_order)
        self.disk: DiskTier | None = None
        self._disk_lock = threading.Lock()
        if cfg.disk_path is not None:
            self.disk = DiskTier(cfg.disk_path, self._hasher, capacity=cfg.disk_capacity, durable=cfg.persist,
                                 o_direct=cfg.o_direct, verify=cfg.verify_reads, group_access=cfg.group_access)
        self.directory = Directory(self.service, state=self._open_durable())  # persist: recovers the directory
        for op, handler in ((OP_ADOPT, self._on_adopt), (OP_FREE, self._on_free),
                            (OP_NOTE_PROTECT, self._on_note_protect), (OP_MAKE_ROOM, self._on_make_room)):
            self.service.register(op, handler)
        self.comm.Barrier()  # every rank's handlers are registered before any rank calls
        self._reload_protected()
        self.open_seconds = time.perf_counter() - t0
        """Seconds to open: window allocation and touch, service start."""

    # ================================================================== public API: writes
    def put(self, key: Key, array: object, is_prefix: bool = False) -> None:
        """Store ``array`` under ``key`` for every rank; ``is_prefix=True`` keeps it in cluster memory."""
        self.put_many([key], [array], is_prefix=is_prefix)

    def put_many(self, keys: Sequence[Key], arrays: Sequence[object], *,
                 is_prefix: bool | Sequence[bool] = False) -> None:
        """Store many arrays at once; all or nothing. A key given twice takes its last array."""
        self._put_many(self._default, keys, arrays, is_prefix)

    def _put_many(self, space: Space, keys: Sequence[Key], arrays: Sequence[object],
                  is_prefix: bool | Sequence[bool]) -> None:
        items = [(space.internal(k), a, p) for k, a, p in put_items(keys, arrays, is_prefix)]
        self._check_open()
        # the directory records every dtype exactly, or refuses it here (InvalidArgumentType), before any message
        dtypes = [dtype_text(a.dtype) for _, a, _ in items]
        ids = [self._block_id(byte_view(a), space) for _, a, _ in items]  # hashing: no lock, no message
        self._check_quota(space, items, ids)
        first: dict[BlockId, int] = {}  # one claim per distinct block first: a second would wait on our own grant
        for i, bid in enumerate(ids):
            first.setdefault(bid, i)
        claimed: list[tuple[BlockId, bool]] = []  # references taken, to give back if the put fails
        pinned: list[Copy] = []  # copies stored by this put, pinned until the directory lists them
        hits = 0
        try:
            lead = list(first.values())
            claims = self.directory.claim_settled_many([(ids[i], items[i][1].nbytes, items[i][2]) for i in lead])
            claimed += [(ids[i], items[i][2]) for i in lead]
            self._check_protected_room(items, lead, claims)
            published = []
            for i, claim in zip(lead, claims):
                published += self._settle_claim(ids[i], items[i][1], items[i][2], claim, pinned)
            self.directory.publish_many(published)
            for c in pinned:
                self.arena.unpin(c)
            pinned.clear()
            hits = sum(c.status is ClaimStatus.EXISTS for c in claims)
            rest = [i for i in range(len(items)) if first[ids[i]] != i]
            if rest:  # duplicates within the batch: their block is published now, so these are hits
                more = self.directory.claim_settled_many([(ids[i], items[i][1].nbytes, items[i][2]) for i in rest])
                claimed += [(ids[i], items[i][2]) for i in rest]
                hits += len(rest)
                for i, claim in zip(rest, more):
                    self.directory.publish_many(self._settle_claim(ids[i], items[i][1], items[i][2], claim, pinned))
                    for c in pinned:
                        self.arena.unpin(c)
                    pinned.clear()
            records = [(k, KeyRecord(bid, dt, a.shape, p)) for (k, a, p), bid, dt in zip(items, ids, dtypes)]
            old = self.directory.bind_many(records)
        except BaseException:
            for c in pinned:
                self.arena.abandon(c)
            if claimed:
                self._release_refs(claimed)
            raise
        self._release_refs([(r.digest, r.prefix) for r in old if r is not None])
        saved = sum(items[i][1].nbytes for i, c in zip(lead, claims) if c.status is ClaimStatus.EXISTS) + sum(
            items[i][1].nbytes for i in rest)
        with self.arena.lock:
            for c in (self._c, space.counters):  # a hit is only ever on this namespace's own block
                c.puts += len(items)
                c.dedup_hits += hits
                c.dedup_bytes_saved += saved

    def delete(self, key: Key) -> None:
        """Remove ``key`` on every rank; its block's copies are freed when no other key refers to it."""
        self.delete_many([key])

    def delete_many(self, keys: Iterable[Key]) -> None:
        """Remove every key (all must exist: otherwise nothing is removed)."""
        self._delete_many(self._default, keys)

    def _delete_many(self, space: Space, keys: Iterable[Key]) -> None:
        keys = list(dict.fromkeys(space.internal(k) for k in key_list(keys, "delete_many")))
        self._check_open()
        for k, r in zip(keys, self.directory.lookup_many(keys)):
            if r is None:
                raise BlockNotFound(f"key {k!r} is not in the store")
        old = self.directory.unbind_many(keys)
        self._release_refs([(r.digest, r.prefix) for r in old if r is not None])
        with self.arena.lock:
            self._c.deletes += len(keys)
            space.counters.deletes += len(keys)

    def protect(self, key: Key) -> None:
        """Protect ``key`` as if it had been put with ``is_prefix=True`` (its block is brought into memory)."""
        self._set_prefix(key, True)

    def unprotect(self, key: Key) -> None:
        """Release ``key``'s protection on every rank: its block may now leave memory like any other."""
        self._set_prefix(key, False)

    def demote(self, keys: Iterable[Key]) -> None:
        """Move the blocks of ``keys`` out of cluster memory into the shared disk tier (cold-start experiments,
        freeing memory ahead of a known burst). Protected keys raise ``ValueError``; nothing moves then."""
        keys = list(dict.fromkeys(key_list(keys, "demote")))
        self._check_open()
        if self.disk is None:
            raise ConfigError("demote: the store has no disk tier (set disk_path)")
        records = self._records(keys)
        for k, r in zip(keys, records):
            if r.prefix:
                raise InvalidArgument(f"demote: key {k!r} is protected (is_prefix); unprotect it first")
        blocks = {r.digest: k for k, r in zip(keys, records)}
        located = self.directory.locate_many(list(blocks))
        for (digest, k), where in zip(blocks.items(), located):
            if where.protected and self.config.semantic_eviction:
                raise InvalidArgument(f"demote: the block of {k!r} is protected by another key")
        outs = [np.empty(self._nbytes(r), np.uint8) for r in {r.digest: r for r in records}.values()]
        self._read_blocks(list(blocks), [memoryview(o) for o in outs])
        for digest, data in zip(blocks, outs):
            located = self.directory.locate(digest)
            if located.disk is None:
                wrote = self._write_disk(digest, memoryview(data))
                try:
                    self.directory.publish(digest, Location(self.rank, TIER_DISK, 0, data.nbytes, 0))
                except RemoteError as e:  # deleted meanwhile: nothing to demote, and the file must not stay
                    if e.remote_type != "BlockNotFound":
                        raise
                    if wrote:
                        with self._disk_lock:
                            self.disk.free(digest)
                    continue
            for loc in located.memory:
                status, _ = self.directory.drop_copy(digest, loc)
                if status is not CopyStatus.LAST:
                    self._free_copies(digest, [loc])

    # ================================================================== public API: reads
    def get(self, key: Key, out: np.ndarray | None = None) -> np.ndarray:
        """Copy ``key``'s value into ``out`` (allocated when ``None``) and return it."""
        return self.get_many([key], None if out is None else [out])[0]

    def get_many(self, keys: Sequence[Key], outs: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Read many keys; every key and buffer is checked before anything is copied."""
        return self._get_many(self._default, keys, outs)

    def _get_many(self, space: Space, keys: Sequence[Key],
                  outs: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
        keys = key_list(keys, "get_many")
        check_outs(keys, outs)
        self._check_open()
        records = self._records([space.internal(k) for k in keys], count_misses=space)
        results = [np.empty(r.shape, dtype_of(r.dtype)) if outs is None or outs[i] is None
                   else check_out(outs[i], keys[i], dtype_of(r.dtype), r.shape) for i, r in enumerate(records)]
        staged = [np.empty(o.shape, o.dtype) if needs_staging(o) else o for o in results]
        # one read per distinct block; duplicates are copied from the first out after
        first: dict[BlockId, int] = {}
        for i, r in enumerate(records):
            first.setdefault(r.digest, i)
        lead = list(first.values())
        self._read_blocks([records[i].digest for i in lead], [byte_view(staged[i]) for i in lead])
        for i, r in enumerate(records):
            j = first[r.digest]
            if j != i:  # same bytes under another key (possibly another dtype or shape)
                np.copyto(staged[i].reshape(-1).view(np.uint8), staged[j].reshape(-1).view(np.uint8))
            if staged[i] is not results[i]:
                np.copyto(results[i], staged[i])
        with self.arena.lock:
            self._c.gets += len(keys)
            space.counters.gets += len(keys)
        return results if outs is None else finish_outs(outs, results)  # torch outs: staged copies land

    def contains(self, key: Key) -> bool:
        return self._contains(self._default, key, strict=True)

    def __contains__(self, key: object) -> bool:
        return self._contains(self._default, key)

    def _contains(self, space: Space, key: object, strict: bool = False) -> bool:
        if strict:
            check_key(key)
        self._check_open()
        return isinstance(key, (str, bytes)) and self.directory.lookup(space.internal(key)) is not None

    def lookup(self, keys: Sequence[Key]) -> int:
        """As :meth:`Store.lookup`, for keys put on any rank: one request to each home rank of the keys (those
        homed here need none), all in flight at once. A key bound at its home counts as stored, even if its
        block was dropped since (no disk tier, memory full): only the digest's home knows, a second round trip
        per home; a get of it then raises BlockNotFound."""
        return self._lookup(self._default, keys)

    def _lookup(self, space: Space, keys: Sequence[Key]) -> int:
        keys = key_list(keys, "lookup")
        self._check_open()
        # every home answers for all its keys, not only up to the first gap: stopping there would take one
        # round trip per home in turn, and the homes' answers interleave along the prefix anyway
        bound = self.directory.bound_many([space.internal(k) for k in keys])
        return next((i for i, b in enumerate(bound) if not b), len(bound))

    def keys(self) -> list[Key]:
        """Every key of the default namespace, on any rank (asks every rank: a snapshot, in no particular order)."""
        return self._keys_of(self._default)

    def _keys_of(self, space: Space) -> list[Key]:
        self._check_open()
        return [user_key(k) for k in self.directory.keys() if space.owns(k)]

    def __len__(self) -> int:
        return len(self.keys())

    def _len(self, space: Space) -> int:
        return len(self._keys_of(space))

    def namespace(self, name: str, protected_quota: int | str | None = None) -> Namespace:
        """As :meth:`Store.namespace`. Not collective: a view is this rank's, over keys every rank shares (the
        same name on any rank reaches the same keys). The quota is this rank's view's: give every rank the
        same one. It is checked against the namespace's protected bytes summed over every home, asked before
        each put that protects (one message per rank); two ranks protecting at once may both pass the check
        (it is not a reservation), so the bound can be overshot by what concurrent puts add."""
        name = check_name(name)
        quota = check_quota(protected_quota)
        self._check_open()
        with self._spaces_lock:
            space = self._spaces.get(name)
            if space is None:
                space = self._spaces[name] = Space(name, Counters())
            space.set_quota(quota)
        return Namespace(self, space)  # type: ignore[arg-type]  # the same private interface as Store

    def info(self, key: Key) -> KeyInfo:
        """Where ``key``'s block lives and what it holds. ``tiers``: ``host`` (a copy in this rank's memory),
        ``remote`` (in another rank's memory), ``disk`` (the shared disk tier)."""
        return self._info(self._default, key)

    def _info(self, space: Space, key: Key) -> KeyInfo:
        self._check_open()
        r = self._records([space.internal(check_key(key))])[0]
        where = self.directory.locate(r.digest)
        tiers = (("host",) * any(loc.rank == self.rank for loc in where.memory)
                 + ("remote",) * any(loc.rank != self.rank for loc in where.memory) + ("disk",) * (where.disk is not None))
        return KeyInfo(dtype_of(r.dtype), r.shape, self._nbytes(r), r.prefix, r.digest[:32].hex(), tiers,
                       where.refs)

    def locations(self, key: Key) -> tuple[Location, ...]:
        """Where the copies of ``key``'s block lie right now (rank, tier, offset, size, generation)."""
        self._check_open()
        return self.directory.locate(self._records([check_key(key)])[0].digest).locations

    # ================================================================== observability & lifecycle
    def stats(self, all_namespaces: bool = False) -> StoreStats:
        """This rank's counters. Keys, blocks and protection count what this rank is home to, so the sums
        over ranks (:meth:`cluster_stats`) are the cluster's totals. The default namespace's, or with
        ``all_namespaces`` every namespace's (a namespace's tiers show only capacity: per-tier read counters
        are not kept per namespace in the distributed store)."""
        return self._stats(None if all_namespaces else self._default)

    def _stats(self, space: Space | None) -> StoreStats:
        self._check_open()
        home = self.directory.state.stats(None if space is None else (space.name, space.tag))
        if space is not None and space.name is not None:
            return self._space_stats(space, home)
        if space is not None:  # the default namespace: its own operations; tiers and moves are the rank's
            d = space.counters
            with self.arena.lock:
                ops = dict(puts=d.puts, gets=d.gets, misses=d.misses, deletes=d.deletes, dedup_hits=d.dedup_hits,
                           dedup_bytes_saved=d.dedup_bytes_saved)
            return dataclasses.replace(self._rank_stats(home), **ops)
        return self._rank_stats(home)

    def _rank_stats(self, home: HomeStats) -> StoreStats:
        copies = self.arena.copies()
        with self.arena.lock:
            c = self._c
            tiers = [TierStats("host", c.host.hits, c.host.misses, c.host.bytes_read, c.host.bytes_written,
                               c.host.evictions, sum(1 for x in copies if x.generation), self.arena.tier.used,
                               self.arena.capacity),
                     TierStats("remote", c.remote.hits, c.remote.misses, c.remote.bytes_read, c.remote.bytes_written,
                               0, 0, 0, None)]
            if self.disk is not None:
                # blocks and bytes on disk are counted at the digests' homes: summed over ranks, each file once
                tiers.append(TierStats("disk", c.disk.hits, c.disk.misses, c.disk.bytes_read, c.disk.bytes_written,
                                       0, home.disk_blocks, home.disk_bytes, self.disk.capacity))
            return StoreStats(
                tiers=tuple(tiers), keys=home.keys, blocks=home.blocks, logical_bytes=home.logical_bytes,
                unique_bytes=home.unique_bytes, protected_blocks=home.protected_blocks,
                protected_in_memory=home.protected_in_memory, puts=c.puts, gets=c.gets, misses=c.misses,
                deletes=c.deletes, dedup_hits=c.dedup_hits, dedup_bytes_saved=c.dedup_bytes_saved,
                demotions=c.demotions, promotions=c.promotions, drops=c.drops, dropped_bytes=c.dropped_bytes,
                integrity_errors=c.integrity_errors, quarantined=c.quarantined, open_seconds=self.open_seconds,
                ranks=1, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received)

    def _space_stats(self, space: Space, home: HomeStats) -> StoreStats:
        """A named namespace's stats on this rank: its own operations and what this rank is home to of it."""
        with self.arena.lock:
            c = space.counters
            tiers = [TierStats("host", 0, 0, 0, 0, 0, 0, self.arena.tier.used, self.arena.capacity),
                     TierStats("remote", 0, 0, 0, 0, 0, 0, 0, None)]
            if self.disk is not None:
                tiers.append(TierStats("disk", 0, 0, 0, 0, 0, home.disk_blocks, home.disk_bytes,
                                       self.disk.capacity))
            return StoreStats(
                tiers=tuple(tiers), keys=home.keys, blocks=home.blocks, logical_bytes=home.logical_bytes,
                unique_bytes=home.unique_bytes, protected_blocks=home.protected_blocks,
                protected_in_memory=home.protected_in_memory, puts=c.puts, gets=c.gets, misses=c.misses,
                deletes=c.deletes, dedup_hits=c.dedup_hits, dedup_bytes_saved=c.dedup_bytes_saved, demotions=0,
                promotions=0, drops=0, dropped_bytes=0, integrity_errors=0, quarantined=0,
                open_seconds=self.open_seconds, ranks=1)

    def cluster_stats(self, namespace: str | None = None, all_namespaces: bool = False) -> StoreStats:
        """Every rank's :meth:`stats` summed (collective: every rank must call it); ``namespace``: that
        namespace's (a view's ``stats()`` is this rank's share only)."""
        self._check_open()
        if namespace is not None:
            mine = self.namespace(namespace).stats()
        else:
            mine = self.stats(all_namespaces)
        return sum_stats(self.comm.allgather(mine))

    def settle(self) -> None:
        """As :meth:`Store.settle`; this rank's replicas are made by the reads themselves: nothing to wait for."""
        self._check_open()

    def barrier(self) -> None:
        """Wait until every rank reaches this call (bounded by the timeout: PeerTimeout past it)."""
        self._check_open()
        self._bounded_barrier("barrier()")

    def _bounded_barrier(self, what: str) -> None:
        """A barrier bounded by the timeout; past it, PeerTimeout naming the ranks that did not arrive (read
        one-sidedly from their windows' header pages: see :meth:`ArenaWindow.arrive`)."""
        started = time.perf_counter()
        arrival = self.window.arrive()
        request = self.comm.Ibarrier()
        if not _wait(request.Test, started + self.service.timeout):
            missing = self.window.missing(arrival)
            raise PeerTimeout(f"rank {self.rank}: {what} waited {self.service.timeout:g} s; rank(s) {missing} "
                              f"did not arrive (of {self.size})")

    def close(self) -> None:
        """Release every rank's window, service and scratch files. Collective; a second call does nothing.

        Every wait is bounded by the timeout. A step that fails does not stop the collective steps after it
        (a rank that skipped one would leave the others waiting in it); the first error is raised at the end.
        Only if the service cannot stop is the arena left mapped: its handlers may still read it."""
        if self._closed:
            return
        self._closed = True
        self.service.close()  # its barrier: every rank has stopped calling before any handler goes
        errors: list[BaseException] = []
        for step in (self._remove_files, lambda: self._bounded_barrier("close()"), self._close_disk,
                     self.arena.close, lambda: self.window.close(timeout=self.service.timeout), self._close_durable):
            try:
                step()
            except Exception as e:  # keep going: the steps after it are collective too
                log.warning("rank %d: close: %s: %s", self.rank, type(e).__name__, e)
                errors.append(e)
        if errors:
            raise errors[0]

    def _remove_files(self) -> None:
        if self.disk is not None and self.durable is None:  # persist: the files are the point
            for bid in self.disk.block_ids():  # blocks this rank wrote or read: removing twice is harmless
                self.disk.free(bid)

    def _close_disk(self) -> None:
        if self.disk is not None:  # after the barrier: every rank's files are gone, the directories can go
            self.disk.close()

    def __enter__(self) -> DistributedStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None and not self._closed and self.size > 1:
            # close() is collective: this rank now waits (up to the timeout) for the others to close too.
            # Say why at once, so the cause is on the screen even if the job is torn down while we wait.
            print(f"cascade-kv rank {self.rank}: leaving the store on {type(exc).__name__}: {exc}; closing "
                  f"(collective: the other ranks must close too)", file=sys.stderr, flush=True)
        self.close()

    # ================================================================== put internals
    def _block_id(self, data: memoryview, space: Space) -> BlockId:
        """As :meth:`Store._block_id`: the digest, then a named namespace's tag (equal bytes in two namespaces
        are two blocks: separate claims, never a dedup hit), then with dedup off the rank and a serial. The
        tag stays before the serial so the directory can tell a block's namespace (:func:`.directory.space_tag`)."""
        digest = self._hasher.digest(data) + space.tag
        if self.config.dedup_enabled:
            return BlockId(digest)
        return BlockId(digest + self.rank.to_bytes(4, "big") + next(self._serial).to_bytes(8, "big"))

    def _check_quota(self, space: Space, items: list[tuple[StoreKey, np.ndarray, bool]], ids: list[BlockId]) -> None:
        """CapacityError, before any claim, when the namespace's protected bytes (summed over every home) plus
        the batch's protected blocks not protected yet would pass its quota. Conservative: a prefix key the
        batch overwrites is not counted as released."""
        quota = space.protected_quota
        if quota is None or not any(p for _, _, p in items):
            return
        new = {bid: a.nbytes for (_, a, p), bid in zip(items, ids) if p}
        located = self.directory.locate_many(list(new))
        need = sum(n for (bid, n), where in zip(new.items(), located) if where.protected == 0)
        used = self.directory.protected_bytes(space.tag)
        if need and used + need > quota:
            raise CapacityError(f"namespace {space.name!r}: protected_quota is {quota} B, {used} B are protected "
                                f"and this call needs {need} B more; nothing was changed")

    def _check_protected_room(self, items: list[tuple[Key, np.ndarray, bool]],
                              lead: list[int], claims: list) -> None:
        """Before any byte moves: the protected blocks this put must bring into memory fit in cluster memory
        (free holes plus evictable bytes on every rank), else CapacityError."""
        need = 0
        for i, claim in zip(lead, claims):
            _, arr, prefix = items[i]
            if not prefix or not self.config.semantic_eviction:
                continue
            in_memory = any(loc.tier == TIER_MEMORY for loc in claim.locations)
            if claim.status is ClaimStatus.GRANTED or not in_memory:
                if not self.arena.fits(arr.nbytes) and not any(cap >= arr.nbytes + 2 * SLOT_HEADER
                                                               for cap in self.window.capacities):
                    raise CapacityError(f"put: protected block of {format_size(arr.nbytes)} is larger than any "
                                        f"rank's memory ({format_size(self.arena.capacity)} here)")
                need += arr.nbytes + SLOT_HEADER
        if not need:
            return
        rooms = self.window.rooms()
        room = sum(hole + evictable for hole, evictable in rooms)
        if need > room:
            raise CapacityError(f"put: {need} B of protected blocks need room in cluster memory, which has "
                                f"{sum(h for h, _ in rooms)} B free and {sum(e for _, e in rooms)} B evictable over "
                                f"{self.size} rank(s) (the rest is protected)")

    def _settle_claim(self, digest: BlockId, arr: np.ndarray, prefix: bool, claim: Claim,
                      pinned: list[Copy]) -> list[tuple[BlockId, Location]]:
        """Act on the home's answer for one block of a put; the copies to publish (their slots, if in this
        rank's memory, are appended to ``pinned`` for the caller to unpin once published)."""
        data = byte_view(arr)
        durable = []  # persist: the block's file is durable before any key names it
        if self.durable is not None and (claim.status is ClaimStatus.GRANTED
                                         or not any(loc.tier == TIER_DISK for loc in claim.locations)):
            durable = [(digest, self._persist_block(digest, data))]
        if claim.status is ClaimStatus.GRANTED:
            return durable + [(digest, self._store_new(digest, data, prefix, pinned))]
        in_memory = [loc for loc in claim.locations if loc.tier == TIER_MEMORY]
        if prefix and claim.protected == 1 and self.config.semantic_eviction:
            if not in_memory:  # a dedup hit on a disk-only block that must now stay in memory: from our bytes
                c = self._place_in_memory(digest, data, protected=True)
                if c is None:
                    raise self._no_room("put", data.nbytes)
                pinned.append(c)
                return durable + [(digest, self.arena.location(c))]
            self._notify_protection(digest, in_memory, True)
        return durable

    def _store_new(self, digest: BlockId, data: memoryview, prefix: bool, pinned: list[Copy]) -> Location:
        """Store a granted block: local memory (making room), else (unprotected) the shared disk."""
        c = self._place_in_memory(digest, data, protected=prefix)
        if c is not None:
            pinned.append(c)
            return self.arena.location(c)
        if prefix and self.config.semantic_eviction:
            raise self._no_room("put", data.nbytes)
        if self.disk is None:
            raise CapacityError(f"put: a block of {format_size(data.nbytes)} fits neither this rank's memory "
                                f"({format_size(self.arena.capacity)}) nor a disk tier (none configured)")
        self._write_disk(digest, data)
        return Location(self.rank, TIER_DISK, 0, data.nbytes, 0)

    def _place_in_memory(self, digest: BlockId, data: memoryview, *, protected: bool,
                         replica: bool = False) -> Copy | None:
        """Copy ``data`` into this rank's arena, making room; the sealed copy, *still pinned* (unpin it once
        the directory lists it), or None when there is no room."""
        c = self._allocate(digest, data.nbytes, protected=protected, replica=replica)
        if c is None:
            return None
        try:
            self.arena.view(c)[:] = data
        except BaseException:
            self.arena.abandon(c)
            raise
        with self.arena.lock:
            self._c.host.bytes_written += data.nbytes
        self.arena.seal(c, keep_pin=True)
        return c

    def _allocate(self, digest: BlockId, nbytes: int, *, protected: bool, replica: bool) -> Copy | None:
        """A slot in this rank's arena, evicting victims (replicas, then unprotected copies, then protected
        ones to peers' memory) until it fits; None when it cannot. A replica (a block this rank reads often
        from a peer) may displace replicas and unprotected copies, which move down as any victim does, but
        never protected ones: under pressure a hot block's replica is worth more here than a cold block.

        Bounded: it gives up after a full round of victims in a row that had to stay, and after a budget of
        tries (victims and requests for room) of a few times the copies the arena held when it began, since
        other threads and ranks may fill the holes it opens as fast as it opens them. A protected block asks a
        peer to make room only after a protected victim stayed for want of a peer's hole: a hole on a peer
        helps nothing else. With no victim at all (every copy here is being written, read or moved: a put keeps
        its copies pinned until the directory lists them, so a put of several protected blocks, or two
        threads' puts, can pin a fragmented arena whole), the answer "a peer has room" changed nothing here,
        and asking again on it looped forever while the pins it waited on belonged to the put itself or to a
        put waiting the same way (issue 8: a rank that never reached the model test's barrier). Such a put
        now fails with CapacityError, which gives its pins back."""
        if not self.arena.fits(nbytes):
            return None
        stuck = 0  # victims in a row that had to stay (moves in flight): give up after a full round
        budget = 3 * (len(self.arena) + self.size)  # tries in all: a protected move may take a try, an ask, a try
        try_protected = True
        while stuck <= len(self.arena) and budget > 0:
            if digest in self.arena:
                return None  # a concurrent put or load of the same block got here first
            c = self.arena.allocate(digest, nbytes, protected=protected, replica=replica)
            if c is not None:
                return c
            budget -= 1
            victim = self.arena.pick_victim(protected=False)
            if victim is None and try_protected and not replica:
                victim = self.arena.pick_victim(protected=True)
            if victim is not None:
                if self._evict(victim):
                    stuck = 0
                else:
                    stuck += 1
                    try_protected = try_protected and not victim.protected  # no peer takes protected data now
                continue
            if protected and not replica and not try_protected and self._ask_for_room(nbytes + SLOT_HEADER):
                try_protected = True  # a peer has a hole now: our protected victims can go there
                continue
            return None
        return None

    def _no_room(self, what: str, nbytes: int) -> CapacityError:
        """A protected block found no slot here after a bounded effort (see :meth:`_allocate`): say why."""
        busy = sum(c.nbytes for c in self.arena.copies() if c.pins or c.moving)
        holes = [hole for r, (hole, _) in enumerate(self.window.rooms()) if r != self.rank]
        return CapacityError(f"{what}: no room in cluster memory for a protected block of {format_size(nbytes)}: "
                             f"largest hole here {self.arena.tier.largest_hole} B, {busy} B here being written, read "
                             f"or moved, largest hole on a peer {max(holes, default=0)} B")

    def _evict(self, victim: Copy) -> bool:
        """Make ``victim``'s slot free: drop it when another copy keeps the block, else move it to the peer with
        the most room, else (unprotected) to the shared disk, else drop the block. False: it must stay."""
        loc = self.arena.location(victim)
        gone = False
        try:
            status, protected = self.directory.drop_copy(victim.digest, loc)
            if status is CopyStatus.REMOVED:
                with self.arena.lock:
                    self._c.host.evictions += 1
                gone = True
                return True
            if status is CopyStatus.GONE:
                # Not listed: a copy a peer moved to us whose home has not been told yet (it will be, or the
                # mover frees it), or one whose block was freed (its FREE is on the way). Not ours to free.
                return False
            keep_in_memory = protected > 0 and self.config.semantic_eviction
            self.arena.set_protected(victim.digest, keep_in_memory)
            if victim.replica:
                self.arena.promote_to_primary(victim)
            if self._move_to_peer(victim, loc, protected > 0):
                gone = True
                return True
            if keep_in_memory:
                return False
            if self.disk is not None:
                self._write_disk(victim.digest, self.arena.view(victim))
                # moved, or the block was freed meanwhile: either way this slot may go
                self.directory.move(victim.digest, loc, Location(self.rank, TIER_DISK, 0, victim.nbytes, 0))
                gone = True
                with self.arena.lock:
                    self._c.demotions += 1
                    self._c.host.evictions += 1
                return True
            self.directory.drop_copy(victim.digest, loc, force=True)
            gone = True
            with self.arena.lock:
                self._c.drops += 1
                self._c.dropped_bytes += victim.nbytes
                self._c.host.evictions += 1
            log.debug("rank %d: dropped block %s (%d B): no peer memory and no disk tier", self.rank,
                      block_name(victim.digest)[:16], victim.nbytes)
            return True
        finally:
            self.arena.release(victim, gone=gone)

    def _move_to_peer(self, victim: Copy, loc: Location, protected: bool) -> bool:
        """Ask the peers with a hole big enough, most room first, to adopt the victim (they pull its bytes
        out of our window one-sidedly); then point the home at the new copy."""
        if self.size == 1:
            return False
        need = victim.nbytes + SLOT_HEADER
        rooms = self.window.rooms()
        peers = sorted((r for r in range(self.size) if r != self.rank and rooms[r][0] >= need),
                       key=lambda r: -rooms[r][0])
        for peer in peers:
            request = (_digest_bytes(victim.digest)
                       + _ADOPT_REQ.pack(victim.nbytes, loc.offset, loc.generation, protected))
            status, offset, generation = _ADOPT_REPLY.unpack(self.service.call(peer, OP_ADOPT, request))
            if status == _NO_ROOM:
                continue
            if status != _ADOPTED:
                return False  # stale: our slot changed under us (cannot happen while we hold it moving)
            new = Location(peer, TIER_MEMORY, offset, victim.nbytes, generation)
            if not self.directory.move(victim.digest, loc, new):  # freed meanwhile: the peer's copy must go too
                self._send_free(victim.digest, [new])
            with self.arena.lock:
                self._c.demotions += 1
                self._c.host.evictions += 1
                self._c.remote.bytes_written += victim.nbytes
                self._c.bytes_sent += victim.nbytes
            return True
        return False

    def _ask_for_room(self, need: int) -> bool:
        """Protected data needs memory and none is free: ask the peer with the most evictable bytes to demote
        unprotected blocks to disk until a hole of ``need`` bytes opens; forward its moves to their homes."""
        rooms = self.window.rooms()
        peers = sorted((r for r in range(self.size) if r != self.rank and rooms[r][1] > 0),
                       key=lambda r: -rooms[r][1])
        for peer in peers:
            reply = memoryview(self.service.call(peer, OP_MAKE_ROOM, _MAKE_ROOM_REQ.pack(need)))
            ok, count = reply[0], _U32.unpack_from(reply, 1)[0]
            pos, moves, drops = 5, [], []
            for _ in range(count):
                digest, pos = _read_digest(reply, pos)
                old = Location(*LOCATION.unpack_from(reply, pos))
                pos += LOCATION.size
                to_disk = reply[pos]
                pos += 1
                if to_disk:
                    moves.append((digest, old, Location(peer, TIER_DISK, 0, old.nbytes, 0)))
                else:
                    drops.append((digest, old))
            if moves:
                self.directory.move_many(moves)
            for digest, old in drops:
                self.directory.drop_copy(digest, old, force=True)
            if ok:
                return True
        return False

    def _write_disk(self, digest: BlockId, data: memoryview) -> bool:
        """Put the block in the shared disk tier: one content-addressed file. A file of the right size that
        is there already, written by any rank, is taken as it is (its first read here checks its digest).
        True when this call wrote the file. This rank's index of the directory can be stale (another rank
        deleted a file it had read), so the file itself is looked at, never the index alone."""
        assert self.disk is not None
        with self._disk_lock:  # this rank's threads (and its service thread) write one file at a time
            try:
                size = os.stat(self.disk.path(digest)).st_size
            except FileNotFoundError:
                size = None
            if size == data.nbytes:
                if not self.disk.contains(digest):
                    self.disk.adopt(digest)
                return False
            if self.disk.contains(digest):  # indexed here, but deleted or torn: forget it, then write it anew
                self.disk.free(digest)
            if not self.disk.allocate(digest, data.nbytes):
                raise CapacityError(f"disk tier full: {self.disk.used} B used of {self.disk.capacity} B")
            try:
                self.disk.write(digest, data)
            except BaseException:
                self.disk.free(digest)
                raise
        with self.arena.lock:
            self._c.disk.bytes_written += data.nbytes
        return True

    # ================================================================== references and notices
    def _release_refs(self, items: Sequence[tuple[BlockId, bool]]) -> None:
        """Give back references (a delete, an overwritten key, a failed put): free the blocks whose last
        reference went, tell owners about protection that ended."""
        if not items:
            return
        released: list[Released] = self.directory.unref_many(items)
        freed = [(d, r) for (d, _), r in zip(items, released) if r.freed]
        for (digest, _), r in zip(items, released):
            if r.unprotected:
                self._notify_protection(digest, [loc for loc in r.locations if loc.tier == TIER_MEMORY], False)
        if not freed:
            return
        for digest, r in freed:
            self._free_copies(digest, r.locations)
            self._remote_reads.pop(digest, None)
        self.directory.forget_many([d for d, _ in freed])

    def _free_copies(self, digest: BlockId, locations: Iterable[Location]) -> None:
        memory = [loc for loc in locations if loc.tier == TIER_MEMORY]
        if any(loc.tier == TIER_DISK for loc in locations) and self.disk is not None:
            if self.disk.contains(digest):
                self.disk.free(digest)
            else:
                self.disk.path(digest).unlink(missing_ok=True)
        self._send_free(digest, memory)

    def _send_free(self, digest: BlockId, memory: Sequence[Location]) -> None:
        requests = [(loc.rank, OP_FREE, _digest_bytes(digest) + _FREE_REQ.pack(loc.generation)) for loc in memory]
        if requests:
            self.service.call_many(requests)

    def _notify_protection(self, digest: BlockId, memory: Sequence[Location], protected: bool) -> None:
        requests = [(rank, OP_NOTE_PROTECT, _digest_bytes(digest) + _U8.pack(protected))
                    for rank in sorted({loc.rank for loc in memory})]
        if requests:
            self.service.call_many(requests)

    def _set_prefix(self, key: Key, prefix: bool, space: Space | None = None) -> None:
        """Turn ``key``'s reference into a prefix reference or back. The flag lives at the key's home and
        the count at the digest's home, so they cannot change together; a put or delete of the key in
        between gives back a reference of the kind the flag says. So the count may run ahead of the flags,
        never behind: a claim at the digest home first takes a reference of the kind the key will hold
        (which also keeps the block from being freed meanwhile), then the flag flips only if the key still
        names that digest, then the reference of the kind the key held before goes. A key that changed
        in between gives back the claim and is looked up again. (Flipping the flag first, as before, let
        an overwrite give back a prefix reference the count did not hold yet.)"""
        check_key(key)
        self._check_open()
        space = self._default if space is None else space
        key = space.internal(key)
        deadline = time.monotonic() + self.service.timeout
        pause = _RETRY_SLEEP_S
        while True:
            record = self._records([key])[0]
            if record.prefix == prefix:
                return
            if prefix:
                self._check_quota(space, [(key, np.empty(self._nbytes(record), np.uint8), True)], [record.digest])
            # EXISTS, or GRANTED for a block with no copy left (dropped; or freed, and the key changed): our
            # release below gives such a grant back. PENDING: being freed or stored, so the key is changing.
            claim = self.directory.claim(record.digest, self._nbytes(record), prefix)
            if claim.status is ClaimStatus.PENDING:
                if time.monotonic() >= deadline:
                    raise PeerTimeout(f"rank {self.rank}: {'protect' if prefix else 'unprotect'}({key!r}) found "
                                      f"its block held by rank {claim.pending_rank} for {self.service.timeout:g} s")
                time.sleep(pause)
                pause = min(2 * pause, _MAX_RETRY_SLEEP_S)
                continue
            old = self.directory.set_prefix(key, prefix, record.digest)
            if old is None or old.digest != record.digest or old.prefix == prefix:
                self._release_refs([(record.digest, prefix)])  # the key changed under us: ours is surplus
                if old is None:
                    raise BlockNotFound(f"key {key!r} is not in the store")
                if old.digest == record.digest:
                    return  # another caller flipped it the same way
                continue
            if prefix and claim.protected == 1 and self.config.semantic_eviction:
                try:
                    memory = [loc for loc in claim.locations if loc.tier == TIER_MEMORY]
                    if memory:
                        self._notify_protection(record.digest, memory, True)
                    else:
                        self._bring_to_memory(old)
                except BaseException:
                    undone = self.directory.set_prefix(key, False, record.digest)
                    flipped_back = undone is not None and undone.digest == record.digest and undone.prefix
                    self._release_refs([(record.digest, flipped_back)])
                    raise
            # the key holds a reference of the new kind now: the one of the old kind is surplus (its release
            # tells the owners when the last prefix reference went)
            self._release_refs([(record.digest, not prefix)])
            return

    def _bring_to_memory(self, record: KeyRecord) -> None:
        """A block that just became protected lives on disk only: load it into this rank's memory."""
        data = np.empty(self._nbytes(record), np.uint8)
        self._read_blocks([record.digest], [memoryview(data)])
        if self.directory.locate(record.digest).memory:
            return  # the read above loaded it under a lease (and keeps it protected once told)
        rooms = self.window.rooms()
        if data.nbytes + SLOT_HEADER > sum(h + e for h, e in rooms):
            raise CapacityError(f"protect: no room in cluster memory for a block of {format_size(data.nbytes)}")
        c = self._place_in_memory(record.digest, memoryview(data), protected=True)
        if c is None:
            raise self._no_room("protect", data.nbytes)
        self._publish_pinned(c)

    # ================================================================== read internals
    def _records(self, keys: list[StoreKey], count_misses: Space | None = None) -> list[KeyRecord]:
        records = self.directory.lookup_many(keys)
        for k, r in zip(keys, records):
            if r is None:
                if count_misses is not None:
                    with self.arena.lock:
                        self._c.misses += 1
                        count_misses.counters.misses += 1
                raise BlockNotFound(f"key {k!r} is not in the store")
        return records  # type: ignore[return-value]

    @staticmethod
    def _nbytes(r: KeyRecord) -> int:
        return dtype_of(r.dtype).itemsize * int(np.prod(r.shape, dtype=np.int64))

    def _read_blocks(self, digests: list[BlockId], outs: list[memoryview]) -> None:
        """Fill ``outs[i]`` with block ``digests[i]`` (distinct): local copies, then peers' memory, then disk.
        A copy that moved during the read, or a block another rank is loading from disk, is looked up again
        until the store's timeout; a round that read nothing backs off (0.5 -> 2 ms: a 16 MiB load from disk
        takes ~10 ms, and every waiter polls its home)."""
        todo = list(range(len(digests)))
        deadline = time.monotonic() + self.service.timeout
        pause = _RETRY_SLEEP_S
        while True:
            before = len(todo)
            elsewhere = []
            for i in todo:
                c = self.arena.readable(digests[i])
                if c is None:
                    elsewhere.append(i)
                    continue
                try:
                    self.arena.tier.read_into(digests[i], outs[i])
                finally:
                    self.arena.unpin(c)
                self._count_read(self._c.host, outs[i].nbytes, misses=())
            if not elsewhere:
                return
            todo = self._read_elsewhere([digests[i] for i in elsewhere], [outs[i] for i in elsewhere], elsewhere)
            if not todo:
                return
            if time.monotonic() >= deadline:
                raise PeerTimeout(f"rank {self.rank}: {len(todo)} block(s) still moving or being loaded by another "
                                  f"rank after {self.service.timeout:g} s (first: {block_name(digests[todo[0]])[:16]})")
            if len(todo) < before:
                pause = _RETRY_SLEEP_S  # progress: ask again at once
                continue
            time.sleep(pause)
            pause = min(2 * pause, _MAX_RETRY_SLEEP_S)

    def _read_elsewhere(self, digests: list[BlockId], outs: list[memoryview], index: list[int]) -> list[int]:
        """One round of reading blocks this rank holds no copy of; the indices (into ``index``) still to read.

        A copy this rank read before is tried at its last known location first, without asking the home:
        the slot-header check refuses it if it moved, and only then is the home asked. That is sound because
        the *key* was looked up afresh, and a slot whose header still shows the generation and digest read
        last time still holds exactly that block."""
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
        for j, where in zip(ask, self.directory.locate_many([digests[j] for j in ask]) if ask else []):
            digest = digests[j]
            memory = [loc for loc in where.memory if loc.rank != self.rank]
            if memory:
                remote.append((j, random.choice(memory), where.protected))  # spreads readers over replicas
            elif digest in self.arena:  # stored here since the first look: read locally next round
                again.append(j)
            elif where.locations or (self.disk is not None and self.disk.path(digest).exists()):
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
        refs = [SlotRef(loc.rank, loc.offset, loc.nbytes, loc.generation, digest16_of(digests[j]))
                for j, loc, _ in remote]
        failed = []
        for (j, loc, protected), good in zip(remote, remote_read_many(self.window, refs, [outs[j] for j, _, _ in remote])):
            if not good:
                failed.append(j)
                continue
            self._count_read(self._c.remote, loc.nbytes, misses=(self._c.host,))
            with self.arena.lock:
                self._c.bytes_received += loc.nbytes
            self._remember(digests[j], loc, protected)
            self._maybe_replicate(digests[j], outs[j], protected)
        return failed

    def _remember(self, digest: BlockId, loc: Location, protected: int) -> None:
        where = self._where
        where.pop(digest, None)
        where[digest] = (loc, protected)
        if len(where) > LOCATION_CACHE:
            del where[next(iter(where))]  # the oldest entry (dicts keep insertion order)

    def _load(self, digests: list[BlockId], outs: list[memoryview], index: list[int]) -> list[int]:
        """Blocks found on disk only: read under a load lease and keep them in memory for the other ranks.
        The indices to try again (another rank is loading them, or they reached memory meanwhile)."""
        # Ask for a share of the leases only, starting at a rank-dependent place: ranks reading the same blocks
        # then load different ones from disk at the same time, and read the rest from each other's memory
        # next round. Asking for all at once gave the first rank every lease and the others nothing to do.
        share = -(-len(digests) // self.size)
        start = self.rank * share % len(digests)
        order = [(start + k) % len(digests) for k in range(len(digests))]
        asked, again = order[:share], [index[k] for k in order[share:]]
        digests, outs, index = [digests[k] for k in asked], [outs[k] for k in asked], [index[k] for k in asked]
        for digest, out, j, lease in zip(digests, outs, index, self.directory.load_many(digests)):
            if lease.status in (LoadStatus.IN_MEMORY, LoadStatus.PENDING):
                again.append(j)
                continue
            if lease.status is LoadStatus.MISSING and (self.disk is None or not self.disk.path(digest).exists()):
                raise BlockNotFound(f"block {block_name(digest)[:16]} has no copy left (dropped, or deleted "
                                    f"while being read)")
            try:
                try:
                    self._read_disk(digest, out)
                except _Vanished:  # deleted meanwhile: the next round asks the home again (a miss, or its new copy)
                    if lease.status is LoadStatus.GRANTED:
                        self.directory.forget_many([digest])
                    again.append(j)
                    continue
                c = None
                if lease.status is LoadStatus.GRANTED:
                    c = self._place_in_memory(digest, out, protected=lease.protected > 0)
            except BaseException:
                if lease.status is LoadStatus.GRANTED:
                    self.directory.forget_many([digest])
                raise
            if c is not None:
                self._publish_pinned(c)  # ends the lease: the others read this copy
            elif lease.status is LoadStatus.GRANTED:
                self.directory.forget_many([digest])  # no room here: the others read the file themselves
        return again

    def _read_disk(self, digest: BlockId, out: memoryview) -> None:
        """Read the block's shared file; :class:`_Vanished` when another rank removed it meanwhile (the file
        may go between the directory's answer and the open: a delete on another rank unlinks it after its
        home let go of the digest), IntegrityError when it is damaged or gone while still listed."""
        assert self.disk is not None
        with self._disk_lock:
            if self.disk.contains(digest) and not self.disk.path(digest).exists():
                self.disk.untrack(digest)  # a stale entry of this rank's index: another rank deleted the file
            missing = not self.disk.contains(digest) and self.disk.adopt(digest) is None
        if missing:
            self._vanished(digest)
            raise IntegrityError(f"block {block_name(digest)[:16]}: its disk copy is listed but missing")
        try:
            self.disk.read_into(digest, out)
        except IntegrityError:
            np.asarray(out).fill(0)  # no bad byte stays in the caller's buffer
            quarantined = False
            if not self.disk.path(digest).exists():  # gone, not damaged
                with self._disk_lock:
                    self.disk.untrack(digest)
                self._vanished(digest)  # ... or lost, if its home still lists it: an IntegrityError below
            else:
                with self._disk_lock:
                    if self.disk.contains(digest):
                        quarantined = self.disk.quarantine(digest) is not None
            with self.arena.lock:
                self._c.integrity_errors += 1
                self._c.quarantined += quarantined
            raise
        self._count_read(self._c.disk, out.nbytes, misses=(self._c.host, self._c.remote))

    def _vanished(self, digest: BlockId) -> None:
        """A block's file is not there: :class:`_Vanished` unless its home still lists it on disk (then it is
        lost, and the caller raises IntegrityError; asking again would find the same)."""
        if not any(loc.tier == TIER_DISK for loc in self.directory.locate(digest).locations):
            raise _Vanished(digest)  # freed by its last delete, or moved: not a loss

    def _maybe_replicate(self, digest: BlockId, data: memoryview, protected: int) -> None:
        """Count a read served by a peer; at ``promotion_threshold`` keep a local replica (see :meth:`_allocate`)."""
        if not self.config.locality_aware:
            return
        n = self._remote_reads.get(digest, 0) + 1
        if n < self.config.promotion_threshold:
            self._remote_reads[digest] = n
            return
        self._remote_reads.pop(digest, None)
        c = self._place_in_memory(digest, data, protected=protected > 0, replica=True)
        if c is None:
            return
        if self._publish_pinned(c):
            with self.arena.lock:
                self._c.promotions += 1

    def _publish_pinned(self, c: Copy) -> bool:
        """List a freshly stored copy at its home, then unpin it; False (and the copy freed) when the block
        was deleted meanwhile."""
        try:
            self.directory.publish(c.digest, self.arena.location(c))
        except RemoteError as e:
            if e.remote_type != "BlockNotFound":
                self.arena.abandon(c)
                raise
            self.arena.abandon(c)
            return False
        self.arena.unpin(c)
        return True

    def _count_read(self, tier, nbytes: int, misses: Sequence) -> None:
        with self.arena.lock:
            tier.hits += 1
            tier.bytes_read += nbytes
            for m in misses:
                m.misses += 1

    # ================================================================== handlers (service thread)
    def _on_adopt(self, source: int, payload: memoryview) -> bytes:
        """A peer evicts a block to us: take it if a hole is free now (never evict for a peer), pulling its
        bytes out of the peer's window; answer where it lies."""
        digest, pos = _read_digest(payload, 0)
        nbytes, offset, generation, protected = _ADOPT_REQ.unpack_from(payload, pos)
        if digest in self.arena:
            return _ADOPT_REPLY.pack(_HAVE, 0, 0)
        c = self.arena.allocate(digest, nbytes, protected=bool(protected), replica=False)
        if c is None:
            return _ADOPT_REPLY.pack(_NO_ROOM, 0, 0)
        try:
            ok = remote_read(self.window, source, offset, nbytes, generation, digest16_of(digest), self.arena.view(c))
        except BaseException:
            self.arena.abandon(c)
            raise
        if not ok:
            self.arena.abandon(c)
            return _ADOPT_REPLY.pack(_STALE, 0, 0)
        loc = self.arena.seal(c)
        with self.arena.lock:
            self._c.host.bytes_written += nbytes
            self._c.bytes_received += nbytes
        return _ADOPT_REPLY.pack(_ADOPTED, loc.offset, loc.generation)

    def _on_free(self, source: int, payload: memoryview) -> bytes:
        digest, pos = _read_digest(payload, 0)
        self.arena.free(digest, _FREE_REQ.unpack_from(payload, pos)[0])
        return b""

    def _on_note_protect(self, source: int, payload: memoryview) -> bytes:
        digest, pos = _read_digest(payload, 0)
        self.arena.set_protected(digest, bool(payload[pos]))
        return b""

    def _on_make_room(self, source: int, payload: memoryview) -> bytes:
        """A peer needs memory for protected data: demote our unprotected copies to disk (drop them without a
        disk tier) until a hole of the size asked for opens. Never calls another rank: the homes are told by
        the caller, from the list of moves in the reply."""
        need = _MAKE_ROOM_REQ.unpack_from(payload, 0)[0]
        moves: list[bytes] = []
        while self.arena.tier.largest_hole < need:
            victim = self.arena.pick_victim(protected=False)
            if victim is None:
                break
            loc = self.arena.location(victim)
            to_disk = False
            try:
                if self.disk is not None:
                    self._write_disk(victim.digest, self.arena.view(victim))
                    to_disk = True
            finally:  # a write that failed keeps the copy: its home still lists it here
                self.arena.release(victim, gone=to_disk or self.disk is None)
            with self.arena.lock:
                self._c.host.evictions += 1
                if to_disk:
                    self._c.demotions += 1
                else:
                    self._c.drops += 1
                    self._c.dropped_bytes += victim.nbytes
            moves.append(_digest_bytes(victim.digest) + loc.pack() + _U8.pack(to_disk))
        ok = self.arena.tier.largest_hole >= need
        return _U8.pack(ok) + _U32.pack(len(moves)) + b"".join(moves)

    # ================================================================== misc
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")

    def __repr__(self) -> str:
        return f"<DistributedStore rank {self.rank}/{self.size}{' closed' if self._closed else ''}>"


__all__ = ["TIER_DISK", "TIER_MEMORY", "DistributedStore", "Location"]
