"""The read path: get_many, and the pinned reads the daemon's store shares with it.

Every key and out buffer is checked under the lock before anything is copied. Blocks that are small
(up to :data:`~cascade_kv.context.SMALL_COPY`) and in the top tier are copied under the lock in one batch
(releasing and retaking it would cost more than the copy); the others are *pinned* and copied outside it
from their fastest copy (a pinned block's copies are never freed or reused), and a copy that fails its
digest check is quarantined and the read retried from another. A block read often from below the top
tier is queued for the promoter.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .arrays import byte_view, check_out, check_outs, finish_outs, key_list, needs_staging
from .blocks import Block, Entry, fastest
from .context import SMALL_COPY, StoreContext
from .errors import IntegrityError
from .ids import Key, block_name
from .keys import KeyTable
from .namespace import Space
from .placement import Placement
from .promoter import Promoter

Job = tuple[int, Block, np.ndarray]
"""A pinned block to copy outside the lock: (index in the call, block, where its bytes go)."""


class Reads:
    """Copies stored values out, counting the reads and earning promotions."""

    def __init__(self, ctx: StoreContext, table: KeyTable, placement: Placement, promoter: Promoter) -> None:
        self._ctx = ctx
        self._table = table
        self._placement = placement
        self._promoter = promoter

    def get_many(self, space: Space, keys: Sequence[Key], outs: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
        keys = key_list(keys, "get_many")
        check_outs(keys, outs)
        internal = keys if space.name is None else [space.internal(k) for k in keys]
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            entries = self._table.entries(internal, count_misses=space)
            if outs is None:
                results = [np.empty(e.shape, e.dtype) for e in entries]
            else:
                # check_out's common case inlined (~0.1 us a block): a numpy out of the block's dtype and shape
                results = [o if (type(o) is np.ndarray and o.dtype == e.dtype and o.shape == e.shape
                                 and o.flags.writeable)
                           else np.empty(e.shape, e.dtype) if o is None else check_out(o, k, e.dtype, e.shape)
                           for k, e, o in zip(keys, entries, outs)]
            blocks = self.start(space, keys, entries)
            jobs = self._read_small(blocks, results, space)
            if jobs:
                self._promoter.reads_started()
        if jobs:
            try:
                self.read_pinned(jobs, space)
            finally:
                self._promoter.reads_ended()
        return results if outs is None else finish_outs(outs, results)  # torch outs: staged copies land

    def start(self, space: Space, keys: list[Key], entries: list[Entry]) -> list[Block]:
        """Lock held, every key found and every out checked: the keys' blocks, counted as gets, or
        IntegrityError (nothing counted) for a block whose every copy failed its digest check."""
        table = self._ctx.blocks
        blocks = [table[e.block_id] for e in entries]
        for k, b in zip(keys, blocks):
            if b.lost:
                raise IntegrityError(f"get({k!r}): every copy of block {block_name(b.id)[:16]} failed "
                                     f"its digest check; put the value again")
        self._ctx.counters.gets += len(keys)
        space.counters.gets += len(keys)
        return blocks

    def _read_small(self, blocks: list[Block], results: list[np.ndarray], space: Space) -> list[Job]:
        """Lock held: copy the blocks that are small and in the top tier straight into their results (releasing
        and retaking the lock around such a copy would cost more than it), account them as one batch, and
        pin the others for :meth:`read_pinned`, which copies them outside the lock (returned as its jobs)."""
        jobs: list[Job] = []
        top = self._ctx.tiers[0]
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
        """:meth:`account` for a batch of reads served by the top tier: the counters once, the policy per block."""
        nbytes = 0
        uses = []
        for b in blocks:
            b.reads += 1
            nbytes += b.nbytes
            uses.append((b.id, b.nbytes, b.reads))
        self._ctx.policy.accessed_many(0, uses)
        for c in (self._ctx.counters, space.counters):
            tc = c.tiers[0]
            tc.hits += len(blocks)
            tc.bytes_read += nbytes

    def account(self, b: Block, t: int, space: Space) -> None:
        """A read of ``b`` served by tier ``t``, for ``space``: its hit, the misses above, the policy's use."""
        for c in (self._ctx.counters, space.counters):  # a read counts for the namespace that read it
            tc = c.tiers[t]
            tc.hits += 1
            for faster in c.tiers[:t]:
                faster.misses += 1
            tc.bytes_read += b.nbytes
        b.reads += 1
        self._ctx.policy.accessed(t, b.id, b.nbytes, b.reads)

    def read_pinned(self, jobs: list[Job], space: Space) -> None:
        """Copy pinned blocks out of their tiers (no lock), then account, promote and unpin."""
        ctx, placement = self._ctx, self._placement
        error: BaseException | None = None
        done: list[tuple[Block, int, np.ndarray]] = []
        for _, b, out in jobs:
            staged = np.empty(out.shape, out.dtype) if needs_staging(out) else out
            t = -1
            try:
                while True:
                    with ctx.lock:
                        if not b.where:
                            raise IntegrityError(f"get: every copy of block {block_name(b.id)[:16]} failed "
                                                 f"its digest check; put the value again")
                        t = fastest(b.where)
                    try:
                        ctx.tiers[t].read_into(b.id, byte_view(staged))
                        break
                    except IntegrityError:
                        if staged is out:
                            np.asarray(byte_view(out)).fill(0)  # scrub: no bad byte stays in the caller's buffer
                        with ctx.lock:
                            placement.bad_copy(b, t)  # then retry from another copy, if one is left
                if staged is not out:
                    np.copyto(out, staged)
                done.append((b, t, staged))
            except BaseException as e:  # keep going: every pinned block must be unpinned below
                error = error or e
        with ctx.lock:
            for b, t, data in done:
                self.account(b, t, space)
                if t != 0:
                    b.lower_reads += 1
            for _, b, _ in jobs:
                placement.unpin(b)
            if error is None:
                for (_, _, out), (b, t, data) in zip(jobs, done):
                    if (ctx.policy.should_promote(b.lower_reads) and b.ready and ctx.blocks.get(b.id) is b
                            and not b.where & ((1 << t) - 1)):
                        self._promoter.queue(b, data, owned=data is not out)
        if error is not None:
            raise error


__all__ = ["Reads"]
