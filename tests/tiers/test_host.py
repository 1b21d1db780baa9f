"""HostTier: the conformance suite, plus what only an arena can show (in-place views, holes)."""
from __future__ import annotations

import numpy as np
import pytest

from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId
from cascade_kv.tiers import HostTier
from cascade_kv.tiers.allocator import ALIGNMENT

from .conformance import TierConformance, block_id, load, store


class TestHostTier(TierConformance):
    def make_tier(self, capacity: int) -> HostTier:
        return HostTier(capacity)


class TestHostTierOnCallersBuffer(TierConformance):
    """The arena in memory the caller owns (how an MPI window's memory becomes the host tier)."""

    def make_tier(self, capacity: int) -> HostTier:
        return HostTier(capacity, bytearray(capacity + 100))


def test_callers_buffer_holds_the_blocks_in_place():
    buf = bytearray(1 << 16)
    tier = HostTier(1 << 16, buf)
    bid = BlockId(bytes(range(32)))
    assert tier.allocate(bid, 5)
    tier.write(bid, memoryview(b"hello"))
    offset = offset_of(tier, tier.view(bid))
    assert bytes(buf[offset:offset + 5]) == b"hello"
    tier.close()
    assert len(buf) == 1 << 16  # not freed: the caller owns it


def test_callers_buffer_too_small_or_read_only_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        HostTier(1 << 16, bytearray(100))
    with pytest.raises(ValueError, match="writable"):
        HostTier(64, bytes(64))


def offset_of(tier: HostTier, view: memoryview) -> int:
    """Where in the arena a block's view starts."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data - tier.arena.ctypes.data


@pytest.fixture
def host():
    tier = HostTier(64 * 1024)
    yield tier
    tier.close()


def test_traits():
    t = HostTier.traits
    assert (t.name, t.memory, t.persistent, t.addressable) == ("host", True, False, True)


def test_capacity_rounds_down_to_alignment():
    tier = HostTier(10 * ALIGNMENT + 5)
    assert tier.capacity == 10 * ALIGNMENT
    assert tier.used == 0 and tier.largest_hole == 10 * ALIGNMENT
    tier.close()


def test_arena_space_is_reused_after_free(host: HostTier, hasher: Hasher, rng: np.random.Generator):
    a = store(host, hasher, rng.bytes(1000))
    offset = offset_of(host, host.view(a))
    host.free(a)
    assert host.used == 0
    data = rng.bytes(1000)
    b = store(host, hasher, data)
    assert offset_of(host, host.view(b)) == offset  # the freed range, not fresh space
    assert load(host, b) == data


def test_rounding_counts_in_used(host: HostTier, hasher: Hasher):
    bid = store(host, hasher, b"x")
    assert host.used == ALIGNMENT  # a 1-byte block takes one aligned slot
    assert host.size_of(bid) == 1  # but is 1 byte long


def test_blocks_are_aligned(host: HostTier, hasher: Hasher, rng: np.random.Generator):
    ids = [store(host, hasher, rng.bytes(n)) for n in (1, 63, 65, 100, 4097)]
    assert all(offset_of(host, host.view(bid)) % ALIGNMENT == 0 for bid in ids)


def test_view_is_the_block_in_place(host: HostTier, hasher: Hasher, rng: np.random.Generator):
    data = rng.bytes(300)
    bid = store(host, hasher, data)
    view = host.view(bid)
    assert view.nbytes == 300 and bytes(view) == data
    assert not view.readonly
    view[:3] = b"abc"  # writing through the view is writing the block: no copy in between
    assert load(host, bid) == b"abc" + data[3:]
    off = offset_of(host, view)
    assert host.arena[off:off + 3].tobytes() == b"abc"


def test_view_of_unknown_block_raises_key_error(host: HostTier, hasher: Hasher):
    with pytest.raises(KeyError):
        host.view(block_id(hasher, b"nothing here"))


def test_open_seconds_is_reported():
    tier = HostTier(1 << 20)
    assert isinstance(tier.open_seconds, float)
    assert 0 <= tier.open_seconds < 10
    tier.close()


def test_arena_is_zeroed_at_open():
    tier = HostTier(1 << 20)
    assert not tier.arena.any()
    tier.close()


def test_capacity_zero():
    tier = HostTier(0)
    assert tier.capacity == 0 and tier.used == 0 and tier.largest_hole == 0
    hasher = Hasher("blake3")
    assert tier.allocate(block_id(hasher, b"a"), 1) is False
    assert not tier.fits(1)
    assert list(tier.block_ids()) == []
    tier.close()


def test_capacity_zero_fits_agrees_with_allocate():
    # fits() is "could ever fit in this tier, empty": an empty tier that refuses a block
    # must not claim it fits
    tier = HostTier(0)
    bid = block_id(Hasher("blake3"), b"")
    assert tier.fits(0) == tier.allocate(bid, 0)
    tier.close()


def test_largest_hole_shows_fragmentation(hasher: Hasher, rng: np.random.Generator):
    tier = HostTier(4 * 1024)
    payloads = [rng.bytes(1024) for _ in range(4)]
    ids = [store(tier, hasher, data) for data in payloads]
    assert tier.largest_hole == 0
    tier.free(ids[0])
    tier.free(ids[2])
    assert tier.capacity - tier.used == 2048
    assert tier.largest_hole == 1024  # free space is split: fragmentation
    assert tier.allocate(block_id(hasher, b"big"), 2048) is False
    tier.free(ids[1])  # joins both neighbours into one hole
    assert tier.largest_hole == 3072
    big = rng.bytes(3072)
    bid = store(tier, hasher, big)
    assert load(tier, bid) == big
    assert load(tier, ids[3]) == payloads[3]  # the live neighbour is untouched
    tier.close()


def test_close_with_outstanding_view(hasher: Hasher):
    tier = HostTier(64 * 1024)
    bid = store(tier, hasher, b"held")
    view = tier.view(bid)
    tier.close()  # a caller's view keeps the mapping alive; close must not raise
    assert not tier.contains(bid) and list(tier.block_ids()) == []
    assert bytes(view) == b"held"


def test_fits_now_never_promises_room_fragmentation_does_not_have() -> None:
    from cascade_kv.tiers.allocator import ALIGNMENT

    tier = HostTier(8 * ALIGNMENT)
    try:
        ids = [bytes([i]) * 32 for i in range(8)]
        for bid in ids:
            assert tier.allocate(bid, ALIGNMENT)
        for bid in ids[::2]:  # four free slots, none next to another: 4 blocks fit, one of 2 slots does not
            tier.free(bid)
        assert tier.fits_now([ALIGNMENT] * 1) and not tier.fits_now([ALIGNMENT] * 2)
        assert not tier.fits_now([2 * ALIGNMENT])
        tier.free(ids[1])  # slots 0-2 join into one hole of three
        assert tier.fits_now([ALIGNMENT, 2 * ALIGNMENT - 1]) and not tier.fits_now([2 * ALIGNMENT, ALIGNMENT + 1])
    finally:
        tier.close()
