"""SlotArena: the tier contract unchanged, plus the slot-header protocol peers rely on (no MPI here)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from cascade_kv.cluster.slots import (
    MAGIC,
    SLOT_HEADER,
    TOMBSTONE,
    SlotArena,
    digest16_of,
    expected_fields,
    fields_of,
    pack_header,
    unpack_header,
)
from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId
from cascade_kv.tiers import HostTier
from cascade_kv.tiers.allocator import ALIGNMENT
from tests.tiers.conformance import TierConformance, load, store
from tests.tiers.test_host import offset_of


class TestSlotArena(TierConformance):
    def make_tier(self, capacity: int) -> SlotArena:
        return SlotArena(capacity)


class TestSlotArenaOnCallersBuffer(TierConformance):
    def make_tier(self, capacity: int) -> SlotArena:
        return SlotArena(capacity, bytearray(capacity + 100))


@pytest.fixture
def slotted():
    tier = SlotArena(64 * 1024)
    yield tier
    tier.close()


def header_at(tier: SlotArena, offset: int):
    return unpack_header(memoryview(tier.arena), offset)


def test_write_publishes_a_header_in_front_of_the_bytes(slotted: SlotArena, hasher: Hasher,
                                                        rng: np.random.Generator):
    data = rng.bytes(1000)
    bid = store(slotted, hasher, data)
    offset, nbytes, generation = slotted.location(bid)
    assert offset % ALIGNMENT == 0 and nbytes == 1000 and generation > 0
    assert offset_of(slotted, slotted.view(bid)) == offset + SLOT_HEADER  # the bytes follow the header
    assert slotted.arena[offset + SLOT_HEADER:offset + SLOT_HEADER + 1000].tobytes() == data
    h = header_at(slotted, offset)
    assert (h.magic, h.generation, h.nbytes, h.digest16) == (MAGIC, generation, 1000, bid[:16])
    assert h.live
    assert fields_of(memoryview(slotted.arena), offset) == expected_fields(generation, 1000, digest16_of(bid))


def test_allocated_but_unwritten_block_is_not_readable(hasher: Hasher):
    buf = bytearray(4096)
    pack_header(memoryview(buf), 0, 7, 10, bytes(16))  # what an earlier block could have left there
    tier = SlotArena(4096, buf)
    bid = BlockId(hasher.digest(memoryview(b"x" * 10)))
    assert tier.allocate(bid, 10)
    offset, nbytes, generation = tier.location(bid)
    assert (offset, nbytes, generation) == (0, 10, TOMBSTONE)
    assert unpack_header(buf, 0).generation == TOMBSTONE
    tier.close()


def test_free_tombstones_before_the_range_is_reusable(slotted: SlotArena, hasher: Hasher,
                                                      rng: np.random.Generator):
    bid = store(slotted, hasher, rng.bytes(500))
    offset = slotted.location(bid)[0]
    seen = []

    class Spy:  # the host tier underneath, watched at the moment the range goes back to it
        def __init__(self, tier) -> None:
            self._tier = tier

        def __getattr__(self, name: str):
            return getattr(self._tier, name)

        def free(self, block_id: BlockId) -> None:
            seen.append(header_at(slotted, offset).generation)
            self._tier.free(block_id)

    slotted._tier = Spy(slotted._tier)  # type: ignore[assignment]
    slotted.free(bid)
    assert seen == [TOMBSTONE]
    assert header_at(slotted, offset).magic == MAGIC and not header_at(slotted, offset).live


def test_reused_slot_gets_a_new_generation(slotted: SlotArena, hasher: Hasher, rng: np.random.Generator):
    a = store(slotted, hasher, rng.bytes(4096))
    offset, _, gen_a = slotted.location(a)
    slotted.free(a)
    b = store(slotted, hasher, rng.bytes(4096))
    offset_b, _, gen_b = slotted.location(b)
    assert offset_b == offset and gen_b > gen_a  # same slot, another incarnation
    assert header_at(slotted, offset).digest16 == b[:16]


def test_generations_increase_and_a_rewrite_takes_a_new_one(slotted: SlotArena, hasher: Hasher,
                                                            rng: np.random.Generator):
    ids = [store(slotted, hasher, rng.bytes(100)) for _ in range(5)]
    gens = [slotted.location(bid)[2] for bid in ids]
    assert gens == sorted(gens) and len(set(gens)) == 5
    data = rng.bytes(100)
    slotted.write(ids[0], memoryview(data))  # same block, other bytes
    assert slotted.location(ids[0])[2] > gens[-1]
    assert load(slotted, ids[0]) == data


def test_seal_publishes_bytes_written_through_the_view(slotted: SlotArena, hasher: Hasher):
    bid = BlockId(hasher.digest(memoryview(b"abc")))
    assert slotted.allocate(bid, 3)
    slotted.view(bid)[:] = b"abc"  # how a tier-to-tier copy fills a block
    assert slotted.location(bid)[2] == TOMBSTONE
    generation = slotted.seal(bid)
    assert slotted.location(bid)[2] == generation > 0


def test_failed_write_keeps_the_header(slotted: SlotArena, hasher: Hasher, rng: np.random.Generator):
    bid = store(slotted, hasher, rng.bytes(100))
    before = slotted.location(bid)
    with pytest.raises(ValueError):
        slotted.write(bid, memoryview(rng.bytes(99)))
    assert slotted.location(bid) == before


def test_location_offsets_of_many_blocks(slotted: SlotArena, hasher: Hasher, rng: np.random.Generator):
    blocks = {}
    for n in (0, 1, 63, 64, 65, 3000):
        data = rng.bytes(n)
        blocks[store(slotted, hasher, data)] = data
    spans = []
    for bid, data in blocks.items():
        offset, nbytes, _ = slotted.location(bid)
        assert nbytes == len(data)
        assert slotted.arena[offset + SLOT_HEADER:offset + SLOT_HEADER + nbytes].tobytes() == data
        spans.append((offset, offset + SLOT_HEADER + nbytes))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))  # headers never overlap blocks


def test_capacity_and_used_leave_headers_out():
    tier = SlotArena(4096)
    assert tier.capacity == 4096 - SLOT_HEADER == tier.largest_hole
    assert tier.fits(tier.capacity) and not tier.fits(tier.capacity + 1)
    bid = BlockId(bytes(32))
    assert tier.allocate(bid, 1)
    assert tier.used == ALIGNMENT  # one aligned unit of bytes; the header is not counted
    tier.free(bid)
    assert tier.used == 0
    assert SlotArena(SLOT_HEADER - 1).capacity == 0
    tier.close()


def test_the_host_tier_underneath_writes_nothing_but_the_bytes(hasher: Hasher):
    buf = bytearray(4096)
    tier = HostTier(4096, buf)
    assert tier.capacity == 4096 and not hasattr(tier, "seal") and not hasattr(tier, "location")
    bid = store(tier, hasher, b"\x01" * 100)
    assert offset_of(tier, tier.view(bid)) == 0  # the block's bytes start the arena: no header
    assert buf[:100] == b"\x01" * 100 and not any(buf[100:])
    tier.free(bid)
    assert buf[:100] == b"\x01" * 100  # free writes nothing
    tier.close()


def test_expected_fields_refuses_the_tombstone_and_short_digests():
    with pytest.raises(ValueError):
        expected_fields(TOMBSTONE, 10, bytes(16))
    with pytest.raises(ValueError):
        expected_fields(1, 10, bytes(15))


def test_room_model_and_fits_now_count_the_headers():
    """The what-if room is the host tier's, with a header added to every block: exact, fragmentation included."""
    tier = SlotArena(4096)
    room = tier.room_model()
    a, b = BlockId(bytes(32)), BlockId(bytes([1]) * 32)
    assert tier.fits_now([tier.capacity]) and not tier.fits_now([tier.capacity, 0])
    assert room.allocate(a, tier.capacity) and not room.allocate(b, 0)  # b's header alone does not fit
    room.free(a, tier.capacity)
    assert room.allocate(b, 0)
    assert tier.used == 0 and tier.largest_hole == tier.capacity  # the model changed nothing in the arena
    tier.close()
