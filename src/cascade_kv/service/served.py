"""The single-node store as the daemon runs it: its host arena in memory that clients map.

Two calls let a client move bytes itself, with the daemon deciding only where:

* :meth:`ServedStore.pin_reads` pins every block of a get, answers where each lies (an arena offset, or
  a place in the caller's staging area for blocks read from disk), and hands the pinned blocks back;
  the client copies, then the daemon unpins (:meth:`unpin`). A pinned block's arena range is never
  freed or reused, so the client's copy cannot see another block's bytes.
* :meth:`ServedStore.put_described` takes values the client already hashed: an item without bytes
  (:class:`BlockMeta`) must be a clean dedup hit on a block the store holds; if one is not, nothing
  changes and :class:`NeedBytes` names the items whose bytes the client must send.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..arrays import byte_view, check_fits, key_list
from ..blocks import Block, fastest
from ..config import format_size
from ..errors import CapacityError, IntegrityError, InvalidArgument
from ..ids import BlockId, Digest, Key, StoreKey
from ..namespace import Space
from ..store import Store
from ..tiers.allocator import ArenaAllocator, align_up
from ..tiers.host import HostTier, physical_memory


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """A value the client did not send: its digest names a block the store should already hold."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


class NeedBytes(Exception):
    """Internal: a described item is not a clean dedup hit; nothing changed. ``indices``: items to send."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(indices)
        self.indices = indices


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a get's block lies for the client: ``staging`` False means the arena."""

    staging: bool
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]


Expect = Optional[list[Optional[tuple[np.dtype, tuple[int, ...]]]]]
"""Per key of a get, the dtype and shape its caller's ``out`` has (``None``: no out given)."""


def check_expected(key: Key, dtype: np.dtype, shape: tuple[int, ...],
                   expected: tuple[np.dtype, tuple[int, ...]] | None) -> None:
    if expected is not None:
        check_fits(key, expected[0], expected[1], dtype, shape)


def shared_arena(capacity: int) -> tuple[int, mmap.mmap | None]:
    """A memfd of ``capacity`` bytes and its shared mapping: memory that other processes can map from a
    passed descriptor and that vanishes with its last user (a file in /dev/shm would outlive a SIGKILL)."""
    size = ArenaAllocator(capacity).capacity
    ram = physical_memory()
    if ram is not None and size > ram:
        raise CapacityError(f"host tier: host_capacity {format_size(size)} ({size} B) is more than this "
                            f"machine's {format_size(ram)} of RAM")
    fd = os.memfd_create("cascade-kv-arena", os.MFD_CLOEXEC)
    if not size:
        return fd, None
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as e:
        os.close(fd)
        raise CapacityError(f"host tier: cannot map a shared arena of {format_size(size)}: {e}") from e


