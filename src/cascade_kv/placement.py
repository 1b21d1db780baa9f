"""Placement: allocation with eviction, demotion, promotion, drops and bad copies.

A mixin of :class:`~cascade_kv.store.Store`, kept in its own module because it
is the part that moves copies between tiers, while ``store.py`` is the public
API. Every method here is called with the store's lock held; those that copy
bulk data release it around the copy, with the block pinned so that no copy of
it can be freed or reused meanwhile.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from .arrays import byte_view
from .blocks import Block, Entry, fastest
from .config import format_size
from .errors import CapacityError, IntegrityError, StorageError
from .ids import BlockId, Key, block_name
from .policy import Policy
from .stats import Counters

if TYPE_CHECKING:
    from .namespace import Space
from .tiers import Tier

log = logging.getLogger(__name__)

WAIT_SLICE = 1.0  # seconds between re-checks while waiting on another thread's in-flight block
PROMOTION_QUEUE_BYTES = 64 << 20
"""Bytes of blocks waiting for the background promoter at most (their copies are held meanwhile). A read that
would queue more does not promote (the block earns its promotion again at its next read): doing the promotion
in the reader's thread instead would put the demotion it needs back on the read path."""
PROMOTER_IDLE = 2.0  # seconds without work after which the promoter thread exits (the next promotion starts one)
PROMOTER_QUIET = 0.002  # seconds without reads before the promoter starts (a request's reads come in batches)


