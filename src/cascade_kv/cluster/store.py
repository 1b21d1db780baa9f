"""The distributed store: every rank's memory pooled into one content-addressed cache over MPI.

Each rank contributes an arena (an ``MPI.Win.Allocate`` window, :mod:`.arena`)
and runs a service thread (:mod:`.service`) that answers for the share of the
global directory it is home to (:mod:`.directory`) and for the copies its arena
holds. All ranks share one content-addressed disk directory (Lustre on a
cluster) as the cold tier. ``docs/distributed-design.md`` walks through the
protocol. This module is the public API only; each behaviour lives in one part:

* :mod:`.writes`: put (claims, storing new blocks, ``bind``), delete, protect, demote, references.
* :mod:`.reads`: get, where each block is read from (here, a peer's window, disk under a load lease).
* :mod:`.eviction`: room in this rank's arena, victims moved to peers, to disk, or dropped.
* :mod:`.replication`: local replicas of blocks read often from peers.
* :mod:`.handlers`: the requests to a copy's owner (adopt, free, protection notice, make room), both ends.
* :mod:`.diskio`: the shared disk tier's files.
* :mod:`.durable`: ``persist=True`` (the journalled directory share; recovery at open is :mod:`.recovery`'s,
  the journal files :mod:`.journals`').

Rules that keep it deadlock-free: no thread holds the arena's lock across a
message; handlers (run on the service thread) never send a request to another
rank, only read peers' windows one-sidedly and touch local state. Where a
handler's work changes another home's entries (a peer that demoted blocks to
make room), it returns the changes to the caller, who forwards them.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
from mpi4py import MPI

from ..arrays import check_key, check_outs, key_list, put_items
from ..config import CascadeConfig
from ..errors import PeerTimeout, StoreClosed
from ..hashing import Hasher
from ..ids import Key
from ..info import KeyInfo
from ..namespace import Namespace, Space, check_name, check_quota, user_key
from ..stats import StoreStats
from ..tiers import DiskTier
from .arena import Arena
from .context import RankContext
from .counters import Counters, rank_stats, space_stats, sum_stats
from .directory import TIER_DISK, TIER_MEMORY, Location, dtype_of
from .directory.rpc import Directory
from .diskio import SharedDisk
from .durable import Durability, Recovery
from .eviction import Eviction
from .handlers import OwnerOps
from .reads import Reads, nbytes_of
from .replication import Replication
from .service import Service, _wait
from .slots import SLOT_HEADER
from .bindings import Bindings
from .window import ArenaWindow
from .writes import Writes

log = logging.getLogger(__name__)


class DistributedStore:
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
        self._closed = False
        self._c = Counters()  # this rank's totals, every namespace
        self._default = Space(None, Counters())  # the store's own API
        self._spaces: dict[str, Space] = {}  # named namespaces this rank made a view of, or found at reopen
        self._spaces_lock = threading.Lock()
        self.service = Service(self.comm, timeout=timeout)
        self.window = ArenaWindow(self.comm, cfg.host_capacity + SLOT_HEADER)
        self.arena = Arena(self.window, cfg.host_capacity, rank=self.rank, semantic=cfg.semantic_eviction,
                           order=cfg.eviction_order)
        self.disk: DiskTier | None = None
        """The shared disk tier's index on this rank (None without ``disk_path``)."""
        if cfg.disk_path is not None:
            self.disk = DiskTier(cfg.disk_path, self._hasher, capacity=cfg.disk_capacity, durable=cfg.persist,
                                 o_direct=cfg.o_direct, verify=cfg.verify_reads, group_access=cfg.group_access)
        try:
            self.durability = Durability.open(self.comm, self.rank, self.size, cfg, self.disk)
        except BaseException:
            # every rank fails here together (open_directory agrees on failure): undo the collective set-up
            self.service.close()
            self.arena.close()
            self.window.close(timeout=self.service.timeout)
            raise
        self.directory = Directory(self.service, state=self.durability.state)  # persist: the recovered share
        ctx = RankContext(cfg, self.comm, self.rank, self.size, self.service, self.window, self.arena, self.directory,
                          self._c)
        self.files = None if self.disk is None else SharedDisk(ctx, self.disk)
        self.owners = OwnerOps(ctx, self.files)
        self.eviction = Eviction(ctx, self.files, self.owners)
        self.replication = Replication(ctx, self.eviction)
        self.bindings = Bindings(self.window)
        self.directory.state.on_change = self.bindings.bump  # before any rank can bind: the barrier below
        self.reads = Reads(ctx, self.files, self.eviction, self.replication, self.bindings)
        self.writes = Writes(ctx, self.files, self.eviction, self.owners, self.reads, self.replication, self._hasher,
                             persist=self.durability.enabled)
        self.owners.register()
        self.comm.Barrier()  # every rank's handlers are registered before any rank calls
        self.durability.reload_protected(self.comm, self.rank, self.reads.read_blocks, self.directory)
        self.open_seconds = time.perf_counter() - t0
        """Seconds to open: window allocation and touch, service start."""

    @property
    def durable(self) -> Recovery | None:
        """What ``persist=True`` recovered at open (None without persist)."""
        return self.durability.recovery

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
        items = put_items(keys, arrays, is_prefix)  # checked before the store is: a bad call is refused first
        self._check_open()
        self.writes.put_many(space, items)

    def delete(self, key: Key) -> None:
        """Remove ``key`` on every rank; its block's copies are freed when no other key refers to it."""
        self.delete_many([key])

    def delete_many(self, keys: Iterable[Key]) -> None:
        """Remove every key (all must exist: otherwise nothing is removed)."""
        self._delete_many(self._default, keys)

    def _delete_many(self, space: Space, keys: Iterable[Key]) -> None:
        keys = list(dict.fromkeys(space.internal(k) for k in key_list(keys, "delete_many")))
        self._check_open()
        self.writes.delete_many(space, keys)

    def protect(self, key: Key) -> None:
        """Protect ``key`` as if it had been put with ``is_prefix=True`` (its block is brought into memory)."""
        self._set_prefix(key, True)

    def unprotect(self, key: Key) -> None:
        """Release ``key``'s protection on every rank: its block may now leave memory like any other."""
        self._set_prefix(key, False)

    def _set_prefix(self, key: Key, prefix: bool, space: Space | None = None) -> None:
        check_key(key)
        self._check_open()
        self.writes.set_prefix(self._default if space is None else space, key, prefix)

    def demote(self, keys: Iterable[Key]) -> None:
        """Move the blocks of ``keys`` out of cluster memory into the shared disk tier (cold-start experiments,
        freeing memory ahead of a known burst). Protected keys raise ``ValueError``; nothing moves then."""
        keys = list(dict.fromkeys(key_list(keys, "demote")))
        self._check_open()
        self.writes.demote(keys)

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
        return self.reads.get_many(space, keys, outs)

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
        r = self.reads.records([space.internal(check_key(key))])[0]
        where = self.directory.locate(r.digest)
        tiers = (("host",) * any(loc.rank == self.rank for loc in where.memory)
                 + ("remote",) * any(loc.rank != self.rank for loc in where.memory) + ("disk",) * (where.disk is not None))
        return KeyInfo(dtype_of(r.dtype), r.shape, nbytes_of(r), r.prefix, r.digest[:32].hex(), tiers, where.refs)

    def locations(self, key: Key) -> tuple[Location, ...]:
        """Where the copies of ``key``'s block lie right now (rank, tier, offset, size, generation)."""
        self._check_open()
        return self.directory.locate(self.reads.records([check_key(key)])[0].digest).locations

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
        has_disk, capacity = self.disk is not None, None if self.disk is None else self.disk.capacity
        if space is not None and space.name is not None:
            return space_stats(space.counters, self.arena, capacity, has_disk, home, self.open_seconds)
        mine = rank_stats(self._c, self.arena, capacity, has_disk, home, self.open_seconds)
        if space is None:
            return mine
        d = space.counters  # the default namespace: its own operations; tiers and moves are the rank's
        with self.arena.lock:
            ops = dict(puts=d.puts, gets=d.gets, misses=d.misses, deletes=d.deletes, dedup_hits=d.dedup_hits,
                       dedup_bytes_saved=d.dedup_bytes_saved)
        return dataclasses.replace(mine, **ops)

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
                     self.arena.close, lambda: self.window.close(timeout=self.service.timeout), self.durability.close):
            try:
                step()
            except Exception as e:  # keep going: the steps after it are collective too
                log.warning("rank %d: close: %s: %s", self.rank, type(e).__name__, e)
                errors.append(e)
        if errors:
            raise errors[0]

    def _remove_files(self) -> None:
        if self.files is not None and not self.durability.enabled:  # persist: the files are the point
            self.files.remove_known()

    def _close_disk(self) -> None:
        if self.files is not None:  # after the barrier: every rank's files are gone, the directories can go
            self.files.close()

    def __enter__(self) -> DistributedStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None and not self._closed and self.size > 1:
            # close() is collective: this rank now waits (up to the timeout) for the others to close too.
            # Say why at once, so the cause is on the screen even if the job is torn down while we wait.
            print(f"cascade-kv rank {self.rank}: leaving the store on {type(exc).__name__}: {exc}; closing "
                  f"(collective: the other ranks must close too)", file=sys.stderr, flush=True)
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")

    def __repr__(self) -> str:
        return f"<DistributedStore rank {self.rank}/{self.size}{' closed' if self._closed else ''}>"


__all__ = ["TIER_DISK", "TIER_MEMORY", "DistributedStore", "Location"]
