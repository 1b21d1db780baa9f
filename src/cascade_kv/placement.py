"""Placement: where a block's copies live and how they move between tiers.

Allocation with eviction (the policy's victims demoted one tier down, or dropped at the last), the
bookkeeping of copies (the one place ``Block.where`` changes, with the counts that follow from it),
bringing a block into memory (protect, reopen, a dedup hit of a prefix), demotion, drops, bad copies
and the release of blocks no key refers to. The background promoter (:mod:`.promoter`) and the put path
(:mod:`.puts`) move copies through these methods.

Every method is called with the store's lock held; those that copy bulk data release it around the
copy, with the block pinned so that no copy of it can be freed or reused meanwhile.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from .blocks import Block, fastest
from .config import format_size
from .context import WAIT_SLICE, StoreContext
from .dryrun import DryRun
from .errors import CapacityError, IntegrityError
from .ids import BlockId, Key, block_name

log = logging.getLogger(__name__)


class Placement:
    """Moves copies between the tiers of ``ctx`` and keeps the counts that follow them."""

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        self.protected_bytes = [0] * len(ctx.tiers)
        """Per tier: bytes of its copies of protected blocks (for CapacityError's message)."""
        self._demoting = [0] * len(ctx.tiers)  # demotions in flight out of each tier (they will free room)

    # ------------------------------------------------------------------ allocation with eviction
    def allocate(self, b: Block, allowed: list[int]) -> int:
        """Allocate ``b`` in the fastest allowed tier that has or can make room; may release the lock."""
        tiers = self._ctx.tiers
        for t in allowed:
            if tiers[t].fits(b.nbytes) and self.make_room(t, b):
                return t
        names = "/".join(tiers[t].traits.name for t in allowed)
        raise CapacityError(f"put: no room for a block of {format_size(b.nbytes)} ({b.nbytes} B) in the {names} "
                            f"tier(s): " + ", ".join(self.room_report(t) for t in allowed))

    def room_report(self, t: int) -> str:
        tier = self._ctx.tiers[t]
        return (f"{tier.traits.name}: {tier.used} B used of {tier.capacity} B, "
                f"{self.protected_bytes[t]} B protected")

    def no_room(self, what: str, b: Block, tiers: list[int], placed: int, total: int) -> CapacityError:
        """The error of a dry run that found no room for ``b`` (``placed`` of the call's ``total`` blocks before it)."""
        names = "/".join(self._ctx.tiers[t].traits.name for t in tiers)
        return CapacityError(
            f"{what}: no room for a block of {format_size(b.nbytes)} ({b.nbytes} B) in the {names} tier(s) "
            f"even after evicting every victim, with {placed} of the call's {total} blocks placed before it; "
            f"nothing was moved. " + ", ".join(self.room_report(t) for t in range(len(self._ctx.tiers))))

    def make_room(self, t: int, b: Block, may_drop: bool = True) -> bool:
        """Allocate ``b`` in tier ``t``, evicting the policy's victims down a tier until it fits; without
        ``may_drop``, give up rather than drop a block (a promotion must never cost a key)."""
        tier = self._ctx.tiers[t]
        while not tier.allocate(b.id, b.nbytes):
            victim = self._pick_victim(t)
            if victim is None:
                if self._demoting[t]:
                    self._ctx.cond.wait(WAIT_SLICE)  # another thread's demotion will free room
                    continue
                return False
            if not self._evict(victim, t, may_drop):
                return False
        return True

    def _pick_victim(self, t: int) -> Block | None:
        blocks = self._ctx.blocks
        for bid in self._ctx.policy.victims(t):
            v = blocks[bid]
            if v.pins == 0 and not v.moving and v.ready:
                return v
        return None

    def _evict(self, v: Block, t: int, may_drop: bool = True) -> bool:
        """Remove ``v``'s copy from tier ``t``: free it if a lower copy exists, else demote it one tier
        (or drop the block when ``t`` is the last tier or the lower tier cannot take it). Without
        ``may_drop``, answer False instead of dropping a block."""
        ctx = self._ctx
        dst = t + 1
        if v.where >> dst:  # a slower copy exists: this one can simply go
            for c in ctx.counts(v):
                c.tiers[t].evictions += 1
            self.drop_copy(v, t)
            return True
        if dst == len(ctx.tiers):
            if v.where & ~(1 << t) and not ctx.durable_copy(t):
                self.drop_copy(v, t)  # a faster copy remains: nothing is lost
            elif not may_drop:
                return False
            else:
                self.drop_block(v)
            for c in ctx.counts(v):
                c.tiers[t].evictions += 1
            return True
        v.moving = True
        try:
            placed = self.make_room(dst, v, may_drop)
        finally:
            v.moving = False
        if not placed:
            if not may_drop:
                return False
            for c in ctx.counts(v):
                c.tiers[t].evictions += 1
            self.drop_block(v)
            return True
        for c in ctx.counts(v):
            c.tiers[t].evictions += 1
        v.moving = True
        v.pins += 1
        self._demoting[t] += 1
        try:
            with ctx.unlocked():
                self.copy_between(v, t, dst)
        except BaseException:
            ctx.tiers[dst].free(v.id)
            raise
        finally:
            v.moving = False
            v.pins -= 1
            self._demoting[t] -= 1
            ctx.cond.notify_all()
        self.add_copy(v, dst)
        for c in ctx.counts(v):
            c.demotions += 1
        if v.pins == 0:
            self.drop_copy(v, t)
        self.maybe_release(v)
        return True

    # ------------------------------------------------------------------ copies moving
    def copy_between(self, b: Block, src: int, dst: int) -> None:
        """Copy a pinned block from tier ``src`` to its allocated slot in ``dst`` (no lock held)."""
        s, d = self._ctx.tiers[src], self._ctx.tiers[dst]
        if s.traits.addressable:
            d.write(b.id, s.view(b.id))
        elif d.traits.addressable:
            s.read_into(b.id, d.view(b.id))
        else:
            buf = np.empty(b.nbytes, dtype=np.uint8)
            s.read_into(b.id, memoryview(buf))
            d.write(b.id, memoryview(buf))

    def copy_up(self, b: Block, src: int, t: int, data: memoryview | None) -> None:
        """Lock held, ``b`` pinned and allocated in tier ``t``: fill that slot (from ``data`` if the caller holds
        the bytes, else from the copy in tier ``src``, the lock released meanwhile), then list the copy and count
        the promotion. A failure frees the slot; a lower copy found bad meanwhile is marked so
        (:meth:`bad_copy`) and the ``IntegrityError`` raised, as a reader would find it."""
        ctx = self._ctx
        try:
            with ctx.unlocked():
                if data is not None:
                    ctx.tiers[t].write(b.id, data)
                else:
                    self.copy_between(b, src, t)
        except IntegrityError:
            ctx.tiers[t].free(b.id)
            self.bad_copy(b, src)
            raise
        except BaseException:
            ctx.tiers[t].free(b.id)
            raise
        self.add_copy(b, t)
        for c in ctx.counts(b):
            c.promotions += 1

    def bring_to_memory(self, b: Block, data: memoryview | None = None, tiers: list[int] | None = None) -> None:
        """Copy a block that lives below memory into a memory tier (protect, reopen, dedup of a prefix).
        ``data``: the block's bytes when the caller holds them (a put), so a bad lower copy cannot fail it;
        ``tiers``: the memory tiers to try, in order (a dry run's choice first)."""
        ctx = self._ctx
        while b.rising:  # another thread is copying it up: a second slot for it would clash
            ctx.cond.wait(WAIT_SLICE)
        if b.where & ctx.memory_mask:
            return
        if not b.where:
            raise IntegrityError(f"every copy of block {block_name(b.id)[:16]} failed its digest check")
        b.rising = True
        try:
            t = self.allocate(b, ctx.memory if tiers is None else tiers)
            src = fastest(b.where)
            b.pins += 1
            try:
                self.copy_up(b, src, t, data)
            finally:
                b.pins -= 1
        finally:
            b.rising = False
            ctx.cond.notify_all()
        self.maybe_release(b)

    def precheck_demote(self, blocks: dict[BlockId, Block], keys: list[Key], disk: int) -> None:
        """Refuse a demotion the disk tier (index ``disk``) cannot take before any block moves (a dry run)."""
        ctx = self._ctx
        run = DryRun(ctx)
        for i, b in enumerate(blocks.values()):
            if not run.where(b) & ctx.memory_mask or b.id in run.dropped:
                continue
            run.held.add(b.id)  # pinned while it moves, as demote_block does
            if not run.where(b) >> disk & 1:
                if not run.make_room(disk, b):
                    key = next(k for k in keys if ctx.keys[k].block_id == b.id)
                    raise self.no_room(f"demote({key!r})", b, [disk], i, len(blocks))
                run.add(b, disk)
            for t in ctx.memory:
                if run.where(b) >> t & 1:
                    run.free_copy(b, t)
            run.held.discard(b.id)

    def demote_block(self, b: Block, disk: int) -> None:
        """Move ``b``'s memory copies to the disk tier (index ``disk``; lock held, released around the copy)."""
        ctx = self._ctx
        # Another demote (of a key sharing the block) or an eviction may be moving it now: wait for that
        # first, else both would allocate it in the disk tier. Waiting unpinned: the mover waits for
        # readers' pins to go before it frees the memory copy, and would wait for ours forever.
        while b.moving or b.rising:
            ctx.cond.wait(WAIT_SLICE)
        if not b.where & ctx.memory_mask or ctx.blocks.get(b.id) is not b:
            return
        b.pins += 1
        b.moving = True
        try:
            if not b.where >> disk & 1:
                if not self.make_room(disk, b):
                    raise CapacityError(f"demote: the disk tier cannot hold {b.nbytes} B more "
                                        f"({self.room_report(disk)})")
                try:
                    src = fastest(b.where)
                    with ctx.unlocked():
                        self.copy_between(b, src, disk)
                except BaseException:
                    ctx.tiers[disk].free(b.id)
                    raise
                self.add_copy(b, disk)
            while b.pins > 1:  # a reader outside the lock holds the memory copy: let it finish
                ctx.cond.wait(WAIT_SLICE)
            for t in ctx.memory:
                if b.where >> t & 1:
                    self.drop_copy(b, t)
            for c in ctx.counts(b):
                c.demotions += 1
        finally:
            b.moving = False
            self.unpin(b)

    # ------------------------------------------------------------------ copies recorded
    def add_copy(self, b: Block, t: int, use: bool = False) -> None:
        """Record a copy in tier ``t``; ``use``: a put wrote it (a demotion or promotion only moves a copy)."""
        ctx = self._ctx
        self._copy_counted(b, t, +1)
        ctx.policy.added(t, b.id, b.nbytes, b.reads, use=use)
        ctx.counters.tiers[t].bytes_written += b.nbytes
        (b.space if b.space is not None else ctx.default).counters.tiers[t].bytes_written += b.nbytes

    def add_copies(self, blocks: list[Block], t: int) -> None:
        """:meth:`add_copy` with ``use``, for a put's blocks written into tier ``t``."""
        ctx = self._ctx
        added = ctx.policy.added
        default = ctx.default
        totals = ctx.counters
        bit = 1 << t
        for b in blocks:
            if b.protected or b.where & bit:
                self._copy_counted(b, t, +1)  # the general case: protected bytes and blocks in memory move too
            else:  # a put's new block, unprotected: of the counts, only its tier's blocks move
                b.where |= bit
                space = b.space if b.space is not None else default
                space.counters.contents.tier_blocks[t] += 1
                totals.contents.tier_blocks[t] += 1
            added(t, b.id, b.nbytes, b.reads)
            (b.space if b.space is not None else default).counters.tiers[t].bytes_written += b.nbytes
        totals.tiers[t].bytes_written += sum(b.nbytes for b in blocks)

    def drop_copy(self, b: Block, t: int) -> None:
        self._ctx.tiers[t].free(b.id)
        self._copy_counted(b, t, -1)
        self._ctx.policy.removed(t, b.id)

    def _copy_counted(self, b: Block, t: int, sign: int) -> None:
        """Set (+1) or clear (-1) ``b``'s copy bit for tier ``t``, and the counts that follow from it: the
        tier's blocks, protected bytes, protected blocks in memory. The one place ``where`` changes."""
        ctx = self._ctx
        was = b.where
        bit = 1 << t
        if sign > 0:
            if was & bit:
                return  # recorded already: counting it twice would drift from the walk
            b.where = was | bit
        else:
            if not was & bit:
                return
            b.where = was & ~bit
        ctx.counters.contents.tier_blocks[t] += sign
        space = b.space if b.space is not None else ctx.default
        space.counters.contents.tier_blocks[t] += sign
        if b.protected:
            self.protected_bytes[t] += sign * b.nbytes
            memory = ctx.memory_mask
            in_memory = bool(b.where & memory) - bool(was & memory)
            ctx.counters.contents.protected_in_memory += in_memory
            space.counters.contents.protected_in_memory += in_memory

    def protection_changed(self, b: Block, sign: int) -> None:
        """``b`` became protected (+1) or unprotected (-1): its copies' protected bytes, its namespace's
        protected bytes (its quota's use) and the protected-block counts follow."""
        ctx = self._ctx
        delta = sign * b.nbytes
        for t in range(len(ctx.tiers)):
            if b.where >> t & 1:
                self.protected_bytes[t] += delta
        (b.space if b.space is not None else ctx.default).protected_bytes += delta
        in_memory = sign if b.where & ctx.memory_mask else 0
        for c in ctx.counts(b):
            c.contents.protected_blocks += sign
            c.contents.protected_in_memory += in_memory

    def bad_copy(self, b: Block, t: int) -> None:
        """A copy failed its check: quarantine it; the block is lost if no other copy remains."""
        ctx = self._ctx
        counts = ctx.counts(b)
        for c in counts:
            c.integrity_errors += 1
        tier = ctx.tiers[t]
        if not (b.where >> t & 1) or not tier.contains(b.id):
            return  # another reader got here first
        quarantine = getattr(tier, "quarantine", None)
        if quarantine is not None:
            dst = quarantine(b.id)
            for c in counts:
                c.quarantined += dst is not None
            log.warning("block %s failed its digest check in the %s tier; moved to %s",
                        block_name(b.id)[:16], tier.traits.name, dst)
        else:
            tier.free(b.id)
        self._copy_counted(b, t, -1)
        ctx.policy.removed(t, b.id)
        if not b.where:
            b.lost = True

    # ------------------------------------------------------------------ blocks going
    def drop_block(self, b: Block) -> None:
        """The last tier is full: the block and every key referring to it go (counted, never silent)."""
        ctx = self._ctx
        log.debug("dropping block %s (%d B, %d keys)", block_name(b.id)[:16], b.nbytes, len(b.keys))
        gone = sum(ctx.keys.pop(k, None) is not None for k in b.keys)
        for c in ctx.counts(b):
            c.drops += 1
            c.dropped_bytes += b.nbytes
            c.contents.keys -= gone
            c.contents.logical_bytes -= gone * b.nbytes
            if b.keys:
                c.contents.blocks -= 1
                c.contents.unique_bytes -= b.nbytes
        b.keys.clear()
        if b.protected:
            self.protection_changed(b, -1)
        b.protected = 0
        ctx.policy.set_protected(b.id, False)
        self.maybe_release(b)

    def maybe_release(self, b: Block) -> None:
        """Free a block no key refers to, once no copy of it is in flight."""
        if b.keys or b.pins or b.moving or not b.ready:
            return
        ctx = self._ctx
        for t in range(len(ctx.tiers)):
            if b.where >> t & 1:
                self.drop_copy(b, t)
        ctx.policy.set_protected(b.id, False)
        if ctx.blocks.get(b.id) is b:
            del ctx.blocks[b.id]

    def unpin_all(self, blocks: Iterable[Block]) -> None:
        """:meth:`unpin` for a batch: waiters are woken once (a notify costs more than the rest of an unpin)."""
        for b in blocks:
            b.pins -= 1
            if b.pins == 0 and not b.keys:  # maybe_release's first test, without the call for a kept block
                self.maybe_release(b)
        self._ctx.cond.notify_all()

    def unpin(self, b: Block) -> None:
        b.pins -= 1
        if b.pins == 0:
            self.maybe_release(b)
        self._ctx.cond.notify_all()  # also at pins 1: demote() waits for the other readers of a block to finish


__all__ = ["Placement"]