class Placement:
    """State shared with the store (set up by ``Store.__init__``)."""

    _tiers: list[Tier]
    _memory: list[int]
    _memory_mask: int
    _keys: dict[Key, Entry]
    _blocks: dict[BlockId, Block]
    _policy: Policy
    _c: Counters  # the store's totals (every namespace)
    _default: Space  # the default namespace (the store's own API)
    _demoting: list[int]
    _protected_bytes: list[int]  # per tier: bytes of its copies of protected blocks (for CapacityError's message)
    _lock: threading.Lock
    _cond: threading.Condition
    _closed: bool
    _promotions: deque[tuple[Block, np.ndarray]]  # read from a lower tier, waiting to be copied up
    _queued_bytes: int  # bytes of the blocks in _promotions
    _reads_in_flight: int  # get_many calls between their lookup and their return
    _last_read: float  # time.monotonic() when the last of them ended
    _hurry: int  # callers waiting for the queue to empty: the promoter stops deferring to reads
    _promoting: int  # promotions the promoter has taken off the queue and not finished
    _promoter: threading.Thread | None
    _placing: int  # calls between their dry run and their last move: the promoter waits (its evictions would
    # move blocks the run counted on)

    @contextlib.contextmanager
    def _unlocked(self) -> Iterator[None]:
        """The body runs without the store's lock (a bulk copy of a pinned block); the lock is held
        again on the way out, error or not, as every caller of these methods expects."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    # ------------------------------------------------------------------ placement (lock held)
    def _enter_placement(self) -> None:
        """Before a dry run: let a promotion in hand finish, and start no other until
        :meth:`_leave_placement` (so the run sees the state its moves will start from)."""
        while self._promoting:
            self._cond.wait(WAIT_SLICE)
        self._placing += 1

    def _leave_placement(self, plan: object = None) -> None:
        if plan is None or getattr(plan, "placing", False):
            self._placing -= 1
            if plan is not None:
                plan.placing = False  # type: ignore[attr-defined]
        self._cond.notify_all()

    @contextlib.contextmanager
    def _placement(self) -> Iterator[None]:
        """A dry run and the moves it planned (protect, demote), with the promoter held off."""
        self._enter_placement()
        try:
            yield
        finally:
            self._leave_placement()

    def _allocate(self, b: Block, allowed: list[int]) -> int:
        """Allocate ``b`` in the fastest allowed tier that has or can make room; may release the lock."""
        for t in allowed:
            if self._tiers[t].fits(b.nbytes) and self._make_room(t, b):
                return t
        names = "/".join(self._tiers[t].traits.name for t in allowed)
        raise CapacityError(f"put: no room for a block of {format_size(b.nbytes)} ({b.nbytes} B) in the {names} "
                            f"tier(s): " + ", ".join(self._room_report(t) for t in allowed))

    def _room_report(self, t: int) -> str:
        tier = self._tiers[t]
        return (f"{tier.traits.name}: {tier.used} B used of {tier.capacity} B, "
                f"{self._protected_bytes[t]} B protected")

    def _make_room(self, t: int, b: Block, may_drop: bool = True) -> bool:
        """Allocate ``b`` in tier ``t``, evicting the policy's victims down a tier until it fits; without
        ``may_drop``, give up rather than drop a block (a promotion must never cost a key)."""
        tier = self._tiers[t]
        while not tier.allocate(b.id, b.nbytes):
            victim = self._pick_victim(t)
            if victim is None:
                if self._demoting[t]:
                    self._cond.wait(WAIT_SLICE)  # another thread's demotion will free room
                    continue
                return False
            if not self._evict(victim, t, may_drop):
                return False
        return True

    def _pick_victim(self, t: int) -> Block | None:
        for bid in self._policy.victims(t):
            v = self._blocks[bid]
            if v.pins == 0 and not v.moving and v.ready:
                return v
        return None

    def _evict(self, v: Block, t: int, may_drop: bool = True) -> bool:
        """Remove ``v``'s copy from tier ``t``: free it if a lower copy exists, else demote it one tier
        (or drop the block when ``t`` is the last tier or the lower tier cannot take it). Without
        ``may_drop``, answer False instead of dropping a block."""
        dst = t + 1
        if v.where >> dst:  # a slower copy exists: this one can simply go
            for c in self._counts(v):
                c.tiers[t].evictions += 1
            self._drop_copy(v, t)
            return True
        if dst == len(self._tiers):
            if v.where & ~(1 << t) and not self._durable_copy(t):
                self._drop_copy(v, t)  # a faster copy remains: nothing is lost
            elif not may_drop:
                return False
            else:
                self._drop_block(v)
            for c in self._counts(v):
                c.tiers[t].evictions += 1
            return True
        v.moving = True
        try:
            placed = self._make_room(dst, v, may_drop)
        finally:
            v.moving = False
        if not placed:
            if not may_drop:
                return False
            for c in self._counts(v):
                c.tiers[t].evictions += 1
            self._drop_block(v)
            return True
        for c in self._counts(v):
            c.tiers[t].evictions += 1
        v.moving = True
        v.pins += 1
        self._demoting[t] += 1
        try:
            with self._unlocked():
                self._copy_between(v, t, dst)
        except BaseException:
            self._tiers[dst].free(v.id)
            raise
        finally:
            v.moving = False
            v.pins -= 1
            self._demoting[t] -= 1
            self._cond.notify_all()
        self._add_copy(v, dst)
        for c in self._counts(v):
            c.demotions += 1
        if v.pins == 0:
            self._drop_copy(v, t)
        self._maybe_release(v)
        return True

    def _counts(self, b: Block) -> tuple[Counters, Counters]:
        """The store's totals and the counters of ``b``'s namespace: an event on a block counts in both."""
        space = b.space if b.space is not None else self._default
        return self._c, space.counters

    def _durable_copy(self, t: int) -> bool:
        """Whether tier ``t`` holds the copies a persistent store's journal relies on (they cannot
        go while the block lives: a reopened store would lose the key)."""
        return False

    def _copy_between(self, b: Block, src: int, dst: int) -> None:
        """Copy a pinned block from tier ``src`` to its allocated slot in ``dst`` (no lock held)."""
        s, d = self._tiers[src], self._tiers[dst]
        if s.traits.addressable:
            d.write(b.id, s.view(b.id))
        elif d.traits.addressable:
            s.read_into(b.id, d.view(b.id))
        else:
            buf = np.empty(b.nbytes, dtype=np.uint8)
            s.read_into(b.id, memoryview(buf))
            d.write(b.id, memoryview(buf))

    def _bring_to_memory(self, b: Block, data: memoryview | None = None, tiers: list[int] | None = None) -> None:
        """Copy a block that lives below memory into a memory tier (protect, reopen, dedup of a prefix).
        ``data``: the block's bytes when the caller holds them (a put), so a bad lower copy cannot fail it;
        ``tiers``: the memory tiers to try, in order (a dry run's choice first)."""
        while b.rising:  # another thread is copying it up: a second slot for it would clash
            self._cond.wait(WAIT_SLICE)
        if b.where & self._memory_mask:
            return
        if not b.where:
            raise IntegrityError(f"every copy of block {block_name(b.id)[:16]} failed its digest check")
        b.rising = True
        try:
            t = self._allocate(b, self._memory if tiers is None else tiers)
            src = fastest(b.where)
            b.pins += 1
            try:
                with self._unlocked():
                    if data is not None:
                        self._tiers[t].write(b.id, data)
                    else:
                        self._copy_between(b, src, t)
            except IntegrityError:
                self._tiers[t].free(b.id)
                self._bad_copy(b, src)
                raise
            except BaseException:
                self._tiers[t].free(b.id)
                raise
            finally:
                b.pins -= 1
            self._add_copy(b, t)
            for c in self._counts(b):
                c.promotions += 1
        finally:
            b.rising = False
            self._cond.notify_all()
        self._maybe_release(b)

    def _add_copy(self, b: Block, t: int, use: bool = False) -> None:
        """Record a copy in tier ``t``; ``use``: a put wrote it (a demotion or promotion only moves a copy)."""
        self._copy_counted(b, t, +1)
        self._policy.added(t, b.id, b.nbytes, b.reads, use=use)
        self._c.tiers[t].bytes_written += b.nbytes
        (b.space if b.space is not None else self._default).counters.tiers[t].bytes_written += b.nbytes

    def _add_copies(self, blocks: list[Block], t: int) -> None:
        """:meth:`_add_copy` with ``use``, for a put's blocks written into tier ``t``."""
        added = self._policy.added
        default = self._default
        bit = 1 << t
        for b in blocks:
            if b.protected or b.where & bit:
                self._copy_counted(b, t, +1)  # the general case: protected bytes and blocks in memory move too
            else:  # a put's new block, unprotected: of the counts, only its tier's blocks move
                b.where |= bit
                space = b.space if b.space is not None else default
                space.counters.contents.tier_blocks[t] += 1
                self._c.contents.tier_blocks[t] += 1
            added(t, b.id, b.nbytes, b.reads)
            (b.space if b.space is not None else default).counters.tiers[t].bytes_written += b.nbytes
        self._c.tiers[t].bytes_written += sum(b.nbytes for b in blocks)

    def _drop_copy(self, b: Block, t: int) -> None:
        self._tiers[t].free(b.id)
        self._copy_counted(b, t, -1)
        self._policy.removed(t, b.id)

    def _copy_counted(self, b: Block, t: int, sign: int) -> None:
        """Set (+1) or clear (-1) ``b``'s copy bit for tier ``t``, and the counts that follow from it: the
        tier's blocks, protected bytes, protected blocks in memory. The one place ``where`` changes."""
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
        self._c.contents.tier_blocks[t] += sign
        space = b.space if b.space is not None else self._default
        space.counters.contents.tier_blocks[t] += sign
        if b.protected:
            self._protected_bytes[t] += sign * b.nbytes
            memory = self._memory_mask
            in_memory = bool(b.where & memory) - bool(was & memory)
            self._c.contents.protected_in_memory += in_memory
            space.counters.contents.protected_in_memory += in_memory

    def _protection_changed(self, b: Block, sign: int) -> None:
        """``b`` became protected (+1) or unprotected (-1): its copies' protected bytes, its namespace's
        protected bytes (its quota's use) and the protected-block counts follow."""
        delta = sign * b.nbytes
        for t in range(len(self._tiers)):
            if b.where >> t & 1:
                self._protected_bytes[t] += delta
        (b.space if b.space is not None else self._default).protected_bytes += delta
        in_memory = sign if b.where & self._memory_mask else 0
        for c in self._counts(b):
            c.contents.protected_blocks += sign
            c.contents.protected_in_memory += in_memory

    def _drop_block(self, b: Block) -> None:
        """The last tier is full: the block and every key referring to it go (counted, never silent)."""
        log.debug("dropping block %s (%d B, %d keys)", block_name(b.id)[:16], b.nbytes, len(b.keys))
        gone = sum(self._keys.pop(k, None) is not None for k in b.keys)
        for c in self._counts(b):
            c.drops += 1
            c.dropped_bytes += b.nbytes
            c.contents.keys -= gone
            c.contents.logical_bytes -= gone * b.nbytes
            if b.keys:
                c.contents.blocks -= 1
                c.contents.unique_bytes -= b.nbytes
        b.keys.clear()
        if b.protected:
            self._protection_changed(b, -1)
        b.protected = 0
        self._policy.set_protected(b.id, False)
        self._maybe_release(b)

    def _maybe_release(self, b: Block) -> None:
        """Free a block no key refers to, once no copy of it is in flight."""
        if b.keys or b.pins or b.moving or not b.ready:
            return
        for t in range(len(self._tiers)):
            if b.where >> t & 1:
                self._drop_copy(b, t)
        self._policy.set_protected(b.id, False)
        if self._blocks.get(b.id) is b:
            del self._blocks[b.id]

    def _unpin_all(self, blocks: Iterable[Block]) -> None:
        """:meth:`_unpin` for a batch: waiters are woken once (a notify costs more than the rest of an unpin)."""
        for b in blocks:
            b.pins -= 1
            if b.pins == 0 and not b.keys:  # _maybe_release's first test, without the call for a kept block
                self._maybe_release(b)
        self._cond.notify_all()

    def _unpin(self, b: Block) -> None:
        b.pins -= 1
        if b.pins == 0:
            self._maybe_release(b)
        self._cond.notify_all()  # also at pins 1: demote() waits for the other readers of a block to finish

    def _promote(self, b: Block, data: np.ndarray) -> None:
        """Copy a block read often from a lower tier into the fastest tier with room (lock held)."""
        if b.rising:
            return  # another thread is copying it up already
        b.lower_reads = 0
        src = fastest(b.where)
        b.rising = True
        try:
            for t in range(src):
                if not self._tiers[t].fits(b.nbytes):
                    continue
                b.pins += 1
                try:
                    if not self._make_room(t, b, may_drop=False):
                        continue
                    try:
                        with self._unlocked():
                            self._tiers[t].write(b.id, byte_view(data))
                    except BaseException:
                        self._tiers[t].free(b.id)
                        raise
                    self._add_copy(b, t)
                    for c in self._counts(b):
                        c.promotions += 1
                    return
                finally:
                    self._unpin(b)
        finally:
            b.rising = False
            self._cond.notify_all()

    # ------------------------------------------------------------------ background promotion
    # A promotion that needs room demotes a victim: on this class of machine a 256 KiB block file costs
    # about 1 ms to write, which would land on the read that earned the promotion (the request's time to
    # first token). The read queues it instead and a promoter thread copies it up; every call that shows
    # placement (info, stats, demote, tiers) first waits for the queue, so what a caller observes is the
    # same as if the read had promoted the block itself.
    def _queue_promotion(self, b: Block, data: np.ndarray, owned: bool) -> None:
        """Promote ``b`` (just read; ``data`` its bytes, ``owned``: not the caller's buffer) in the background."""
        if b.rising or b.queued:
            return
        if self._promotions and self._queued_bytes + b.nbytes > PROMOTION_QUEUE_BYTES:
            return  # the promoter is behind: the block stays where it is and earns its promotion again
        self._promotions.append((b, data if owned else data.copy()))  # the caller may reuse its buffer at once
        b.queued = True
        self._queued_bytes += b.nbytes
        if self._promoter is None:
            self._promoter = threading.Thread(target=self._promote_queued, name="cascade-kv-promoter", daemon=True)
            self._promoter.start()
        self._cond.notify_all()

    def _promote_now(self, b: Block, data: np.ndarray) -> None:
        if not b.ready or self._blocks.get(b.id) is not b or not b.where or b.where & self._memory_mask:
            return  # deleted, lost or already in memory since the read
        try:
            self._promote(b, data)
        except StorageError as e:  # the read itself succeeded; only the optimisation failed
            log.warning("promotion of block %s failed: %s", block_name(b.id)[:16], e)

    def _promote_queued(self) -> None:
        """The promoter thread: carries out queued promotions while no read is in flight (a promotion's
        demotion would slow the reads it competes with: they are a request's time to first token)."""
        with self._lock:
            idle_since = time.monotonic()
            while True:
                if self._closed:
                    for waiting, _ in self._promotions:
                        waiting.queued = False
                    self._promotions.clear()
                    self._queued_bytes = 0
                    self._cond.notify_all()
                    return
                if not self._promotions:
                    if time.monotonic() - idle_since > PROMOTER_IDLE:  # exit, so that an unclosed store
                        self._promoter = None                         # is not kept alive by its own thread
                        return
                    self._cond.wait(PROMOTER_IDLE)
                    continue
                if self._placing:  # a put, protect or demote is carrying out its dry run: no move under it
                    self._cond.wait(WAIT_SLICE)
                    continue
                quiet = time.monotonic() - self._last_read
                if (not self._hurry and self._queued_bytes <= PROMOTION_QUEUE_BYTES // 2
                        and (self._reads_in_flight or quiet < PROMOTER_QUIET)):
                    # reads come in bursts (a request's prefix, batch by batch): wait for the burst to end
                    self._cond.wait(WAIT_SLICE if self._reads_in_flight else PROMOTER_QUIET - quiet)
                    continue
                b, data = self._promotions.popleft()
                b.queued = False
                self._queued_bytes -= b.nbytes
                self._promoting += 1
                try:
                    self._promote_now(b, data)
                except BaseException:  # noqa: BLE001 - a bug here must not kill the thread silently
                    log.exception("promotion of block %s failed", block_name(b.id)[:16])
                finally:
                    self._promoting -= 1
                    self._cond.notify_all()
                idle_since = time.monotonic()

    def _settle(self) -> None:
        """Wait (lock held) until every queued promotion has been carried out."""
        if not (self._promotions or self._promoting):
            return
        self._hurry += 1
        self._cond.notify_all()
        try:
            while (self._promotions or self._promoting) and not self._closed:
                self._cond.wait(WAIT_SLICE)
        finally:
            self._hurry -= 1

    def _bad_copy(self, b: Block, t: int) -> None:
        """A copy failed its check: quarantine it; the block is lost if no other copy remains."""
        counts = self._counts(b)
        for c in counts:
            c.integrity_errors += 1
        tier = self._tiers[t]
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
        self._policy.removed(t, b.id)
        if not b.where:
            b.lost = True
