"""The single-node tiered store: the one place that moves data between tiers.

Structure: keys map to :class:`~cascade_kv.blocks.Entry` (block id, dtype, shape, prefix flag); block ids
map to :class:`~cascade_kv.blocks.Block` (size, the keys that refer to it, which tiers hold a copy).
Tiers only store bytes; the policy only names victims. One lock guards all metadata; bulk copies,
hashing and file I/O run outside it on blocks that are *pinned* (a pinned block's copies are never
freed or reused, so a reader outside the lock can never see another block's bytes). Small copies (up
to 64 KiB a block) are done under the lock instead, a batch's in one hold of it: releasing and
retaking it would cost more than the copy.

Batch first: ``get_many``/``put_many`` are the real paths and the single calls wrappers of them.

This module is the public API only: it checks what it must and delegates to the part that does the
job, each of which it builds and wires (composition; they share :class:`~cascade_kv.context.StoreContext`:
the tiers, the key and block tables, the lock, the totals and the namespaces):

* :mod:`.puts`: put (hash, plan with a dry run, place, journal, commit or abandon).
* :mod:`.reads`: get, and the pinned reads the daemon's store shares.
* :mod:`.keys`: the key table: entries, delete, protect and unprotect.
* :mod:`.placement`: allocation with eviction, copies recorded, bring to memory, demotion, drops, bad copies.
* :mod:`.promoter`: promotion of blocks read often from below, by a background thread.
* :mod:`.persistence`: ``persist=True``: the journal, and the open that replays it.
* :mod:`.dryrun`: placement replayed on what-if copies of the tiers' room.

What each namespace holds (keys, blocks, bytes, protected blocks, copies per tier) is counted where it
changes, so ``stats()`` costs O(tiers); ``_walk_stats`` recounts it from the tables, for tests.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .arrays import check_key, key_list
from .config import CascadeConfig
from .context import StoreContext
from .errors import ConfigError, InvalidArgument
from .hashing import Hasher
from .ids import Key
from .info import KeyInfo
from .keys import KeyTable
from .namespace import Namespace, Space, check_name, check_quota, user_key
from .persistence import Persistence, RecoveryReport
from .placement import Placement
from .promoter import Promoter
from .puts import Puts
from .reads import Reads
from .stats import Contents, Counters, StoreStats, TierStats
from .tiers import DiskTier, HostTier, Tier


class Store:
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
        # set last in __init__: close() and __del__ of a store that did not finish opening must not write
        # (compacting the journal from its empty key table once erased a cache the open merely failed on)
        self._opened = False
        self.recovery: RecoveryReport | None = None
        """What opening the persistent directory found (damage skipped, keys lost, files quarantined);
        ``None`` for a store without ``persist``."""
        hasher = Hasher(cfg.hash_algorithm)
        tiers = self._make_tiers(cfg, hasher)
        ctx: StoreContext | None = None
        persistence: Persistence | None = None
        try:
            ctx = self._ctx = StoreContext(cfg, hasher, tiers)
            self._default: Space = ctx.default  # the namespace of the store's own API
            persistence = self._persistence = Persistence(ctx)
            placement = self._placement = Placement(ctx)
            promoter = self._promoter = Promoter(ctx, placement)
            table = self._table = KeyTable(ctx, placement, promoter, persistence)
            self._puts = Puts(ctx, table, placement, promoter, persistence)
            self._reads = Reads(ctx, table, placement, promoter)
            if cfg.persist:
                self.recovery = persistence.open(Path(cfg.disk_path), table, placement)  # type: ignore[arg-type]
        except BaseException:
            # releases memory, descriptors and the directory's lock; writes nothing
            if ctx is not None:
                ctx.closed = True
            if persistence is not None:
                persistence.close_journal(compact=False)
            for t in tiers:
                t.close()
            if persistence is not None:
                persistence.release_dir_lock()
            raise
        self.open_seconds = time.perf_counter() - t0
        """Seconds to open: arena allocation and touch, journal replay, reloading protected blocks."""
        self._opened = True

    def _make_tiers(self, cfg: CascadeConfig, hasher: Hasher) -> list[Tier]:
        """The tiers, fastest first. The store's logic sees only their order and traits, so a subclass
        adds a GPU arena before the host tier, or peers' memory after it, by overriding this alone."""
        tiers: list[Tier] = [self._make_host_tier(cfg.host_capacity)]
        if cfg.disk_path is not None:
            try:
                tiers.append(DiskTier(cfg.disk_path, hasher, capacity=cfg.disk_capacity,
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
        self._puts.put_many(self._default, [key], [array], is_prefix)

    def put_many(self, keys: Sequence[Key], arrays: Sequence[object], *,
                 is_prefix: bool | Sequence[bool] = False) -> None:
        """Store many arrays at once; all or nothing. A key given twice takes its last array."""
        self._puts.put_many(self._default, keys, arrays, is_prefix)

    def _put_many(self, space: Space, keys: Sequence[Key], arrays: Sequence[object],
                  is_prefix: bool | Sequence[bool]) -> None:
        self._puts.put_many(space, keys, arrays, is_prefix)

    def delete(self, key: Key) -> None:
        """Remove ``key``; its block is freed when no other key refers to it."""
        self._table.delete(self._default, [key])

    def delete_many(self, keys: Iterable[Key]) -> None:
        """Remove every key (all must exist: otherwise nothing is removed)."""
        self._table.delete(self._default, keys)

    def _delete_many(self, space: Space, keys: Iterable[Key]) -> None:
        self._table.delete(space, keys)

    def unprotect(self, key: Key) -> None:
        """Release ``key``'s protection: its block may now be demoted like any other."""
        self._table.set_prefix(key, False, self._default)

    def protect(self, key: Key) -> None:
        """Protect ``key`` as if it had been put with ``is_prefix=True`` (brings it into memory)."""
        self._table.set_prefix(key, True, self._default)

    def _set_prefix(self, key: Key, prefix: bool, space: Space) -> None:
        self._table.set_prefix(key, prefix, space)

    def demote(self, keys: Iterable[Key]) -> None:
        """Move the blocks of ``keys`` out of memory into the disk tier (cold starts, freeing memory ahead of a
        known burst). Protected keys raise :class:`InvalidArgument` (a ``ValueError``) and nothing moves; so does a
        demotion the disk tier cannot take (:class:`CapacityError`); without a disk tier, ConfigError."""
        keys = list(dict.fromkeys(key_list(keys, "demote")))
        ctx, placement = self._ctx, self._placement
        with ctx.write_order:
            with ctx.lock:
                ctx.check_open()
                disk = ctx.disk
                if disk is None:
                    raise ConfigError("demote: the store has no disk tier (set disk_path)")
                self._promoter.settle()  # a queued promotion must not bring a block back after this demotion
                blocks = {e.block_id: ctx.blocks[e.block_id] for e in self._table.entries(keys)}
                for k in keys:
                    if ctx.blocks[ctx.keys[k].block_id].protected and self.config.semantic_eviction:
                        raise InvalidArgument(f"demote: the block of {k!r} is protected (is_prefix); "
                                              f"unprotect it first")
                with self._promoter.placing():
                    placement.precheck_demote(blocks, keys, disk)
                    for b in blocks.values():
                        placement.demote_block(b, disk)

    # ------------------------------------------------------------------ public API: reads
    def get(self, key: Key, out: np.ndarray | None = None) -> np.ndarray:
        """Copy ``key``'s value into ``out`` (allocated when ``None``) and return it."""
        return self._reads.get_many(self._default, [key], None if out is None else [out])[0]

    def get_many(self, keys: Sequence[Key], outs: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Read many keys; every key and buffer is checked before anything is copied."""
        return self._reads.get_many(self._default, keys, outs)

    def _get_many(self, space: Space, keys: Sequence[Key],
                  outs: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
        return self._reads.get_many(space, keys, outs)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored (``False`` for anything that is not a key, as a dict answers)."""
        return self._contains(self._default, key)

    def contains(self, key: Key) -> bool:
        """Like ``in``, but a key that is not str or bytes raises :class:`InvalidArgumentType`."""
        return self._contains(self._default, key, strict=True)

    def _contains(self, space: Space, key: object, strict: bool = False) -> bool:
        if strict:
            check_key(key)
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            return isinstance(key, (str, bytes)) and space.internal(key) in ctx.keys

    def lookup(self, keys: Sequence[Key]) -> int:
        """How many of ``keys``, from the first, are stored: the index of the first missing one (``len(keys)``
        if none is), e.g. the cached blocks of a prompt's :func:`~cascade_kv.tokens.prefix_keys`. A key whose
        block was lost (every copy failed its digest check) counts as missing. A question, not a read: no
        get, hit or miss is counted and no eviction order changes."""
        return self._lookup(self._default, keys)

    def _lookup(self, space: Space, keys: Sequence[Key]) -> int:
        keys = key_list(keys, "lookup")
        ctx = self._ctx
        with ctx.lock:  # one lock for the batch: a per-key call would take it once per block of the prompt
            ctx.check_open()
            table, blocks = ctx.keys, ctx.blocks
            for i, k in enumerate(keys):
                e = table.get(space.internal(k))
                # not ready with keys: a lost block being written again by a put, not readable yet
                if e is None or blocks[e.block_id].lost or not blocks[e.block_id].ready:
                    return i
            return len(keys)

    def __len__(self) -> int:
        """Keys of the default namespace (the store's own; a namespace's are counted by its view)."""
        return self._len(self._default)

    def _len(self, space: Space) -> int:
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            if not ctx.spaces:
                return len(ctx.keys)
            return sum(1 for k in ctx.keys if space.owns(k))  # one table for every namespace: a scan

    def keys(self) -> list[Key]:
        """Keys of the default namespace."""
        return self._keys_of(self._default)

    def _keys_of(self, space: Space) -> list[Key]:
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            return [user_key(k) for k in ctx.keys if space.owns(k)]

    def namespace(self, name: str, protected_quota: int | str | None = None) -> Namespace:
        """A view of this store that sees only the keys put through it (see :mod:`cascade_kv.namespace`): its own
        dedup, counters and ``protected_quota`` (bytes of protected blocks at most; ``"64MiB"`` accepted) over
        the same tiers and capacity. The same name gives views over the same keys; a quota, once set, is fixed
        (another one raises :class:`InvalidArgument`; ``None`` leaves it)."""
        name = check_name(name)
        quota = check_quota(protected_quota)
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            space = ctx.space_named(name)
            space.set_quota(quota)
            return Namespace(self, space)

    def info(self, key: Key) -> KeyInfo:
        """Where ``key`` lives and what it holds."""
        return self._info(self._default, key)

    def _info(self, space: Space, key: Key) -> KeyInfo:
        check_key(key)
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            self._promoter.settle()
            e = self._table.entries([space.internal(key)])[0]
            b = ctx.blocks[e.block_id]
            return KeyInfo(e.dtype, e.shape, b.nbytes, e.prefix, b.id[:32].hex(),
                           tuple(t.traits.name for i, t in enumerate(ctx.tiers) if b.where >> i & 1),
                           len(b.keys))

    def settle(self) -> None:
        """Wait until the promotions queued by earlier reads are done. Reads never need this (a block being
        promoted is read from where it is); benchmarks call it for repeatable placement between phases."""
        with self._ctx.lock:
            self._ctx.check_open()
            self._promoter.settle()

    # ------------------------------------------------------------------ observability & lifecycle
    def stats(self, all_namespaces: bool = False) -> StoreStats:
        """A consistent snapshot of the counters (after every promotion queued by earlier reads): the default
        namespace's, or with ``all_namespaces`` the whole store's (the operator's view). Tiers' ``used_bytes``
        and ``capacity_bytes`` are the shared tiers' in both."""
        return self._stats(None if all_namespaces else self._default)

    def _stats(self, space: Space | None, walk: bool = False) -> StoreStats:
        """``space``'s stats; ``None``: every namespace's. O(tiers): the contents are counted as they change
        (``walk``: recounted from every key and block instead, the checker tests hold the counts to)."""
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            self._promoter.settle()
            c = ctx.counters if space is None else space.counters
            return self._snapshot(c, self._walk_contents(space) if walk else c.contents)

    def _snapshot(self, c: Counters, h: Contents) -> StoreStats:
        """The stats of counters ``c`` and contents ``h`` (lock held)."""
        tiers = tuple(TierStats(t.traits.name, tc.hits, tc.misses, tc.bytes_read, tc.bytes_written, tc.evictions,
                                n, t.used, t.capacity) for t, tc, n in zip(self._ctx.tiers, c.tiers, h.tier_blocks))
        return StoreStats(
            tiers=tiers, keys=h.keys, blocks=h.blocks, logical_bytes=h.logical_bytes, unique_bytes=h.unique_bytes,
            protected_blocks=h.protected_blocks, protected_in_memory=h.protected_in_memory,
            puts=c.puts, gets=c.gets, misses=c.misses, deletes=c.deletes, dedup_hits=c.dedup_hits,
            dedup_bytes_saved=c.dedup_bytes_saved, demotions=c.demotions, promotions=c.promotions,
            drops=c.drops, dropped_bytes=c.dropped_bytes, integrity_errors=c.integrity_errors,
            quarantined=c.quarantined, open_seconds=self.open_seconds)

    def _walk_stats(self, space: Space | None) -> StoreStats:
        """:meth:`_stats` recounted from every key and block: the checker the kept counts are tested against."""
        return self._stats(space, walk=True)

    def _walk_contents(self, space: Space | None) -> Contents:
        """What ``space`` (``None``: every namespace) holds, counted by walking the tables (lock held)."""
        ctx = self._ctx
        default = ctx.default
        blocks = [b for b in ctx.blocks.values()
                  if space is None or (b.space if b.space is not None else default) is space]
        entries = [e for k, e in ctx.keys.items() if space is None or space.owns(k)]
        protected = [b for b in blocks if b.protected]
        return Contents(
            keys=len(entries), logical_bytes=sum(ctx.blocks[e.block_id].nbytes for e in entries),
            blocks=sum(1 for b in blocks if b.keys), unique_bytes=sum(b.nbytes for b in blocks if b.keys),
            protected_blocks=len(protected),
            protected_in_memory=sum(1 for b in protected if b.where & ctx.memory_mask),
            tier_blocks=[sum(1 for b in blocks if b.where >> i & 1) for i in range(len(ctx.tiers))])

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The tier objects, fastest first. Still answers after :meth:`close` (closed tiers: their paths, not
        their data), unlike every other call, so that a test or a tool can find a closed store's files."""
        ctx = self._ctx
        with ctx.lock:
            if not ctx.closed:
                self._promoter.settle()  # what the tiers hold is what a caller would see had the reads promoted
        return tuple(ctx.tiers)

    def close(self) -> None:
        """Release memory and files. A non-persistent store removes the block files it wrote."""
        ctx = self._ctx
        with ctx.lock:
            if ctx.closed:
                return
            ctx.closed = True
            ctx.cond.notify_all()
        self._promoter.join()  # it drops the queue and returns once the promotion in hand (if any) is done
        if ctx.disk is not None and not self.config.persist:
            disk = ctx.tiers[ctx.disk]
            for bid in disk.block_ids():
                disk.free(bid)
        self._persistence.close_journal(compact=self._opened)  # only a store that finished opening knows every key
        for t in ctx.tiers:
            t.close()
        self._persistence.release_dir_lock()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_opened", False) and not self._ctx.closed:  # a half-built store released all in __init__
            with contextlib.suppress(Exception):
                self.close()


__all__ = ["Store"]
