"""ArenaAllocator: best fit over one arena, with holes merged as soon as they touch."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_kv.tiers.allocator import ALIGNMENT, ArenaAllocator, align_up


def gaps(capacity: int, live: dict[int, int]) -> list[int]:
    """Sizes of the maximal free runs between live ranges (offset -> rounded size)."""
    out, pos = [], 0
    for off in sorted(live):
        if off > pos:
            out.append(off - pos)
        pos = off + live[off]
    if capacity > pos:
        out.append(capacity - pos)
    return out


def check(a: ArenaAllocator, live: dict[int, int]) -> None:
    spans = sorted(live.items())
    for (off, size), (next_off, _) in zip(spans, spans[1:], strict=False):
        assert off + size <= next_off, f"ranges overlap: [{off}, {off + size}) and {next_off}"
    for off, size in spans:
        assert 0 <= off and off + size <= a.capacity
        assert off % ALIGNMENT == 0 and size % ALIGNMENT == 0
    assert a.free_bytes == a.capacity - sum(live.values())
    # holes are merged at once, so they are exactly the maximal gaps between live ranges
    free_runs = gaps(a.capacity, live)
    assert a.holes == len(free_runs)
    assert a.largest_hole == max(free_runs, default=0)


def test_align_up():
    assert [align_up(n) for n in (0, 1, 63, 64, 65, 128)] == [0, 64, 64, 64, 128, 128]
    assert align_up(5, 4096) == 4096


def test_capacity_rounds_down_to_alignment():
    a = ArenaAllocator(1000)
    assert a.capacity == 960 and a.free_bytes == 960 and a.largest_hole == 960 and a.holes == 1


def test_zero_capacity():
    a = ArenaAllocator(0)
    assert a.capacity == 0 and a.free_bytes == 0 and a.largest_hole == 0 and a.holes == 0
    assert a.allocate(0) is None and a.allocate(1) is None


def test_zero_bytes_take_one_slot():
    a = ArenaAllocator(256)
    first, second = a.allocate(0), a.allocate(0)
    assert first is not None and second is not None and first != second
    assert a.free_bytes == 256 - 2 * ALIGNMENT
    a.free(first, 0)
    a.free(second, 0)
    assert a.free_bytes == 256 and a.holes == 1


def test_fills_exactly_then_refuses():
    a = ArenaAllocator(4 * ALIGNMENT)
    offsets = [a.allocate(ALIGNMENT) for _ in range(4)]
    assert sorted(offsets) == [0, 64, 128, 192]
    assert a.allocate(1) is None and a.free_bytes == 0 and a.holes == 0


def test_refuses_when_free_space_is_fragmented():
    a = ArenaAllocator(4 * 1024)
    offs = [a.allocate(1024) for _ in range(4)]
    a.free(offs[0], 1024)
    a.free(offs[2], 1024)
    assert a.free_bytes == 2048 and a.largest_hole == 1024
    assert a.allocate(1025) is None  # 2 KiB free, but no single hole holds it
    a.free(offs[1], 1024)  # merges with both neighbours
    assert a.holes == 1 and a.largest_hole == 3072
    assert a.allocate(3072) == 0


def test_best_fit_picks_the_smallest_adequate_hole():
    a = ArenaAllocator(64 * 1024)
    # carve holes of 256, 128 and 192 bytes between live separators, then a big tail hole
    layout = [256, 64, 128, 64, 192, 64]
    offs = [a.allocate(n) for n in layout]
    for off, n in zip(offs, layout, strict=True):
        if n != 64:
            a.free(off, n)
    hole_256, hole_128, hole_192 = offs[0], offs[2], offs[4]
    assert a.allocate(100) == hole_128  # 128 B needed: the 128 hole, not the larger ones first
    assert a.allocate(150) == hole_192  # 192 B needed: the 128 hole is gone, 192 is smallest that fits
    assert a.allocate(129) == hole_256  # only the 256 hole (or the tail) fits; 256 is smaller
    assert a.allocate(1) == hole_256 + 192  # what is left of the 256 hole, before the tail


def test_free_merges_left_right_and_both():
    a = ArenaAllocator(5 * ALIGNMENT)
    offs = [a.allocate(ALIGNMENT) for _ in range(5)]
    a.free(offs[1], ALIGNMENT)
    a.free(offs[2], ALIGNMENT)  # merges with its left neighbour
    assert a.holes == 1 and a.largest_hole == 2 * ALIGNMENT
    a.free(offs[4], ALIGNMENT)
    a.free(offs[3], ALIGNMENT)  # merges with both
    assert a.holes == 1 and a.largest_hole == 4 * ALIGNMENT
    a.free(offs[0], ALIGNMENT)
    assert a.holes == 1 and a.largest_hole == a.capacity == a.free_bytes


# an operation: ("alloc", nbytes) or ("free", index into the live list, modulo its length)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.one_of(st.integers(0, 200), st.integers(0, 5000))),
        st.tuples(st.just("free"), st.integers(0, 1000)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(0, 16 * 1024), operations=ops)
def test_random_allocate_free_sequences(capacity: int, operations: list[tuple[str, int]]):
    a = ArenaAllocator(capacity)
    live: dict[int, int] = {}  # offset -> rounded size
    requested: dict[int, int] = {}  # offset -> nbytes as asked (free must be given the same)
    for op, arg in operations:
        if op == "alloc":
            largest_before = a.largest_hole
            off = a.allocate(arg)
            size = align_up(max(arg, 1))
            if off is None:
                assert largest_before < size  # refused only when no hole is big enough
            else:
                assert off not in live
                live[off] = size
                requested[off] = arg
        elif live:
            off = sorted(live)[arg % len(live)]
            a.free(off, requested.pop(off))
            del live[off]
        check(a, live)
    for off in list(live):
        a.free(off, requested.pop(off))
        del live[off]
        check(a, live)
    # everything freed: one hole of the full capacity is left (or none for an empty arena)
    assert a.free_bytes == a.capacity
    assert a.holes == (1 if a.capacity else 0)
    assert a.largest_hole == a.capacity


@pytest.mark.parametrize("nbytes", [1, 64, 65, 1000])
def test_allocation_succeeds_whenever_a_hole_fits(nbytes: int):
    a = ArenaAllocator(align_up(nbytes))
    assert a.allocate(nbytes) == 0
    assert a.free_bytes == 0
