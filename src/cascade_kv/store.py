"""The single-node tiered store: the one place that moves data between tiers.

Structure: keys map to :class:`Entry` (block id, dtype, shape, prefix flag);
block ids map to :class:`Block` (size, the keys that refer to it, which tiers
hold a copy). Tiers only store bytes; the policy only names victims. One lock
guards all metadata; bulk copies, hashing and file I/O run outside it on blocks
that are *pinned* (a pinned block's copies are never freed or reused, so a
reader outside the lock can never see another block's bytes). Small copies
(up to 64 KiB a block) are done under the lock instead, a batch's in one hold
of it: releasing and retaking it would cost more than the copy.

Batch first: ``get_many``/``put_many`` are the real paths and the single calls
wrappers of them. What costs per block in Python is kept to the lookups, the
copy and the policy's bookkeeping; checks, counters and locking are per batch
(a 4 KiB get or put's copy takes ~1 us: the code around it is the cost).

Life of a put: hash (no lock) -> plan under the lock (dedup hits are settled
here; new blocks are registered *pending* so a concurrent put of the same bytes
waits for this one instead of storing a second copy) -> place the new blocks
(allocate them in one hold of the lock, evicting the policy's victims down a
tier; copy small ones under it, large ones outside it) -> journal (persist
only) -> commit the keys under the lock.

What each namespace holds (keys, blocks, bytes, protected blocks, copies per
tier) is counted where it changes, so ``stats()`` costs O(tiers);
``_walk_stats`` recounts it from the tables, for tests.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from . import catalog
from .arrays import byte_view, check_key, check_out, check_outs, finish_outs, key_list, needs_staging, put_items
from .config import CascadeConfig, format_size
from .errors import (BlockNotFound, CapacityError, ConfigError, IntegrityError, InvalidArgument, StorageError, StoreClosed)
from .hashing import Hasher
from .ids import BlockId, Key, SpacedKey, StoreKey, block_name
from .info import KeyInfo
from .blocks import Block, Entry, Plan, fastest
from .dryrun import DryRun
from .namespace import Namespace, Space, check_name, check_quota, user_key
from .persistence import Persistence, RecoveryReport
from .placement import WAIT_SLICE, Placement
from .policy import Policy
from .stats import Contents, Counters, StoreStats, TierStats
from .tiers import DiskTier, HostTier, Tier

log = logging.getLogger(__name__)

SMALL_COPY = 64 << 10  # below this a copy under the lock beats releasing and retaking it


class Store(Persistence, Placement):
    """A tiered, content-addressed, prefix-protecting KV-block store on one node.

    Use it as a context manager, or call :meth:`close`. Thread-safe.
    """

    # what this implementation does of the contract's optional parts (cascade_kv.contract)
    supports_persist = True
    supports_demote = True
    stats_scope = "store"
    ignored_config: frozenset[str] = frozenset()

    def __init__(self, config: CascadeConfig | None = None, **overrides: object) -> None:
        t0 = time.perf_counter()
        cfg = config if config is not None else CascadeConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        self._hasher = Hasher(cfg.hash_algorithm)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        # set last in __init__: close() and __del__ of a store that did not finish opening must not write
        # (compacting the journal from its empty key table once erased a cache the open merely failed on)
        self._opened = False
        self.recovery: RecoveryReport | None = None
        """What opening the persistent directory found (damage skipped, keys lost, files quarantined);
        ``None`` for a store without ``persist``."""
        self._keys: dict[StoreKey, Entry] = {}
        self._blocks: dict[BlockId, Block] = {}
        self._serial = itertools.count(int(time.time_ns()))  # dedup off: ids unique across reopenings
        self._journal: catalog.Journal | None = None
        self._lock_fd = -1
        # persist: journal + commit of user mutations happen in one order
        self._write_order: contextlib.AbstractContextManager[object] = (
            threading.Lock() if cfg.persist else contextlib.nullcontext())
        tiers = self._make_tiers(cfg)
        try:
            self._tiers = tiers
            self._disk = next((i for i, t in enumerate(tiers) if t.traits.persistent), None)
            self._memory = [i for i, t in enumerate(tiers) if t.traits.memory]
            self._memory_mask = sum(1 << i for i in self._memory)
            # credits rank copies in memory; the last tier (disk) stays LRU, where a victim is dropped
            self._policy = Policy([t.capacity if t.traits.memory else None for t in tiers], semantic=cfg.semantic_eviction,
                                  order=cfg.eviction_order, promotion_threshold=cfg.promotion_threshold,
                                  promote=cfg.locality_aware)
            self._c = Counters.for_tiers(len(tiers))  # totals: every namespace's
            self._default = Space(None, Counters.for_tiers(len(tiers)))  # the store's own API
            self._spaces: dict[str, Space] = {}  # named namespaces, made by namespace() or found at reopen
            self._demoting = [0] * len(tiers)  # demotions in flight out of each tier (they will free room)
            self._protected_bytes = [0] * len(tiers)
            self._promotions = collections.deque()
            self._queued_bytes = 0
            self._reads_in_flight = 0
            self._last_read = 0.0  # time.monotonic() when the last get_many with reads outside the lock ended
            self._hurry = 0  # callers waiting in _settle: the promoter stops deferring to reads
            self._promoting = 0
            self._placing = 0  # calls between their dry run and their last move (the promoter waits for them)
            self._promoter = None
            if cfg.persist:
                self._recover(Path(cfg.disk_path))  # type: ignore[arg-type]
        except BaseException:
            self._closed = True  # releases memory, descriptors and the lock; writes nothing
            if self._journal is not None:
                self._journal.close()
            for t in tiers:
                t.close()
            self._release_dir_lock()
            raise
        self.open_seconds = time.perf_counter() - t0
        """Seconds to open: arena allocation and touch, journal replay, reloading protected blocks."""
        self._opened = True

    def _make_tiers(self, cfg: CascadeConfig) -> list[Tier]:
        """The tiers, fastest first. The store's logic sees only their order and traits, so a subclass
        adds a GPU arena before the host tier, or peers' memory after it, by overriding this alone."""
        tiers: list[Tier] = [self._make_host_tier(cfg.host_capacity)]
        if cfg.disk_path is not None:
            try:
                tiers.append(DiskTier(cfg.disk_path, self._hasher, capacity=cfg.disk_capacity,
                                      durable=cfg.persist, o_direct=cfg.o_direct, verify=cfg.verify_reads,
                                      group_access=cfg.group_access))
            except BaseException:
                tiers[0].close()
                raise
        return tiers

    def _make_host_tier(self, capacity: int) -> HostTier:
        """The host tier; the node daemon's store overrides it to put the arena in memory its clients map."""
        return HostTier(capacity)

    # ------------------------------------------------------------------ public API: writes
    def put(self, key: Key, array: object, is_prefix: bool = False) -> None:
        """Store ``array`` under ``key``; ``is_prefix=True`` protects it in memory."""
        self.put_many([key], [array], is_prefix=is_prefix)

    def put_many(self, keys: Sequence[Key], arrays: Sequence[object], *,
                 is_prefix: bool | Sequence[bool] = False) -> None:
        """Store many arrays at once; all or nothing. A key given twice takes its last array."""
        self._put_many(self._default, keys, arrays, is_prefix)

    def _put_many(self, space: Space, keys: Sequence[Key], arrays: Sequence[object],
                  is_prefix: bool | Sequence[bool]) -> None:
        items = put_items(keys, arrays, is_prefix)
        if space.name is not None:
            items = [(space.internal(k), a, p) for k, a, p in items]
        self._refuse_unpersistable(items)
        views = [byte_view(a) for _, a, _ in items]
        self._put_prepared(space, items, self._block_ids(views, space), views)  # hashing: outside every lock

    def _put_prepared(self, space: Space, items: list[tuple[StoreKey, np.ndarray, bool]], ids: list[BlockId],
                      views: list[memoryview] | None = None) -> None:
        """A put whose values are checked and hashed (``ids``; ``views``: their bytes, when the caller made
        them to hash): plan, place, journal, commit."""
        with self._write_order:
            with self._lock:
                self._check_open()
                plan = self._plan_put(items, ids, space)
            try:
                self._place_all(plan, items, ids, views)
                if self._journal is not None:  # records cost ~5 us each: build them only to write them
                    self._journal_append([catalog.put_record(catalog.KeyRecord(k, bid, a.nbytes, a.dtype, a.shape, p))
                                          for (k, a, p), bid in zip(items, ids)])
            except BaseException:
                with self._lock:
                    self._abandon(plan)
                raise
            with self._lock:
                self._commit_put(items, ids, plan, space)

    def delete(self, key: Key) -> None:
        """Remove ``key``; its block is freed when no other key refers to it."""
        self.delete_many([key])

    def delete_many(self, keys: Iterable[Key]) -> None:
        """Remove every key (all must exist: otherwise nothing is removed)."""
        self._delete_many(self._default, keys)

    def _delete_many(self, space: Space, keys: Iterable[Key]) -> None:
        keys = list(dict.fromkeys(space.internal(k) for k in key_list(keys, "delete_many")))
        with self._write_order:
            with self._lock:
                self._check_open()
                self._entries(keys)
            self._journal_append([catalog.delete_record(k) for k in keys])
            with self._lock:
                for k in keys:
                    if k in self._keys:  # a drop may have taken it meanwhile
                        self._detach(k, self._keys.pop(k))
                self._c.deletes += len(keys)
                space.counters.deletes += len(keys)

    def unprotect(self, key: Key) -> None:
        """Release ``key``'s protection: its block may now be demoted like any other."""
        self._set_prefix(key, False)

    def protect(self, key: Key) -> None:
        """Protect ``key`` as if it had been put with ``is_prefix=True`` (brings it into memory)."""
        self._set_prefix(key, True)

    def demote(self, keys: Iterable[Key]) -> None:
        """Move the blocks of ``keys`` out of memory into the disk tier (cold starts, freeing memory ahead of a
        known burst). Protected keys raise :class:`InvalidArgument` (a ``ValueError``) and nothing moves; so does a
        demotion the disk tier cannot take (:class:`CapacityError`); without a disk tier, ConfigError."""
        keys = list(dict.fromkeys(key_list(keys, "demote")))
        with self._write_order:
            with self._lock:
                self._check_open()
                if self._disk is None:
                    raise ConfigError("demote: the store has no disk tier (set disk_path)")
                self._settle()  # a queued promotion must not bring a block back after this demotion
                blocks = {e.block_id: self._blocks[e.block_id] for e in self._entries(keys)}
                for k in keys:
                    if self._blocks[self._keys[k].block_id].protected and self.config.semantic_eviction:
                        raise InvalidArgument(f"demote: the block of {k!r} is protected (is_prefix); "
                                              f"unprotect it first")
                with self._placement():
                    self._precheck_demote(blocks, keys)
                    for b in blocks.values():
                        self._demote_block(b)

    def _precheck_demote(self, blocks: dict[BlockId, Block], keys: list[Key]) -> None:
        """Refuse a demotion the disk tier cannot take before any block moves (a dry run)."""
        assert self._disk is not None
        run = DryRun(self)
        for i, b in enumerate(blocks.values()):
            if not run.where(b) & self._memory_mask or b.id in run.dropped:
                continue
            run.held.add(b.id)  # pinned while it moves, as _demote_block does
            if not run.where(b) >> self._disk & 1:
                if not run.make_room(self._disk, b):
                    key = next(k for k in keys if self._keys[k].block_id == b.id)
                    raise self._no_room(f"demote({key!r})", b, [self._disk], i, len(blocks))
                run.add(b, self._disk)
            for t in self._memory:
                if run.where(b) >> t & 1:
                    run.free_copy(b, t)
            run.held.discard(b.id)

    def _demote_block(self, b: Block) -> None:
        """Move ``b``'s memory copies to the disk tier (lock held; released around the copy)."""
        assert self._disk is not None
        # Another demote (of a key sharing the block) or an eviction may be moving it now: wait for that
        # first, else both would allocate it in the disk tier. Waiting unpinned: the mover waits for
        # readers' pins to go before it frees the memory copy, and would wait for ours forever.
        while b.moving or b.rising:
            self._cond.wait(WAIT_SLICE)
        if not b.where & self._memory_mask or self._blocks.get(b.id) is not b:
            return
        b.pins += 1
        b.moving = True
        try:
            if not b.where >> self._disk & 1:
                if not self._make_room(self._disk, b):
                    raise CapacityError(f"demote: the disk tier cannot hold {b.nbytes} B more "
                                        f"({self._room_report(self._disk)})")
                try:
                    src = fastest(b.where)
                    with self._unlocked():
                        self._copy_between(b, src, self._disk)
                except BaseException:
                    self._tiers[self._disk].free(b.id)
                    raise
                self._add_copy(b, self._disk)
            while b.pins > 1:  # a reader outside the lock holds the memory copy: let it finish
                self._cond.wait(WAIT_SLICE)
            for t in self._memory:
                if b.where >> t & 1:
                    self._drop_copy(b, t)
            for c in self._counts(b):
                c.demotions += 1
        finally:
            b.moving = False
            self._unpin(b)

    # ------------------------------------------------------------------ public API: reads
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
        internal = keys if space.name is None else [space.internal(k) for k in keys]
        with self._lock:
            self._check_open()
            entries = self._entries(internal, count_misses=space)
            if outs is None:
                results = [np.empty(e.shape, e.dtype) for e in entries]
            else:
                # check_out's common case inlined (~0.1 us a block): a numpy out of the block's dtype and shape
                results = [o if type(o) is np.ndarray and o.dtype == e.dtype and o.shape == e.shape and o.flags.writeable
                           else np.empty(e.shape, e.dtype) if o is None else check_out(o, k, e.dtype, e.shape)
                           for k, e, o in zip(keys, entries, outs)]
            blocks = self._start_reads(space, keys, entries)
            jobs = self._read_small(blocks, results, space)
            self._reads_in_flight += bool(jobs)
        if jobs:
            try:
                self._read_pinned(jobs, space)
            finally:
                self._end_reads()
        return results if outs is None else finish_outs(outs, results)  # torch outs: staged copies land

    def _start_reads(self, space: Space, keys: list[Key], entries: list[Entry]) -> list[Block]:
        """Lock held, every key found and every out checked: the keys' blocks, counted as gets, or
        IntegrityError (nothing counted) for a block whose every copy failed its digest check."""
        table = self._blocks
        blocks = [table[e.block_id] for e in entries]
        for k, b in zip(keys, blocks):
            if b.lost:
                raise IntegrityError(f"get({k!r}): every copy of block {block_name(b.id)[:16]} failed "
                                     f"its digest check; put the value again")
        self._c.gets += len(keys)
        space.counters.gets += len(keys)
        return blocks

    def _read_small(self, blocks: list[Block], results: list[np.ndarray],
                    space: Space) -> list[tuple[int, Block, np.ndarray]]:
        """Lock held: copy the blocks that are small and in the top tier straight into their results (releasing
        and retaking the lock around such a copy would cost more than it), account them as one batch, and
        pin the others for :meth:`_read_pinned`, which copies them outside the lock (returned as its jobs)."""
        jobs: list[tuple[int, Block, np.ndarray]] = []
        top = self._tiers[0]
        if not top.traits.addressable:  # a copy out of it may block (a file, a device): never under the lock
            for i, b in enumerate(blocks):
                b.pins += 1
                jobs.append((i, b, results[i]))
            return jobs
        views: list[memoryview] = []
        done: list[Block] = []
        for i, b in enumerate(blocks):
            if b.where & 1 and b.nbytes <= SMALL_COPY:
                try:
                    views.append(results[i].data.cast("B"))  # out_bytes inlined: ~0.1 us a block less
                except (TypeError, ValueError):  # not C-contiguous (staged), or no buffer format: the general path
                    pass
                else:
                    done.append(b)
                    continue
            b.pins += 1
            jobs.append((i, b, results[i]))
        if done:
            top.read_many([b.id for b in done], views)
            self._account_top_reads(done, space)
        return jobs

    def _account_top_reads(self, blocks: list[Block], space: Space) -> None:
        """:meth:`_account_read` for a batch of reads served by the top tier: the counters once, the policy per block."""
        accessed = self._policy.accessed
        nbytes = 0
        for b in blocks:
            b.reads += 1
            nbytes += b.nbytes
            accessed(0, b.id, b.nbytes, b.reads)
        for c in (self._c, space.counters):
            tc = c.tiers[0]
            tc.hits += len(blocks)
            tc.bytes_read += nbytes

    def _end_reads(self) -> None:
        """After reads made outside the lock (``_reads_in_flight`` was raised for them): the promoter may go on."""
        with self._lock:
            self._reads_in_flight -= 1
            self._last_read = time.monotonic()
            self._cond.notify_all()

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored (``False`` for anything that is not a key, as a dict answers)."""
        return self._contains(self._default, key)

    def contains(self, key: Key) -> bool:
        """Like ``in``, but a key that is not str or bytes raises :class:`InvalidArgumentType`."""
        return self._contains(self._default, key, strict=True)

    def _contains(self, space: Space, key: object, strict: bool = False) -> bool:
        if strict:
            check_key(key)
        with self._lock:
            self._check_open()
            return isinstance(key, (str, bytes)) and space.internal(key) in self._keys

    def lookup(self, keys: Sequence[Key]) -> int:
        """How many of ``keys``, from the first, are stored: the index of the first missing one (``len(keys)``
        if none is), e.g. the cached blocks of a prompt's :func:`~cascade_kv.tokens.prefix_keys`. A key whose
        block was lost (every copy failed its digest check) counts as missing. A question, not a read: no
        get, hit or miss is counted and no eviction order changes."""
        return self._lookup(self._default, keys)

    def _lookup(self, space: Space, keys: Sequence[Key]) -> int:
        keys = key_list(keys, "lookup")
        with self._lock:  # one lock for the batch: a per-key call would take it once per block of the prompt
            self._check_open()
            for i, k in enumerate(keys):
                e = self._keys.get(space.internal(k))
                # not ready with keys: a lost block being written again by a put, not readable yet
                if e is None or self._blocks[e.block_id].lost or not self._blocks[e.block_id].ready:
                    return i
            return len(keys)

    def __len__(self) -> int:
        """Keys of the default namespace (the store's own; a namespace's are counted by its view)."""
        return self._len(self._default)

    def _len(self, space: Space) -> int:
        with self._lock:
            self._check_open()
            if not self._spaces:
                return len(self._keys)
            return sum(1 for k in self._keys if space.owns(k))  # one table for every namespace: a scan

    def keys(self) -> list[Key]:
        """Keys of the default namespace."""
        return self._keys_of(self._default)

    def _keys_of(self, space: Space) -> list[Key]:
        with self._lock:
            self._check_open()
            return [user_key(k) for k in self._keys if space.owns(k)]

    def namespace(self, name: str, protected_quota: int | str | None = None) -> Namespace:
        """A view of this store that sees only the keys put through it (see :mod:`cascade_kv.namespace`): its own
        dedup, counters and ``protected_quota`` (bytes of protected blocks at most; ``"64MiB"`` accepted) over
        the same tiers and capacity. The same name gives views over the same keys; a quota, once set, is fixed
        (another one raises :class:`InvalidArgument`; ``None`` leaves it)."""
        name = check_name(name)
        quota = check_quota(protected_quota)
        with self._lock:
            self._check_open()
            space = self._space_named(name)
            space.set_quota(quota)
            return Namespace(self, space)

    def _space_named(self, name: str) -> Space:
        """The named namespace's state, made on first use (lock held)."""
        space = self._spaces.get(name)
        if space is None:
            space = self._spaces[name] = Space(name, Counters.for_tiers(len(self._tiers)))
        return space

    def _space_of(self, key: StoreKey) -> Space:
        return self._space_named(key.space) if isinstance(key, SpacedKey) else self._default

    def info(self, key: Key) -> KeyInfo:
        """Where ``key`` lives and what it holds."""
        return self._info(self._default, key)

    def _info(self, space: Space, key: Key) -> KeyInfo:
        check_key(key)
        with self._lock:
            self._check_open()
            self._settle()
            e = self._entries([space.internal(key)])[0]
            b = self._blocks[e.block_id]
            return KeyInfo(e.dtype, e.shape, b.nbytes, e.prefix, b.id[:32].hex(),
                           tuple(t.traits.name for i, t in enumerate(self._tiers) if b.where >> i & 1),
                           len(b.keys))

    def settle(self) -> None:
        """Wait until the promotions queued by earlier reads are done. Reads never need this (a block being
        promoted is read from where it is); benchmarks call it for repeatable placement between phases."""
        with self._lock:
            self._check_open()
            self._settle()

    # ------------------------------------------------------------------ observability & lifecycle
    def stats(self, all_namespaces: bool = False) -> StoreStats:
        """A consistent snapshot of the counters (after every promotion queued by earlier reads): the default
        namespace's, or with ``all_namespaces`` the whole store's (the operator's view). Tiers' ``used_bytes``
        and ``capacity_bytes`` are the shared tiers' in both."""
        return self._stats(None if all_namespaces else self._default)

    def _stats(self, space: Space | None) -> StoreStats:
        """``space``'s stats; ``None``: every namespace's. O(tiers): the contents are counted as they change."""
        with self._lock:
            self._check_open()
            self._settle()
            c = self._c if space is None else space.counters
            return self._snapshot(c, c.contents)

    def _snapshot(self, c: Counters, h: Contents) -> StoreStats:
        """The stats of counters ``c`` and contents ``h`` (lock held)."""
        tiers = tuple(TierStats(t.traits.name, tc.hits, tc.misses, tc.bytes_read, tc.bytes_written, tc.evictions,
                                n, t.used, t.capacity) for t, tc, n in zip(self._tiers, c.tiers, h.tier_blocks))
        return StoreStats(
            tiers=tiers, keys=h.keys, blocks=h.blocks, logical_bytes=h.logical_bytes, unique_bytes=h.unique_bytes,
            protected_blocks=h.protected_blocks, protected_in_memory=h.protected_in_memory,
            puts=c.puts, gets=c.gets, misses=c.misses, deletes=c.deletes, dedup_hits=c.dedup_hits,
            dedup_bytes_saved=c.dedup_bytes_saved, demotions=c.demotions, promotions=c.promotions,
            drops=c.drops, dropped_bytes=c.dropped_bytes, integrity_errors=c.integrity_errors,
            quarantined=c.quarantined, open_seconds=self.open_seconds)

    def _walk_stats(self, space: Space | None) -> StoreStats:
        """:meth:`_stats` recounted from every key and block: the checker the kept counts are tested against."""
        with self._lock:
            self._check_open()
            self._settle()
            c = self._c if space is None else space.counters
            return self._snapshot(c, self._walk_contents(space))

    def _walk_contents(self, space: Space | None) -> Contents:
        """What ``space`` (``None``: every namespace) holds, counted by walking the tables (lock held)."""
        default = self._default
        blocks = [b for b in self._blocks.values()
                  if space is None or (b.space if b.space is not None else default) is space]
        entries = [e for k, e in self._keys.items() if space is None or space.owns(k)]
        protected = [b for b in blocks if b.protected]
        return Contents(
            keys=len(entries), logical_bytes=sum(self._blocks[e.block_id].nbytes for e in entries),
            blocks=sum(1 for b in blocks if b.keys), unique_bytes=sum(b.nbytes for b in blocks if b.keys),
            protected_blocks=len(protected),
            protected_in_memory=sum(1 for b in protected if b.where & self._memory_mask),
            tier_blocks=[sum(1 for b in blocks if b.where >> i & 1) for i in range(len(self._tiers))])

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The tier objects, fastest first. Still answers after :meth:`close` (closed tiers: their paths, not
        their data), unlike every other call, so that a test or a tool can find a closed store's files."""
        with self._lock:
            if not self._closed:
                self._settle()  # what the tiers hold is what a caller would see had the reads promoted themselves
        return tuple(self._tiers)

    def close(self) -> None:
        """Release memory and files. A non-persistent store removes the block files it wrote."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            promoter, self._promoter = self._promoter, None
        if promoter is not None:
            promoter.join()  # it drops the queue and returns once the promotion in hand (if any) is done
        if self._disk is not None and not self.config.persist:
            disk = self._tiers[self._disk]
            for bid in disk.block_ids():
                disk.free(bid)
        if self._journal is not None:
            try:  # a long-lived store's journal holds every change since it opened: keep only live keys
                if self._opened:  # only a store that finished opening knows every key
                    self._journal.compact(catalog.KeyRecord(k, e.block_id, self._blocks[e.block_id].nbytes, e.dtype,
                                                            e.shape, e.prefix) for k, e in self._keys.items())
            except StorageError as e:  # the old journal is intact (compaction writes aside, then renames)
                log.warning("journal not compacted at close: %s", e)
            self._journal.close()
        for t in self._tiers:
            t.close()
        self._release_dir_lock()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_opened", False) and not self._closed:  # a half-built store released all in __init__
            with contextlib.suppress(Exception):
                self.close()

    # ------------------------------------------------------------------ put internals
    def _block_ids(self, views: list[memoryview], space: Space) -> list[BlockId]:
        """Dedup on: each value's digest, followed in a named namespace by its tag (so equal bytes in two
        namespaces are two blocks); dedup off: the digest and a serial, never shared whatever the namespace."""
        digest = self._hasher.digest
        if self.config.dedup_enabled:
            tag = space.tag
            return [BlockId(digest(v) + tag) for v in views]
        return [BlockId(digest(v) + next(self._serial).to_bytes(8, "big")) for v in views]

    def _plan_put(self, items: list[tuple[StoreKey, np.ndarray, bool]], ids: list[BlockId], space: Space) -> Plan:
        """Under the lock: wait out other threads' pending copies of these bytes, then pin every block
        of the batch, registering those this put must write as pending."""
        while True:  # wait before registering anything: two batches can never wait on each other
            table = self._blocks
            if all(b.ready for b in map(table.get, ids) if b is not None):
                break
            self._cond.wait(WAIT_SLICE)
            self._check_open()
        self._check_quota(space, items, ids)
        plan = Plan()
        for (key, arr, prefix), bid in zip(items, ids):
            if bid in plan.held:
                continue
            b = self._blocks.get(bid)
            if b is None:
                b = self._blocks[bid] = Block(bid, arr.nbytes, space=space)  # not ready: pending until commit
                plan.fresh.append(b)
            elif b.lost or not b.ready:
                b.ready, b.lost = False, False
                plan.fresh.append(b)
            b.pins += 1  # a dedup hit's block must not be released before the key is attached
            plan.held[bid] = b
        try:
            self._precheck_capacity(items, ids, plan)
        except BaseException:
            self._abandon(plan)
            raise
        return plan

    def _check_quota(self, space: Space, items: list[tuple[StoreKey, np.ndarray, bool]], ids: list[BlockId]) -> None:
        """CapacityError, before anything changes, if the batch would leave ``space`` with more protected bytes
        than its quota: the batch's key changes are replayed on the blocks' prefix counts (an overwritten prefix
        key releases its block, a block protected twice counts once). Lock held."""
        if space.protected_quota is None or not any(p for _, _, p in items):
            return
        counts: dict[BlockId, int] = {}
        sizes: dict[BlockId, int] = {}

        def change(bid: BlockId, nbytes: int, delta: int) -> None:
            if bid not in counts:
                b = self._blocks.get(bid)
                counts[bid] = b.protected if b is not None else 0
                sizes[bid] = nbytes
            counts[bid] += delta

        for (key, arr, prefix), bid in zip(items, ids):
            old = self._keys.get(key)
            if old is not None and old.prefix:
                change(old.block_id, self._blocks[old.block_id].nbytes, -1)
            change(bid, arr.nbytes, +1 if prefix else 0)
        before = {bid: (b.protected if (b := self._blocks.get(bid)) is not None else 0) for bid in counts}
        after = space.protected_bytes + sum(sizes[bid] * ((counts[bid] > 0) - (before[bid] > 0)) for bid in counts)
        if after > space.protected_quota:
            raise CapacityError(f"namespace {space.name!r}: protected_quota is {space.protected_quota} B, "
                                f"{space.protected_bytes} B are protected and this call needs "
                                f"{after - space.protected_bytes} B more; nothing was changed")

    def _must_be_in_memory(self, prefix: bool) -> bool:
        return prefix and self.config.semantic_eviction

    def _needs_memory(self, items: list[tuple[StoreKey, np.ndarray, bool]], ids: list[BlockId]) -> set[BlockId]:
        """The blocks of a put batch that must live in memory (protected, with semantic eviction)."""
        if not self.config.semantic_eviction:
            return set()
        return {bid for (_, _, p), bid in zip(items, ids) if p}

    def _allowed_tiers(self, prefix: bool) -> list[int]:
        return list(self._memory) if self._must_be_in_memory(prefix) else list(range(len(self._tiers)))

    def _precheck_capacity(self, items: list[tuple[Key, np.ndarray, bool]], ids: list[BlockId],
                           plan: Plan) -> None:
        """Refuse, before anything moves, a put that cannot fit whatever is evicted, and record in ``plan``
        the tier each new block goes to: a dry run of :meth:`_place_all`'s steps in the same order
        (evicting first and failing then would have demoted or dropped blocks for nothing)."""
        largest: dict[bool, tuple[Key, np.ndarray, bool]] = {}  # per kind: a block fits where a larger one does
        for item in items:
            other = largest.get(item[2])
            if other is None or item[1].nbytes > other[1].nbytes:
                largest[item[2]] = item
        for key, arr, prefix in largest.values():
            allowed = self._allowed_tiers(prefix)
            if not any(self._tiers[t].fits(arr.nbytes) for t in allowed):
                where = "memory tier" if self._must_be_in_memory(prefix) else "tier"
                biggest = max((self._tiers[t].capacity or 0) for t in allowed)
                raise CapacityError(f"put({key!r}): block of {arr.nbytes} B is larger than every {where} "
                                    f"(largest holds {biggest} B)")
        needs_memory = self._needs_memory(items, ids)
        rising: list[Block] = []  # dedup hits to bring into memory
        if needs_memory:
            fresh = {b.id for b in plan.fresh}
            rising = [self._blocks[bid] for bid in dict.fromkeys(ids) if bid in needs_memory and bid not in fresh
                      and not self._blocks[bid].where & self._memory_mask]
        rising_ids = {b.id for b in rising}
        if not plan.fresh and not rising:
            return  # every block is stored already, where it may stay: nothing to place
        self._enter_placement()
        plan.placing = True
        if not rising and self._fits_without_eviction(plan, needs_memory):
            return  # the common case: room now, nothing to evict (a dry run cost ~60 us per small put)
        run = DryRun(self, plan.held)
        key_of = {bid: key for (key, _, _), bid in zip(items, ids)}
        placed = 0
        for b in rising + sorted(plan.fresh, key=lambda b: b.id not in needs_memory):
            allowed = self._memory if b.id in rising_ids else self._allowed_tiers(b.id in needs_memory)
            t = run.allocate(b, allowed)
            if t is None:
                raise self._no_room(f"put({key_of[b.id]!r})", b, allowed, placed, len(rising) + len(plan.fresh))
            run.add(b, t)
            plan.tiers[b.id] = t
            if self.config.persist and t != self._disk and b.id not in rising_ids:
                assert self._disk is not None
                if not run.make_room(self._disk, b):
                    raise self._no_room(f"put({key_of[b.id]!r}) (a durable copy)", b, [self._disk], placed,
                                        len(rising) + len(plan.fresh))
                run.add(b, self._disk)
            placed += 1

    def _fits_without_eviction(self, plan: Plan, needs_memory: set[BlockId]) -> bool:
        """Whether every new block of ``plan`` fits, now, in the tier a dry run would pick first (the fastest
        allowed tier it can ever fit in), with its durable copy (persist), evicting nothing: then that is
        where each goes (recorded in ``plan.tiers``) and nothing can be demoted or dropped for it."""
        by_tier: dict[int, list[int]] = {}
        chosen: dict[BlockId, int] = {}
        first: dict[tuple[bool, int], int | None] = {}  # (must be in memory, size) -> the tier: a batch has few
        durable = self._disk if self.config.persist else None
        for b in plan.fresh:
            kind = (b.id in needs_memory, b.nbytes) if needs_memory else (False, b.nbytes)
            t = first.get(kind, -1)
            if t == -1:
                t = first[kind] = next((t for t in self._allowed_tiers(kind[0]) if self._tiers[t].fits(b.nbytes)), None)
            if t is None:
                return False
            chosen[b.id] = t
            sizes = by_tier.get(t)
            if sizes is None:
                sizes = by_tier[t] = []
            sizes.append(b.nbytes)
            if durable is not None and t != durable:
                by_tier.setdefault(durable, []).append(b.nbytes)
        if not all(self._tiers[t].fits_now(sizes) for t, sizes in by_tier.items()):
            return False
        plan.tiers.update(chosen)
        return True

    def _no_room(self, what: str, b: Block, tiers: list[int], placed: int, total: int) -> CapacityError:
        names = "/".join(self._tiers[t].traits.name for t in tiers)
        return CapacityError(
            f"{what}: no room for a block of {format_size(b.nbytes)} ({b.nbytes} B) in the {names} tier(s) "
            f"even after evicting every victim, with {placed} of the call's {total} blocks placed before it; "
            f"nothing was moved. " + ", ".join(self._room_report(t) for t in range(len(self._tiers))))

    def _place_all(self, plan: Plan, items: list[tuple[Key, np.ndarray, bool]], ids: list[BlockId],
                   views: list[memoryview] | None = None) -> None:
        """Write every new block into its tier (and, with persist, durably to disk)."""
        # the values' bytes by block; a value without bytes (the daemon's described dedup hits) is never written
        src = dict(zip(ids, views)) if views is not None else {
            bid: byte_view(arr) for (_, arr, _), bid in zip(items, ids) if isinstance(arr, np.ndarray)}
        needs_memory = self._needs_memory(items, ids)
        # dedup hits on blocks that must now be protected but sit on disk only: bring them up first, from
        # the caller's bytes (a bad disk copy must not fail a put that carries good ones)
        # In the order of _precheck_capacity's dry run, into the tiers it chose (only if another thread took
        # the room meanwhile does _allocate fall back to the slower tiers the block may live in).
        fresh = {b.id for b in plan.fresh}
        if needs_memory:
            with self._lock:
                for bid in dict.fromkeys(ids):
                    b = self._blocks[bid]
                    if bid in needs_memory and bid not in fresh and not b.where & self._memory_mask:
                        self._bring_to_memory(b, src[bid], self._chosen(plan, b, self._memory))
        # blocks that must be in memory before the others: a block of this batch placed in memory stays
        # pinned until the commit, so it could not make room for them
        order = sorted(plan.fresh, key=lambda b: b.id not in needs_memory) if needs_memory else plan.fresh
        placed = self._write_fresh(plan, order, src, needs_memory)
        if self.config.persist:
            assert self._disk is not None
            for b, t in placed:
                if t == self._disk:
                    continue
                with self._lock:
                    if not self._make_room(self._disk, b):
                        raise CapacityError(f"put: disk tier cannot hold {b.nbytes} B "
                                            f"({self._tiers[self._disk].used} B used of {self.config.disk_capacity} B)")
                self._write_copy(b, self._disk, src[b.id])
        # dedup hits whose only copies are unchecked (files adopted at reopen or changed since their last
        # check): rewrite them from the caller's bytes, hashed just now, so that an acknowledged put never
        # rests on a copy that may be corrupt. Rare (a stat each), and it heals bad files for free.
        for bid in plan.held.keys() - fresh:
            b = self._blocks[bid]
            for t in range(len(self._tiers)):
                if b.where >> t & 1 and not self._tiers[t].trusted(bid) and not b.where & ~(1 << t):
                    self._tiers[t].write(bid, src[bid])

    def _write_fresh(self, plan: Plan, order: list[Block], src: dict[BlockId, memoryview],
                     needs_memory: set[BlockId]) -> list[tuple[Block, int]]:
        """Allocate the put's new blocks, in ``order``, in one hold of the lock (an eviction that copies releases
        it), copy the small ones into a memory tier under it and the others outside it, and record every copy:
        per block, the lock twice and a tier call each for allocating, copying and recording cost more than a
        4 KiB copy. Whatever was allocated and not recorded when something fails is freed here (what was
        recorded, the caller's abandon drops). Returns ``(block, tier)`` for each block, in ``order``."""
        # A new block has no copy before this put (a healed one lost them all): its bit in ``where`` is
        # set exactly when its copy here was recorded, which is how a failure finds what to free.
        placed: list[tuple[Block, int]] = []
        try:
            with self._lock:
                chosen, tiers = plan.tiers.get, self._tiers
                for b in order:
                    t = chosen(b.id)
                    if t is None or not tiers[t].allocate(b.id, b.nbytes):  # the room the dry run saw is gone
                        t = self._allocate(b, self._chosen(plan, b, self._allowed_tiers(b.id in needs_memory)))
                    placed.append((b, t))
                for t in {t for _, t in placed}:
                    if not tiers[t].traits.addressable:
                        continue  # its writes may block (files): never under the lock
                    small = [b for b, u in placed if u == t and b.nbytes <= SMALL_COPY]
                    tiers[t].write_many([b.id for b in small], [src[b.id] for b in small])
                    self._add_copies(small, t)
            for b, t in placed:  # the large ones, outside the lock: b is pinned, its slot stays its own
                if not b.where >> t & 1:
                    tiers[t].write(b.id, src[b.id])
                    with self._lock:
                        self._add_copy(b, t, use=True)
        except BaseException:
            with self._lock:
                for b, t in placed:
                    if not b.where >> t & 1:
                        self._tiers[t].free(b.id)
            raise
        return placed

    @staticmethod
    def _chosen(plan: Plan, b: Block, allowed: list[int]) -> list[int]:
        """The dry run's tier for ``b`` first, then the slower ones it may live in."""
        t = plan.tiers.get(b.id)
        return allowed if t is None else [t] + [u for u in allowed if u > t]

    def _write_copy(self, b: Block, t: int, data: memoryview) -> None:
        """Copy ``data`` into the slot allocated for ``b`` in tier ``t`` (outside the lock; b is pinned)."""
        try:
            self._tiers[t].write(b.id, data)
        except BaseException:
            with self._lock:
                self._tiers[t].free(b.id)
            raise
        with self._lock:
            self._add_copy(b, t, use=True)

    def _commit_put(self, items: list[tuple[StoreKey, np.ndarray, bool]], ids: list[BlockId], plan: Plan,
                    space: Space) -> None:
        written = {b.id for b in plan.fresh}
        table, blocks = self._keys, self._blocks
        logical = new_blocks = unique = hits = saved = 0  # counted once for the batch: every block is space's
        for (key, arr, prefix), bid in zip(items, ids):
            b = blocks[bid]
            old = table.get(key)
            table[key] = Entry(bid, arr.dtype, arr.shape, prefix)
            if not b.keys:  # _attach, with the contents counted for the batch below
                new_blocks += 1
                unique += b.nbytes
            b.keys.add(key)
            logical += b.nbytes
            if prefix:
                self._protect_block(b, +1)
            if old is not None:
                self._detach(key, old)
            if bid in written:
                written.discard(bid)  # the first put of these bytes stores them; any later one is a hit
                continue
            hits += 1  # only ever a hit on this namespace's own block
            saved += arr.nbytes
            for t in range(len(self._tiers)):
                if b.where >> t & 1:  # a use, but not a read: only reads earn the reuse credit
                    self._policy.accessed(t, bid, b.nbytes, b.reads)
        for c in (self._c, space.counters):
            c.puts += len(items)
            c.dedup_hits += hits
            c.dedup_bytes_saved += saved
            cc = c.contents
            cc.keys += len(items)
            cc.logical_bytes += logical
            cc.blocks += new_blocks
            cc.unique_bytes += unique
        for b in plan.fresh:
            b.ready = True
        self._unpin_all(plan.held.values())
        self._leave_placement(plan)

    def _abandon(self, plan: Plan) -> None:
        """Undo a put that failed: free what its new blocks placed, unpin the rest."""
        for b in plan.fresh:
            for t in range(len(self._tiers)):
                if b.where >> t & 1:
                    self._drop_copy(b, t)
            b.ready = True
            b.lost = bool(b.keys)  # a lost block that was being healed stays lost
        self._unpin_all(plan.held.values())
        self._leave_placement(plan)

    # ------------------------------------------------------------------ key bookkeeping (lock held)
    def _entries(self, keys: list[StoreKey], count_misses: Space | None = None) -> list[Entry]:
        """The keys' entries, or BlockNotFound; ``count_misses``: the namespace a miss counts in."""
        table = self._keys
        try:
            return [table[k] for k in keys]  # every key there: the common case, at C speed
        except KeyError:
            pass
        out = []
        for k in keys:
            e = self._keys.get(k)
            if e is None:
                if count_misses is not None:
                    self._c.misses += 1
                    count_misses.counters.misses += 1
                raise BlockNotFound(f"key {k!r} is not in the store")
            out.append(e)
        return out

    def _attach(self, key: StoreKey, e: Entry, b: Block) -> None:
        """``key`` (just set to ``e`` in the key table) now refers to ``b``."""
        first = not b.keys
        b.keys.add(key)
        for c in self._counts(b):  # a key's namespace is its block's: block ids carry the namespace's tag
            cc = c.contents
            cc.keys += 1
            cc.logical_bytes += b.nbytes
            if first:
                cc.blocks += 1
                cc.unique_bytes += b.nbytes
        if e.prefix:
            self._protect_block(b, +1)

    def _detach(self, key: StoreKey, e: Entry) -> None:
        """``key`` (removed from the key table, or set to another entry) no longer refers to ``e``."""
        b = self._blocks[e.block_id]
        if e.prefix:
            self._protect_block(b, -1)
        last = False
        if self._keys.get(key) is None or self._keys[key].block_id != b.id:
            last = key in b.keys and len(b.keys) == 1
            b.keys.discard(key)
        for c in self._counts(b):
            cc = c.contents
            cc.keys -= 1
            cc.logical_bytes -= b.nbytes
            if last:
                cc.blocks -= 1
                cc.unique_bytes -= b.nbytes
        self._maybe_release(b)

    def _set_prefix(self, key: Key, prefix: bool, space: Space | None = None) -> None:
        check_key(key)
        space = self._default if space is None else space
        key = space.internal(key)
        with self._write_order:
            with self._lock:
                self._check_open()
                e = self._entries([key])[0]
                if e.prefix == prefix:
                    return
                b = self._blocks[e.block_id]
                if prefix and not b.protected and space.protected_quota is not None and (
                        space.protected_bytes + b.nbytes > space.protected_quota):
                    raise CapacityError(f"protect({key!r}): namespace {space.name!r} has protected_quota "
                                        f"{space.protected_quota} B, {space.protected_bytes} B are protected and "
                                        f"this call needs {b.nbytes} B more; nothing was changed")
                if prefix and self._must_be_in_memory(True) and not b.where & self._memory_mask:
                    b.pins += 1  # cannot be dropped while we make room for it
                    try:
                        with self._placement():
                            t = DryRun(self, [b.id]).allocate(b, self._memory)  # refuse before demoting anything
                            if t is None:
                                raise self._no_room(f"protect({key!r})", b, self._memory, 0, 1)
                            self._bring_to_memory(b, tiers=[t])
                    finally:
                        self._unpin(b)
                    if self._keys.get(key) is not e:
                        raise BlockNotFound(f"key {key!r} was removed while being protected")
                # applied before the journal (and undone if that fails) so that the block cannot be
                # evicted between reaching memory and becoming protected
                new = self._keys[key] = Entry(e.block_id, e.dtype, e.shape, prefix)
                self._protect_block(b, +1 if prefix else -1)
            try:
                self._journal_append([catalog.protect_record(key, prefix)])
            except BaseException:
                with self._lock:
                    if self._keys.get(key) is new:
                        self._keys[key] = e
                        self._protect_block(b, -1 if prefix else +1)
                raise

    def _protect_block(self, b: Block, delta: int) -> None:
        b.protected += delta
        if b.protected == (1 if delta > 0 else 0):
            self._protection_changed(b, 1 if delta > 0 else -1)
            self._policy.set_protected(b.id, delta > 0, b.reads)

    # ------------------------------------------------------------------ read internals
    def _account_read(self, b: Block, t: int, space: Space) -> None:
        for c in (self._c, space.counters):  # a read counts for the namespace that read it
            tc = c.tiers[t]
            tc.hits += 1
            for faster in c.tiers[:t]:
                faster.misses += 1
            tc.bytes_read += b.nbytes
        b.reads += 1
        self._policy.accessed(t, b.id, b.nbytes, b.reads)

    def _read_pinned(self, jobs: list[tuple[int, Block, np.ndarray]], space: Space) -> None:
        """Copy pinned blocks out of their tiers (no lock), then account, promote and unpin."""
        error: BaseException | None = None
        done: list[tuple[Block, int, np.ndarray]] = []
        for _, b, out in jobs:
            staged = np.empty(out.shape, out.dtype) if needs_staging(out) else out
            t = -1
            try:
                while True:
                    with self._lock:
                        if not b.where:
                            raise IntegrityError(f"get: every copy of block {block_name(b.id)[:16]} failed "
                                                 f"its digest check; put the value again")
                        t = fastest(b.where)
                    try:
                        self._tiers[t].read_into(b.id, byte_view(staged))
                        break
                    except IntegrityError:
                        if staged is out:
                            np.asarray(byte_view(out)).fill(0)  # scrub: no bad byte stays in the caller's buffer
                        with self._lock:
                            self._bad_copy(b, t)  # then retry from another copy, if one is left
                if staged is not out:
                    np.copyto(out, staged)
                done.append((b, t, staged))
            except BaseException as e:  # keep going: every pinned block must be unpinned below
                error = error or e
        with self._lock:
            for b, t, data in done:
                self._account_read(b, t, space)
                if t != 0:
                    b.lower_reads += 1
            for _, b, _ in jobs:
                self._unpin(b)
            if error is None:
                for (_, _, out), (b, t, data) in zip(jobs, done):
                    if (self._policy.should_promote(b.lower_reads) and b.ready and self._blocks.get(b.id) is b
                            and not b.where & ((1 << t) - 1)):
                        self._queue_promotion(b, data, owned=data is not out)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ persistence
    def _durable_copy(self, t: int) -> bool:
        return self.config.persist and t == self._disk

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")


