"""The put path: hash, plan, place, journal, commit (or abandon).

Life of a put: hash (no lock) -> plan under the lock (dedup hits are settled here; new blocks are
registered *pending* so a concurrent put of the same bytes waits for this one instead of storing a
second copy; a dry run refuses a batch that cannot fit before anything moves) -> place the new blocks
(allocate them in one hold of the lock, evicting the policy's victims down a tier; copy small ones
under it, large ones outside it) -> journal (persist only) -> commit the keys under the lock. A put
that fails after planning is abandoned: what its new blocks placed is freed and every pin dropped.

Batch first: what costs per block in Python is kept to the lookups, the copy and the policy's
bookkeeping; checks, counters and locking are per batch (a 4 KiB put's copy takes ~1 us).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np

from . import catalog
from .arrays import byte_view, put_items
from .blocks import Block, Entry, Plan
from .context import SMALL_COPY, WAIT_SLICE, StoreContext
from .dryrun import DryRun
from .errors import CapacityError
from .ids import BlockId, Digest, Key, StoreKey
from .keys import KeyTable
from .namespace import Space
from .persistence import Persistence
from .placement import Placement
from .promoter import Promoter

Items = list[tuple[StoreKey, np.ndarray, bool]]
"""A put's values: (key, array, is_prefix), keys already in the store's form (namespaced)."""


class Puts:
    """Stores batches of values: every key of a batch or none."""

    def __init__(self, ctx: StoreContext, table: KeyTable, placement: Placement, promoter: Promoter,
                 persistence: Persistence) -> None:
        self._ctx = ctx
        self._table = table
        self._placement = placement
        self._promoter = promoter
        self._persistence = persistence
        self._serial = itertools.count(int(time.time_ns()))  # dedup off: ids unique across reopenings

    # ------------------------------------------------------------------ block ids
    def block_ids(self, views: list[memoryview], space: Space) -> list[BlockId]:
        """Dedup on: each value's digest, followed in a named namespace by its tag (so equal bytes in two
        namespaces are two blocks); dedup off: the digest and a serial, never shared whatever the namespace."""
        digest = self._ctx.hasher.digest
        if self._ctx.config.dedup_enabled:
            tag = space.tag
            return [BlockId(digest(v) + tag) for v in views]
        return [BlockId(digest(v) + next(self._serial).to_bytes(8, "big")) for v in views]

    def block_id(self, digest: Digest, space: Space) -> BlockId:
        """:meth:`block_ids` of a value hashed elsewhere (the daemon's clients hash their own)."""
        if self._ctx.config.dedup_enabled:
            return BlockId(digest + space.tag)
        return BlockId(digest + next(self._serial).to_bytes(8, "big"))

    # ------------------------------------------------------------------ the path
    def put_many(self, space: Space, keys: Sequence[Key], arrays: Sequence[object],
                 is_prefix: bool | Sequence[bool]) -> None:
        """Check the values, hash them (outside every lock), then :meth:`put`."""
        items = put_items(keys, arrays, is_prefix)
        if space.name is not None:
            items = [(space.internal(k), a, p) for k, a, p in items]
        self._persistence.refuse_unpersistable(items)
        views = [byte_view(a) for _, a, _ in items]
        self.put(space, items, self.block_ids(views, space), views)

    def put(self, space: Space, items: Items, ids: list[BlockId], views: list[memoryview] | None = None,
            check: Callable[[Items, list[BlockId]], None] | None = None) -> None:
        """A put whose values are checked and hashed (``ids``; ``views``: their bytes, when the caller made
        them to hash): plan, place, journal, commit. ``check``: called under the lock before planning, in
        the same hold (the daemon refuses there a described value that is not a clean dedup hit)."""
        ctx = self._ctx
        with ctx.write_order:
            with ctx.lock:
                ctx.check_open()
                if check is not None:
                    check(items, ids)
                plan = self._plan(items, ids, space)
            try:
                self._place_all(plan, items, ids, views)
                persistence = self._persistence
                if persistence.journal is not None:  # records cost ~5 us each: build them only to write them
                    persistence.append([catalog.put_record(catalog.KeyRecord(k, bid, a.nbytes, a.dtype, a.shape, p))
                                        for (k, a, p), bid in zip(items, ids)])
            except BaseException:
                with ctx.lock:
                    self._abandon(plan)
                raise
            with ctx.lock:
                self._commit(items, ids, plan, space)

    # ------------------------------------------------------------------ planning (lock held)
    def _plan(self, items: Items, ids: list[BlockId], space: Space) -> Plan:
        """Wait out other threads' pending copies of these bytes, then pin every block of the batch,
        registering those this put must write as pending."""
        ctx = self._ctx
        table = ctx.blocks
        while True:  # wait before registering anything: two batches can never wait on each other
            if all(b.ready for b in map(table.get, ids) if b is not None):
                break
            ctx.cond.wait(WAIT_SLICE)
            ctx.check_open()
        self._check_quota(space, items, ids)
        plan = Plan()
        for (key, arr, prefix), bid in zip(items, ids):
            if bid in plan.held:
                continue
            b = table.get(bid)
            if b is None:
                b = table[bid] = Block(bid, arr.nbytes, space=space)  # not ready: pending until commit
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

    def _check_quota(self, space: Space, items: Items, ids: list[BlockId]) -> None:
        """CapacityError, before anything changes, if the batch would leave ``space`` with more protected bytes
        than its quota: the batch's key changes are replayed on the blocks' prefix counts (an overwritten prefix
        key releases its block, a block protected twice counts once)."""
        if space.protected_quota is None or not any(p for _, _, p in items):
            return
        blocks, keys = self._ctx.blocks, self._ctx.keys
        counts: dict[BlockId, int] = {}
        sizes: dict[BlockId, int] = {}

        def change(bid: BlockId, nbytes: int, delta: int) -> None:
            if bid not in counts:
                b = blocks.get(bid)
                counts[bid] = b.protected if b is not None else 0
                sizes[bid] = nbytes
            counts[bid] += delta

        for (key, arr, prefix), bid in zip(items, ids):
            old = keys.get(key)
            if old is not None and old.prefix:
                change(old.block_id, blocks[old.block_id].nbytes, -1)
            change(bid, arr.nbytes, +1 if prefix else 0)
        before = {bid: (b.protected if (b := blocks.get(bid)) is not None else 0) for bid in counts}
        after = space.protected_bytes + sum(sizes[bid] * ((counts[bid] > 0) - (before[bid] > 0)) for bid in counts)
        if after > space.protected_quota:
            raise CapacityError(f"namespace {space.name!r}: protected_quota is {space.protected_quota} B, "
                                f"{space.protected_bytes} B are protected and this call needs "
                                f"{after - space.protected_bytes} B more; nothing was changed")

    def _needs_memory(self, items: Items, ids: list[BlockId]) -> set[BlockId]:
        """The blocks of a put batch that must live in memory (protected, with semantic eviction)."""
        if not self._ctx.config.semantic_eviction:
            return set()
        return {bid for (_, _, p), bid in zip(items, ids) if p}

    def _allowed_tiers(self, prefix: bool) -> list[int]:
        ctx = self._ctx
        return list(ctx.memory) if ctx.must_be_in_memory(prefix) else list(range(len(ctx.tiers)))

    def _precheck_capacity(self, items: Items, ids: list[BlockId], plan: Plan) -> None:
        """Refuse, before anything moves, a put that cannot fit whatever is evicted, and record in ``plan``
        the tier each new block goes to: a dry run of :meth:`_place_all`'s steps in the same order
        (evicting first and failing then would have demoted or dropped blocks for nothing)."""
        ctx = self._ctx
        tiers = ctx.tiers
        largest: dict[bool, tuple[Key, np.ndarray, bool]] = {}  # per kind: a block fits where a larger one does
        for item in items:
            other = largest.get(item[2])
            if other is None or item[1].nbytes > other[1].nbytes:
                largest[item[2]] = item
        for key, arr, prefix in largest.values():
            allowed = self._allowed_tiers(prefix)
            if not any(tiers[t].fits(arr.nbytes) for t in allowed):
                where = "memory tier" if ctx.must_be_in_memory(prefix) else "tier"
                biggest = max((tiers[t].capacity or 0) for t in allowed)
                raise CapacityError(f"put({key!r}): block of {arr.nbytes} B is larger than every {where} "
                                    f"(largest holds {biggest} B)")
        needs_memory = self._needs_memory(items, ids)
        rising: list[Block] = []  # dedup hits to bring into memory
        if needs_memory:
            fresh = {b.id for b in plan.fresh}
            rising = [ctx.blocks[bid] for bid in dict.fromkeys(ids) if bid in needs_memory and bid not in fresh
                      and not ctx.blocks[bid].where & ctx.memory_mask]
        rising_ids = {b.id for b in rising}
        if not plan.fresh and not rising:
            return  # every block is stored already, where it may stay: nothing to place
        self._promoter.enter_placement()
        plan.placing = True
        if not rising and self._fits_without_eviction(plan, needs_memory):
            return  # the common case: room now, nothing to evict (a dry run cost ~60 us per small put)
        run = DryRun(ctx, plan.held)
        key_of = {bid: key for (key, _, _), bid in zip(items, ids)}
        placed = 0
        no_room = self._placement.no_room
        durable = ctx.durable
        for b in rising + sorted(plan.fresh, key=lambda b: b.id not in needs_memory):
            allowed = ctx.memory if b.id in rising_ids else self._allowed_tiers(b.id in needs_memory)
            t = run.allocate(b, allowed)
            if t is None:
                raise no_room(f"put({key_of[b.id]!r})", b, allowed, placed, len(rising) + len(plan.fresh))
            run.add(b, t)
            plan.tiers[b.id] = t
            if durable is not None and t != durable and b.id not in rising_ids:
                if not run.make_room(durable, b):
                    raise no_room(f"put({key_of[b.id]!r}) (a durable copy)", b, [durable], placed,
                                  len(rising) + len(plan.fresh))
                run.add(b, durable)
            placed += 1

    def _fits_without_eviction(self, plan: Plan, needs_memory: set[BlockId]) -> bool:
        """Whether every new block of ``plan`` fits, now, in the tier a dry run would pick first (the fastest
        allowed tier it can ever fit in), with its durable copy (persist), evicting nothing: then that is
        where each goes (recorded in ``plan.tiers``) and nothing can be demoted or dropped for it."""
        tiers = self._ctx.tiers
        by_tier: dict[int, list[int]] = {}
        chosen: dict[BlockId, int] = {}
        first: dict[tuple[bool, int], int | None] = {}  # (must be in memory, size) -> the tier: a batch has few
        durable = self._ctx.durable
        for b in plan.fresh:
            kind = (b.id in needs_memory, b.nbytes) if needs_memory else (False, b.nbytes)
            t = first.get(kind, -1)
            if t == -1:
                t = first[kind] = next((t for t in self._allowed_tiers(kind[0]) if tiers[t].fits(b.nbytes)), None)
            if t is None:
                return False
            chosen[b.id] = t
            sizes = by_tier.get(t)
            if sizes is None:
                sizes = by_tier[t] = []
            sizes.append(b.nbytes)
            if durable is not None and t != durable:
                by_tier.setdefault(durable, []).append(b.nbytes)
        if not all(tiers[t].fits_now(sizes) for t, sizes in by_tier.items()):
            return False
        plan.tiers.update(chosen)
        return True

    # ------------------------------------------------------------------ placing (lock taken as needed)
    def _place_all(self, plan: Plan, items: Items, ids: list[BlockId], views: list[memoryview] | None = None) -> None:
        """Write every new block into its tier (and, with persist, durably to disk)."""
        ctx, placement = self._ctx, self._placement
        # the values' bytes by block; a value without bytes (the daemon's described dedup hits) is never written
        src = dict(zip(ids, views)) if views is not None else {
            bid: byte_view(arr) for (_, arr, _), bid in zip(items, ids) if isinstance(arr, np.ndarray)}
        needs_memory = self._needs_memory(items, ids)
        # dedup hits on blocks that must now be protected but sit on disk only: bring them up first, from
        # the caller's bytes (a bad disk copy must not fail a put that carries good ones)
        # In the order of _precheck_capacity's dry run, into the tiers it chose (only if another thread took
        # the room meanwhile does allocate fall back to the slower tiers the block may live in).
        fresh = {b.id for b in plan.fresh}
        if needs_memory:
            with ctx.lock:
                for bid in dict.fromkeys(ids):
                    b = ctx.blocks[bid]
                    if bid in needs_memory and bid not in fresh and not b.where & ctx.memory_mask:
                        placement.bring_to_memory(b, src[bid], self._chosen(plan, b, ctx.memory))
        # blocks that must be in memory before the others: a block of this batch placed in memory stays
        # pinned until the commit, so it could not make room for them
        order = sorted(plan.fresh, key=lambda b: b.id not in needs_memory) if needs_memory else plan.fresh
        placed = self._write_fresh(plan, order, src, needs_memory)
        disk = ctx.durable
        if disk is not None:
            for b, t in placed:
                if t == disk:
                    continue
                with ctx.lock:
                    if not placement.make_room(disk, b):
                        raise CapacityError(f"put: disk tier cannot hold {b.nbytes} B "
                                            f"({ctx.tiers[disk].used} B used of {ctx.config.disk_capacity} B)")
                self._write_copy(b, disk, src[b.id])
        # dedup hits whose only copies are unchecked (files adopted at reopen or changed since their last
        # check): rewrite them from the caller's bytes, hashed just now, so that an acknowledged put never
        # rests on a copy that may be corrupt. Rare (a stat each), and it heals bad files for free.
        for bid in plan.held.keys() - fresh:
            b = ctx.blocks[bid]
            for t in range(len(ctx.tiers)):
                if b.where >> t & 1 and not ctx.tiers[t].trusted(bid) and not b.where & ~(1 << t):
                    ctx.tiers[t].write(bid, src[bid])

    def _write_fresh(self, plan: Plan, order: list[Block], src: dict[BlockId, memoryview],
                     needs_memory: set[BlockId]) -> list[tuple[Block, int]]:
        """Allocate the put's new blocks, in ``order``, in one hold of the lock (an eviction that copies releases
        it), copy the small ones into a memory tier under it and the others outside it, and record every copy:
        per block, the lock twice and a tier call each for allocating, copying and recording cost more than a
        4 KiB copy. Whatever was allocated and not recorded when something fails is freed here (what was
        recorded, the caller's abandon drops). Returns ``(block, tier)`` for each block, in ``order``."""
        # A new block has no copy before this put (a healed one lost them all): its bit in ``where`` is
        # set exactly when its copy here was recorded, which is how a failure finds what to free.
        ctx, placement = self._ctx, self._placement
        tiers = ctx.tiers
        placed: list[tuple[Block, int]] = []
        try:
            with ctx.lock:
                chosen = plan.tiers.get
                for b in order:
                    t = chosen(b.id)
                    if t is None or not tiers[t].allocate(b.id, b.nbytes):  # the room the dry run saw is gone
                        t = placement.allocate(b, self._chosen(plan, b, self._allowed_tiers(b.id in needs_memory)))
                    placed.append((b, t))
                for t in {t for _, t in placed}:
                    if not tiers[t].traits.addressable:
                        continue  # its writes may block (files): never under the lock
                    small = [b for b, u in placed if u == t and b.nbytes <= SMALL_COPY]
                    tiers[t].write_many([b.id for b in small], [src[b.id] for b in small])
                    placement.add_copies(small, t)
            for b, t in placed:  # the large ones, outside the lock: b is pinned, its slot stays its own
                if not b.where >> t & 1:
                    tiers[t].write(b.id, src[b.id])
                    with ctx.lock:
                        placement.add_copy(b, t, use=True)
        except BaseException:
            with ctx.lock:
                for b, t in placed:
                    if not b.where >> t & 1:
                        tiers[t].free(b.id)
            raise
        return placed

    @staticmethod
    def _chosen(plan: Plan, b: Block, allowed: list[int]) -> list[int]:
        """The dry run's tier for ``b`` first, then the slower ones it may live in."""
        t = plan.tiers.get(b.id)
        return allowed if t is None else [t] + [u for u in allowed if u > t]

    def _write_copy(self, b: Block, t: int, data: memoryview) -> None:
        """Copy ``data`` into the slot allocated for ``b`` in tier ``t`` (outside the lock; b is pinned)."""
        ctx = self._ctx
        try:
            ctx.tiers[t].write(b.id, data)
        except BaseException:
            with ctx.lock:
                ctx.tiers[t].free(b.id)
            raise
        with ctx.lock:
            self._placement.add_copy(b, t, use=True)

    # ------------------------------------------------------------------ the end (lock held)
    def _commit(self, items: Items, ids: list[BlockId], plan: Plan, space: Space) -> None:
        ctx = self._ctx
        protect_block, detach = self._table.protect_block, self._table.detach
        written = {b.id for b in plan.fresh}
        table, blocks = ctx.keys, ctx.blocks
        accessed = ctx.policy.accessed
        ntiers = len(ctx.tiers)
        logical = new_blocks = unique = hits = saved = 0  # counted once for the batch: every block is space's
        for (key, arr, prefix), bid in zip(items, ids):
            b = blocks[bid]
            old = table.get(key)
            table[key] = Entry(bid, arr.dtype, arr.shape, prefix)
            if not b.keys:  # KeyTable.attach, with the contents counted for the batch below
                new_blocks += 1
                unique += b.nbytes
            b.keys.add(key)
            logical += b.nbytes
            if prefix:
                protect_block(b, +1)
            if old is not None:
                detach(key, old)
            if bid in written:
                written.discard(bid)  # the first put of these bytes stores them; any later one is a hit
                continue
            hits += 1  # only ever a hit on this namespace's own block
            saved += arr.nbytes
            for t in range(ntiers):
                if b.where >> t & 1:  # a use, but not a read: only reads earn the reuse credit
                    accessed(t, bid, b.nbytes, b.reads)
        for c in (ctx.counters, space.counters):
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
        self._placement.unpin_all(plan.held.values())
        self._promoter.leave_placement(plan)

    def _abandon(self, plan: Plan) -> None:
        """Undo a put that failed: free what its new blocks placed, unpin the rest."""
        ntiers = len(self._ctx.tiers)
        for b in plan.fresh:
            for t in range(ntiers):
                if b.where >> t & 1:
                    self._placement.drop_copy(b, t)
            b.ready = True
            b.lost = bool(b.keys)  # a lost block that was being healed stays lost
        self._placement.unpin_all(plan.held.values())
        self._promoter.leave_placement(plan)


__all__ = ["Items", "Puts"]
