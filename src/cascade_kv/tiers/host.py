"""Tier 2: local host DRAM, one arena allocated and touched when the store opens.

The arena is an anonymous ``mmap``: page aligned (so a GPU tier can pin it with
``cudaHostRegister`` and an MPI window can expose it), outside Python's heap,
and returned to the OS on close. It is touched page by page at open because
this class of VM faults fresh memory in at about 0.5 GB/s, forty times slower
than a warm copy: paying that once at open keeps it out of every later put.

The tier stores bytes and knows nothing of who else reads its memory: a caller
that lets other processes read the arena (an MPI window) allocates any
per-block header it needs together with the block.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ..config import format_size
from ..errors import CapacityError, ConfigError, InternalError
from ..ids import BlockId
from ..memcopy import PARALLEL_MIN, copy_bytes
from .allocator import ALIGNMENT, ArenaAllocator, align_up
from .base import RoomModel, Tier, TierTraits

_PAGE = mmap.PAGESIZE


def _touch(arena: np.ndarray) -> None:
    """Fault every page in now, one thread per core: faults are per-core work, so two cores halve
    the time (measured here: 0.8 s/GiB on one thread, 0.3 s/GiB on two). MADV_HUGEPAGE was tried
    and rejected: with THP defrag on madvise it made the touch slower, not faster."""
    workers = max(1, min(os.cpu_count() or 1, 8))
    stride = _PAGE * workers

    def touch(first: int) -> None:
        arena[first::stride] = 0  # one write per page: the fault is the point, the zero is free

    threads = [threading.Thread(target=touch, args=(i * _PAGE,)) for i in range(1, workers)]
    for t in threads:
        t.start()
    touch(0)
    for t in threads:
        t.join()


def physical_memory() -> int | None:
    """Bytes of RAM this machine has (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _map_arena(nbytes: int) -> mmap.mmap:
    """An anonymous private mapping of ``nbytes``, or CapacityError naming the size and the machine's RAM.
    Checked ahead because the arena is touched at open: an arena larger than RAM would not fail cleanly
    later but swap or bring in the OOM killer."""
    ram = physical_memory()
    if ram is not None and nbytes > ram:
        raise CapacityError(f"host tier: host_capacity {format_size(nbytes)} ({nbytes} B) is more than this "
                            f"machine's {format_size(ram)} of RAM")
    try:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, MemoryError, OverflowError) as e:  # ENOMEM: no room in the address space or overcommit
        have = "" if ram is None else f" (the machine has {format_size(ram)} of RAM)"
        raise CapacityError(f"host tier: cannot map an arena of {format_size(nbytes)} ({nbytes} B){have}: "
                            f"{e}") from e


class _ArenaRoom(RoomModel):
    """A what-if copy of the arena's holes: exact about fragmentation, where a byte count is not.

    Cloning the allocator costs O(holes), so it is cloned only once the run frees something or its
    allocations no longer fit the largest hole together (allocations that do always succeed, one
    after another, in best fit): a put that needs no eviction pays nothing."""

    def __init__(self, tier: "HostTier") -> None:
        super().__init__(tier.capacity, tier.used)
        self._tier = tier
        self._alloc: ArenaAllocator | None = None
        self._pending: list[tuple[BlockId, int]] = []  # allocations made before the clone: replayed into it
        self._pending_bytes = 0
        self._offsets: dict[BlockId, int] = {}  # ranges this run allocated in its clone

    def _clone(self) -> ArenaAllocator:
        if self._alloc is None:
            with self._tier._lock:
                self._alloc = self._tier._alloc.copy()
            for block_id, size in self._pending:
                offset = self._alloc.allocate(size)
                if offset is None:
                    raise InternalError(f"host tier room model: a pending allocation of {size} B no longer fits "
                                        f"(pending ones are taken only while together they fit the largest hole)")
                self._offsets[block_id] = offset
            self._pending.clear()
        return self._alloc

    def allocate(self, block_id: BlockId, nbytes: int) -> bool:
        size = self._tier._span(nbytes)
        if self._alloc is None and self._pending_bytes + size <= self._tier._alloc.largest_hole:
            self._pending.append((block_id, size))
            self._pending_bytes += size
            return True
        offset = self._clone().allocate(size)
        if offset is None:
            return False
        self._offsets[block_id] = offset
        return True

    def free(self, block_id: BlockId, nbytes: int) -> None:
        alloc = self._clone()
        offset = self._offsets.pop(block_id, None)
        if offset is None:
            offset = self._tier._slots[block_id][0]
        alloc.free(offset, self._tier._span(nbytes))

    def copy(self) -> "_ArenaRoom":
        other = _ArenaRoom(self._tier)
        other._alloc = self._clone().copy()
        other._offsets = dict(self._offsets)
        return other


def copy_view_into(src: memoryview, out: memoryview) -> None:
    """Copy a block's bytes ``src`` into ``out`` (any format and shape of the same size): a flat byte ``out`` with
    the store's parallel copy, any other through a cast. ValueError when the sizes differ."""
    if src.nbytes != out.nbytes:
        raise ValueError(f"host tier: block is {src.nbytes} B, buffer is {out.nbytes} B")
    if out.format == "B" and out.ndim == 1:
        copy_bytes(out, src)
    else:
        out[:] = src.cast(out.format, out.shape) if out.shape else src.cast(out.format)


