"""Promotion: blocks read often from a lower tier copied up, by a background thread.

A promotion that needs room demotes a victim: on this class of machine a 256 KiB block file costs
about 1 ms to write, which would land on the read that earned the promotion (the request's time to
first token). The read queues it instead and a promoter thread copies it up; every call that shows
placement (info, stats, demote, tiers) first waits for the queue (:meth:`Promoter.settle`), so what a
caller observes is the same as if the read had promoted the block itself.

The promoter stays out of the way of the calls it would disturb: of reads in flight (it waits for a
burst of reads to end) and of a put, protect or demote carrying out its dry run
(:meth:`Promoter.enter_placement`: its evictions would move blocks the run counted on).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator

import numpy as np

from .arrays import byte_view
from .blocks import Block, Plan, fastest
from .context import WAIT_SLICE, StoreContext
from .errors import IntegrityError, StorageError
from .ids import block_name
from .placement import Placement

log = logging.getLogger(__name__)

PROMOTION_QUEUE_BYTES = 64 << 20
"""Bytes of blocks waiting for the background promoter at most. A read that would queue more does not promote (the block earns its promotion again at its next read): doing the promotion
in the reader's thread instead would put the demotion it needs back on the read path."""
PROMOTER_IDLE = 2.0  # seconds without work after which the promoter thread exits (the next promotion starts one)
PROMOTER_QUIET = 0.002  # seconds without reads before the promoter starts (a request's reads come in batches)