class ServedStore(Store):
    """A :class:`Store` whose host arena is a memfd clients map read-only (``arena_fd``)."""

    def __init__(self, config: object = None, **overrides: object) -> None:
        self.arena_fd = -1
        self._arena_map: mmap.mmap | None = None
        try:
            super().__init__(config, **overrides)  # type: ignore[arg-type]
        except BaseException:
            self._release_arena()
            raise

    def _make_host_tier(self, capacity: int) -> HostTier:
        self.arena_fd, self._arena_map = shared_arena(capacity)
        return HostTier(capacity, buffer=self._arena_map)

    @property
    def arena_size(self) -> int:
        return 0 if self._arena_map is None else len(self._arena_map)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release_arena()

    def _release_arena(self) -> None:
        if self._arena_map is not None:
            try:
                self._arena_map.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with it
            self._arena_map = None
        if self.arena_fd >= 0:
            os.close(self.arena_fd)
            self.arena_fd = -1

    # ------------------------------------------------------------------ gets
    def pin_reads(self, space: Space, keys: Sequence[Key], staging: Callable[[int], np.ndarray],
                  expect: Expect = None) -> tuple[list[Placed], list[Block]]:
        """Where every key's value lies, all or nothing (BlockNotFound: nothing pinned). Blocks in the
        arena stay pinned (returned: pass them to :meth:`unpin` after the client copied); the others are
        read now into ``staging(total_bytes)``, a uint8 array, at the offsets answered."""
        keys = key_list(keys, "get_many")
        ctx, reads = self._ctx, self._reads
        host = ctx.tiers[0]
        placed: list[Placed | None] = []
        pinned: list[Block] = []
        slow: list[tuple[int, Block, int]] = []
        total = 0
        with ctx.lock:
            ctx.check_open()
            entries = self._table.entries([space.internal(k) for k in keys], count_misses=space)
            if expect is not None:  # as a get checks its outs: before a lost block is reported
                if len(expect) != len(keys):
                    raise InvalidArgument(f"get_many: {len(keys)} keys but {len(expect)} out buffers")
                for k, e, ex in zip(keys, entries, expect):
                    check_expected(k, e.dtype, e.shape, ex)
            blocks = reads.start(space, keys, entries)
            for i, (e, b) in enumerate(zip(entries, blocks)):
                b.pins += 1
                if fastest(b.where) == 0:
                    reads.account(b, 0, space)
                    pinned.append(b)
                    placed.append(Placed(False, host.offset_of(b.id), b.nbytes, e.dtype, e.shape))  # type: ignore[attr-defined]
                else:
                    slow.append((i, b, total))
                    placed.append(Placed(True, total, b.nbytes, e.dtype, e.shape))
                    total = align_up(total + b.nbytes)
            if slow:
                self._promoter.reads_started()
        if slow:
            try:
                area = staging(total)
                jobs = [(i, b, area[off:off + b.nbytes]) for i, b, off in slow]
                reads.read_pinned(jobs, space)  # unpins them; queues promotions as a get would
            except BaseException:
                self.unpin(pinned)
                raise
            finally:
                self._promoter.reads_ended()
        return placed, pinned  # type: ignore[return-value]

    def unpin(self, blocks: Sequence[Block]) -> None:
        if not blocks:
            return
        with self._ctx.lock:
            for b in blocks:
                self._placement.unpin(b)

    # ------------------------------------------------------------------ puts
    def block_id_of(self, digest: Digest, space: Space) -> BlockId:
        return self._puts.block_id(digest, space)

    def put_described(self, space: Space, keys: Sequence[Key], values: Sequence[np.ndarray | BlockMeta],
                      prefixes: Sequence[bool], digests: Sequence[Digest]) -> None:
        """A put of values hashed by the client. An ndarray value is hashed again here and must match its
        digest (a client's bug must not store bytes under another value's address); a BlockMeta must be
        a clean dedup hit, else :class:`NeedBytes` and nothing changed."""
        items = [(space.internal(k), v, p) for k, v, p in zip(keys, values, prefixes)]
        ids = []
        for (k, v, _), d in zip(items, digests):
            bid = self.block_id_of(d, space)
            if isinstance(v, np.ndarray):
                got = self._ctx.hasher.digest(byte_view(v))
                if got != d:
                    raise IntegrityError(f"put({k!r}): the client's digest {d.hex()[:16]} does not match the "
                                         f"bytes it wrote ({got.hex()[:16]}); nothing was stored")
            ids.append(bid)
        self._persistence.refuse_unpersistable(items)  # type: ignore[arg-type]
        self._puts.put(space, items, ids, check=self._check_described)  # type: ignore[arg-type]

    def _check_described(self, items: list[tuple[StoreKey, np.ndarray | BlockMeta, bool]], ids: list[BlockId]) -> None:
        """Under the lock, before the put is planned: NeedBytes unless every described item (no bytes) finds its
        block stored, ready, trusted and already where it must be; every path that would need its bytes (a
        fresh block, a prefix to bring into memory, a copy to rewrite) sends the client back for them instead."""
        ctx = self._ctx
        described = [i for i, (_, v, _) in enumerate(items) if isinstance(v, BlockMeta)]
        need: list[int] = []
        for i in described:
            _, meta, prefix = items[i]
            b = ctx.blocks.get(ids[i])
            if b is None or not b.ready or b.lost or not b.where:
                need.append(i)
                continue
            if b.nbytes != meta.nbytes:
                raise InvalidArgument(f"put({items[i][0]!r}): {meta.nbytes} B described, but the block with "
                                      f"its digest holds {b.nbytes} B")
            if ctx.must_be_in_memory(prefix) and not b.where & ctx.memory_mask:
                need.append(i)
            elif any(b.where >> t & 1 and not ctx.tiers[t].trusted(b.id) and not b.where & ~(1 << t)
                     for t in range(len(ctx.tiers))):
                need.append(i)
        if need:
            raise NeedBytes(need)