class HostTier(Tier):
    """Blocks live at offsets of one pre-touched arena; a read is one copy out of it."""

    traits = TierTraits(name="host", memory=True, persistent=False, addressable=True)

    def __init__(self, capacity: int, buffer: object | None = None) -> None:
        """``buffer``: memory to use as the arena instead of a private mapping (at least ``capacity``
        writable bytes, e.g. an MPI window's memory, so peers can read blocks where they lie). The tier
        does not own it: the caller frees it after :meth:`close`."""
        t0 = time.perf_counter()
        self._alloc = ArenaAllocator(capacity)
        self._mmap: mmap.mmap | None = None
        self.arena = np.empty(0, dtype=np.uint8)
        if buffer is not None:
            arena = np.frombuffer(buffer, dtype=np.uint8)
            if arena.nbytes < self._alloc.capacity or arena.flags.writeable is False:
                raise ConfigError(f"host tier: buffer holds {arena.nbytes} B (writable: {arena.flags.writeable}); "
                                 f"capacity is {self._alloc.capacity} B")
            self.arena = arena[:self._alloc.capacity]
            _touch(self.arena)
        elif self._alloc.capacity:
            self._mmap = _map_arena(self._alloc.capacity)
            self.arena = np.frombuffer(self._mmap, dtype=np.uint8)
            _touch(self.arena)
        self._mv = memoryview(self.arena)
        self._slots: dict[BlockId, tuple[int, int]] = {}  # block -> (offset of its bytes, nbytes)
        self._lock = threading.Lock()  # guards the allocator and _slots; copies run outside it
        self.open_seconds = time.perf_counter() - t0
        """Time taken to allocate and touch the arena."""

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used(self) -> int:
        return self._alloc.capacity - self._alloc.free_bytes

    def _span(self, nbytes: int) -> int:
        """Arena bytes a block of ``nbytes`` takes: bytes and rounding."""
        return align_up(max(nbytes, 1))  # the allocator rounds every block up

    def fits(self, nbytes: int) -> bool:
        return self._span(nbytes) <= self._alloc.capacity

    @property
    def largest_hole(self) -> int:
        """Largest block that can be allocated right now (fragmentation shows as largest_hole < free)."""
        return self._alloc.largest_hole

    def room_model(self) -> RoomModel:
        return _ArenaRoom(self)

    def fits_now(self, sizes: Sequence[int]) -> bool:
        # best fit never splits the largest hole while a smaller one fits, so blocks whose aligned sizes
        # add up to no more than it are all placed
        largest = self._alloc.largest_hole
        if sum(sizes) + (ALIGNMENT - 1) * len(sizes) <= largest:  # a bound at C speed: the common answer
            return True
        return sum(align_up(max(n, 1)) for n in sizes) <= largest

    def allocate(self, block_id: BlockId, nbytes: int) -> bool:
        with self._lock:
            if block_id in self._slots:
                raise KeyError(f"block {block_id.hex()[:16]} already allocated in host tier")
            offset = self._alloc.allocate(nbytes)
            if offset is None:
                return False
            self._slots[block_id] = (offset, nbytes)
            return True

    def offset_of(self, block_id: BlockId) -> int:
        """Where the block's bytes start in the arena (for processes that map the same memory)."""
        return self._slots[block_id][0]

    def view(self, block_id: BlockId) -> memoryview:
        offset, nbytes = self._slots[block_id]
        return self._mv[offset:offset + nbytes]

    def write(self, block_id: BlockId, src: memoryview) -> None:
        dst = self.view(block_id)
        if src.nbytes != dst.nbytes:
            raise ValueError(f"host tier: block is {dst.nbytes} B, source is {src.nbytes} B")
        copy_bytes(dst, src.cast("B") if src.format != "B" or src.ndim != 1 else src)

    def read_into(self, block_id: BlockId, out: memoryview) -> None:
        copy_view_into(self.view(block_id), out)

    # The batch paths are the store's: a small block's copy costs ~0.15 us, less than the method calls,
    # slot lookups and checks around it in read_into/write, so they loop here with those hoisted.
    def read_many(self, block_ids: Sequence[BlockId], outs: Sequence[memoryview]) -> None:
        slots, arena = self._slots, self._mv
        for block_id, out in zip(block_ids, outs, strict=True):
            offset, nbytes = slots[block_id]
            if nbytes >= PARALLEL_MIN:
                self.read_into(block_id, out)  # split over threads
                continue
            try:
                out[:] = arena[offset:offset + nbytes]  # a flat byte view of the same size: one memcpy
            except ValueError:  # another size or layout: read_into casts, or raises naming the sizes
                self.read_into(block_id, out)

    def write_many(self, block_ids: Sequence[BlockId], srcs: Sequence[memoryview]) -> None:
        slots, arena = self._slots, self._mv
        for block_id, src in zip(block_ids, srcs, strict=True):
            offset, nbytes = slots[block_id]
            if nbytes >= PARALLEL_MIN:
                self.write(block_id, src)
                continue
            try:
                arena[offset:offset + nbytes] = src
            except ValueError:
                self.write(block_id, src)

    def free(self, block_id: BlockId) -> None:
        with self._lock:
            offset, nbytes = self._slots.pop(block_id)
            self._alloc.free(offset, nbytes)

    def contains(self, block_id: BlockId) -> bool:
        return block_id in self._slots

    def size_of(self, block_id: BlockId) -> int:
        return self._slots[block_id][1]

    def block_ids(self) -> Iterator[BlockId]:
        with self._lock:
            return iter(list(self._slots))

    def close(self) -> None:
        with self._lock:
            self._slots.clear()
            self._mv.release()
            self.arena = np.empty(0, dtype=np.uint8)
            self._mv = memoryview(self.arena)
            if self._mmap is not None:
                try:
                    self._mmap.close()
                except BufferError:
                    pass  # a caller still holds a view; the mapping goes when that view does
                self._mmap = None
