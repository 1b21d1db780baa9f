"""Best-fit allocator over one contiguous arena, with coalescing.

The host tier hands out offsets in a single pre-touched buffer instead of
allocating a numpy array per block: allocation is bookkeeping only, and a
``get`` is one copy out of the arena. Best fit keeps large holes intact for
large blocks (KV blocks range from KiB to hundreds of MiB); freed neighbours
merge at once (``start``/``end`` maps make that O(1)), so fragmentation comes
only from live blocks, and the store relieves it by evicting in LRU order.
A buddy allocator was rejected: rounding 160 MiB blocks up to 256 MiB wastes
a third of the arena.
"""
from __future__ import annotations

import bisect

from ..errors import InternalError

ALIGNMENT = 64  # one cache line: copies start aligned, and 4 KiB blocks pack densely


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class ArenaAllocator:
    """Hands out aligned ``[offset, offset + size)`` ranges of a ``capacity``-byte arena."""

    __slots__ = ("capacity", "_by_start", "_by_end", "_by_size", "free_bytes")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGNMENT
        self._by_start: dict[int, int] = {}  # start -> size of each free hole
        self._by_end: dict[int, int] = {}  # end -> start, to find the hole left of a freed range
        self._by_size: list[tuple[int, int]] = []  # sorted (size, start): best fit by bisect
        self.free_bytes = 0
        if self.capacity:
            self._add_hole(0, self.capacity)

    def _add_hole(self, start: int, size: int) -> None:
        self._by_start[start] = size
        self._by_end[start + size] = start
        bisect.insort(self._by_size, (size, start))
        self.free_bytes += size

    def _remove_hole(self, start: int) -> int:
        size = self._by_start.pop(start)
        del self._by_end[start + size]
        i = bisect.bisect_left(self._by_size, (size, start))
        del self._by_size[i]
        self.free_bytes -= size
        return size

    def copy(self) -> "ArenaAllocator":
        """An independent allocator in the same state (a dry run allocates and frees in it)."""
        other = ArenaAllocator(0)
        other.capacity, other.free_bytes = self.capacity, self.free_bytes
        other._by_start, other._by_end, other._by_size = dict(self._by_start), dict(self._by_end), list(self._by_size)
        return other

    @property
    def largest_hole(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    @property
    def holes(self) -> int:
        return len(self._by_size)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new range of ``align_up(nbytes)`` bytes, or ``None`` if no hole is big enough."""
        size = (max(nbytes, 1) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT  # align_up, without the call
        by_size = self._by_size
        i = bisect.bisect_left(by_size, (size, -1))
        if i == len(by_size):
            return None
        hole_size, start = by_size[i]
        if hole_size == size:
            self._remove_hole(start)
            return start
        # Split in place: the hole keeps its end and loses its head. Removing and re-adding it (two bisects,
        # a list delete and an insort) cost ~1 us, most of a small put's allocation.
        rest = (hole_size - size, start + size)
        del self._by_start[start]
        self._by_start[rest[1]] = rest[0]
        self._by_end[start + hole_size] = rest[1]
        if i == 0 or by_size[i - 1] <= rest:
            by_size[i] = rest  # still sorted (it only shrank, and not below its left neighbour): no shift
        else:
            del by_size[i]
            bisect.insort(by_size, rest)
        self.free_bytes -= size
        return start

    def free(self, offset: int, nbytes: int) -> None:
        """Return a range obtained from :meth:`allocate` with the same ``nbytes``."""
        size = align_up(max(nbytes, 1))
        if offset < 0 or offset % ALIGNMENT or offset + size > self.capacity:  # would corrupt the hole lists
            raise InternalError(f"allocator: free({offset}, {nbytes}) is not a range allocate() can have returned "
                                f"(alignment {ALIGNMENT}, capacity {self.capacity})")
        left = self._by_end.get(offset)
        if left is not None:
            size += offset - left
            self._remove_hole(left)
            offset = left
        if offset + size in self._by_start:
            size += self._remove_hole(offset + size)
        self._add_hole(offset, size)