class Promoter:
    """The promotion queue and the thread that empties it. Every method but :meth:`reads_ended` and
    :meth:`join` is called with the store's lock held."""

    def __init__(self, ctx: StoreContext, placement: Placement) -> None:
        self._ctx = ctx
        self._placement = placement
        # read from a lower tier, waiting to be copied up, with the bytes the read left where no one reuses them
        self._queue: deque[tuple[Block, np.ndarray | None]] = deque()
        self._queued_bytes = 0  # bytes of the blocks in _queue
        self.reads_in_flight = 0
        """get_many calls between their lookup and the end of their reads outside the lock."""
        self._last_read = 0.0  # time.monotonic() when the last of them ended
        self._hurry = 0  # callers waiting in settle(): the promoter stops deferring to reads
        self._promoting = 0  # promotions the thread has taken off the queue and not finished
        self._placing = 0  # calls between their dry run and their last move: the promoter waits
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ holding the promoter off
    def enter_placement(self) -> None:
        """Before a dry run: let a promotion in hand finish, and start no other until
        :meth:`leave_placement` (so the run sees the state its moves will start from)."""
        while self._promoting:
            self._ctx.cond.wait(WAIT_SLICE)
        self._placing += 1

    def leave_placement(self, plan: Plan | None = None) -> None:
        """After the moves (``plan``: a put's, left only if it entered: ``plan.placing``)."""
        if plan is None or plan.placing:
            self._placing -= 1
            if plan is not None:
                plan.placing = False
        self._ctx.cond.notify_all()

    @contextlib.contextmanager
    def placing(self) -> Iterator[None]:
        """A dry run and the moves it planned (protect, demote), with the promoter held off."""
        self.enter_placement()
        try:
            yield
        finally:
            self.leave_placement()

    def reads_started(self) -> None:
        """A get_many will read outside the lock: the promoter waits for it (:meth:`reads_ended`)."""
        self.reads_in_flight += 1

    def reads_ended(self) -> None:
        """After reads made outside the lock (takes the lock): the promoter may go on."""
        with self._ctx.lock:
            self.reads_in_flight -= 1
            self._last_read = time.monotonic()
            self._ctx.cond.notify_all()

    # ------------------------------------------------------------------ the queue
    def queue(self, b: Block, data: np.ndarray, owned: bool) -> None:
        """Promote ``b`` (just read; ``data`` its bytes, ``owned``: not the caller's buffer) in the background.

        The caller's buffer is not kept, nor copied: the promoter reads the block again from the tier it was
        read from (:meth:`_copy_up`). A copy here was rejected: it was the read's work, not the promoter's, and
        made every read that earned a promotion slower (a 16 MiB block read cold: ~4 ms of the reader's CPU, the
        copy under the store's lock, ~0.13 s of a 0.7 s pass of ``cascade bench cold``'s 32 blocks). The second
        read costs the promoter a copy out of the page cache (the first read left the file there); with
        ``o_direct`` it reads the device again, in the background."""
        if b.rising or b.queued:
            return
        if self._queue and self._queued_bytes + b.nbytes > PROMOTION_QUEUE_BYTES:
            return  # the promoter is behind: the block stays where it is and earns its promotion again
        self._queue.append((b, data if owned else None))  # the caller may reuse its buffer at once
        b.queued = True
        self._queued_bytes += b.nbytes
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cascade-kv-promoter", daemon=True)
            self._thread.start()
        self._ctx.cond.notify_all()

    def settle(self) -> None:
        """Wait until every queued promotion has been carried out."""
        if not (self._queue or self._promoting):
            return
        ctx = self._ctx
        self._hurry += 1
        ctx.cond.notify_all()
        try:
            while (self._queue or self._promoting) and not ctx.closed:
                ctx.cond.wait(WAIT_SLICE)
        finally:
            self._hurry -= 1

    def join(self) -> None:
        """After the store closed (lock not held): wait for the thread, which drops the queue and returns once
        the promotion in hand (if any) is done."""
        with self._ctx.lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        """Carry out queued promotions while no read is in flight (a promotion's demotion would slow the reads
        it competes with: they are a request's time to first token)."""
        ctx = self._ctx
        with ctx.lock:
            idle_since = time.monotonic()
            while True:
                if ctx.closed:
                    for waiting, _ in self._queue:
                        waiting.queued = False
                    self._queue.clear()
                    self._queued_bytes = 0
                    ctx.cond.notify_all()
                    return
                if not self._queue:
                    if time.monotonic() - idle_since > PROMOTER_IDLE:  # exit, so that an unclosed store
                        self._thread = None                           # is not kept alive by its own thread
                        return
                    ctx.cond.wait(PROMOTER_IDLE)
                    continue
                if self._placing:  # a put, protect or demote is carrying out its dry run: no move under it
                    ctx.cond.wait(WAIT_SLICE)
                    continue
                quiet = time.monotonic() - self._last_read
                if (not self._hurry and self._queued_bytes <= PROMOTION_QUEUE_BYTES // 2
                        and (self.reads_in_flight or quiet < PROMOTER_QUIET)):
                    # reads come in bursts (a request's prefix, batch by batch): wait for the burst to end
                    ctx.cond.wait(WAIT_SLICE if self.reads_in_flight else PROMOTER_QUIET - quiet)
                    continue
                b, data = self._queue.popleft()
                b.queued = False
                self._queued_bytes -= b.nbytes
                self._promoting += 1
                try:
                    self._promote_now(b, data)
                except BaseException:  # noqa: BLE001 - a bug here must not kill the thread silently
                    log.exception("promotion of block %s failed", block_name(b.id)[:16])
                finally:
                    self._promoting -= 1
                    ctx.cond.notify_all()
                idle_since = time.monotonic()

    def _promote_now(self, b: Block, data: np.ndarray | None) -> None:
        ctx = self._ctx
        if not b.ready or ctx.blocks.get(b.id) is not b or not b.where or b.where & ctx.memory_mask:
            return  # deleted, lost or already in memory since the read
        try:
            self._promote(b, data)
        except StorageError as e:  # the read itself succeeded; only the optimisation failed
            log.warning("promotion of block %s failed: %s", block_name(b.id)[:16], e)

    def _promote(self, b: Block, data: np.ndarray | None) -> None:
        """Copy a block read often from a lower tier into the fastest tier with room (from ``data`` if given, else
        from the block's copy in that lower tier)."""
        if b.rising:
            return  # another thread is copying it up already
        ctx, placement = self._ctx, self._placement
        b.lower_reads = 0
        src = fastest(b.where)
        b.rising = True
        try:
            for t in range(src):
                if not ctx.tiers[t].fits(b.nbytes):
                    continue
                b.pins += 1
                try:
                    if not placement.make_room(t, b, may_drop=False):
                        continue
                    try:
                        placement.copy_up(b, src, t, None if data is None else byte_view(data))
                    except IntegrityError:  # the lower copy went bad since the read (now marked): no promotion
                        pass
                    return
                finally:
                    placement.unpin(b)
        finally:
            b.rising = False
            ctx.cond.notify_all()


__all__ = ["Promoter", "PROMOTION_QUEUE_BYTES"]
