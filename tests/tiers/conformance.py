"""The contract every tier keeps (see :mod:`cascade_kv.tiers.base`), as one test class.

A tier's test module subclasses :class:`TierConformance` and implements
:meth:`~TierConformance.make_tier`; every test here then runs against that tier.
Block ids are real digests of the bytes, so tiers that verify what they read
(the disk tier) are tested on the same footing as those that do not.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId
from cascade_kv.tiers import Tier, TierTraits

MiB = 1 << 20
CAPACITY = 4 * MiB  # room for the largest round-trip block (1 MiB + 3) several times over
ROUND_TRIP_SIZES = [0, 1, 63, 64, 4096, MiB + 3]


def block_id(hasher: Hasher, data: bytes | bytearray | memoryview) -> BlockId:
    """The id a dedup store gives these bytes: their digest."""
    return BlockId(hasher.digest(memoryview(data)))


def store(tier: Tier, hasher: Hasher, data: bytes) -> BlockId:
    """Allocate and write ``data`` as one block; its id."""
    bid = block_id(hasher, data)
    assert tier.allocate(bid, len(data)), f"no room for {len(data)} B in {tier!r}"
    tier.write(bid, memoryview(data))
    return bid


def load(tier: Tier, bid: BlockId) -> bytes:
    """The block's bytes, read into a fresh buffer of its size."""
    out = bytearray(tier.size_of(bid))
    tier.read_into(bid, memoryview(out))
    return bytes(out)


class TierConformance:
    """Generic contract tests; subclasses provide :meth:`make_tier`."""

    hash_algorithm = "blake3"

    def make_tier(self, capacity: int) -> Tier:
        """A fresh, empty tier that may hold ``capacity`` bytes (``self.tmp_path`` is free to use)."""
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    def _workspace(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.hasher = Hasher(self.hash_algorithm)
        self._opened: list[Tier] = []
        yield
        for t in reversed(self._opened):
            t.close()

    def open_tier(self, capacity: int = CAPACITY) -> Tier:
        tier = self.make_tier(capacity)
        self._opened.append(tier)
        return tier

    def unique_blocks(self, rng: np.random.Generator, sizes: list[int]) -> list[tuple[BlockId, bytes]]:
        """Random blocks of ``sizes`` with distinct ids (a repeated short payload is redrawn)."""
        seen: set[BlockId] = set()
        blocks = []
        for n in sizes:
            while True:
                data = rng.bytes(n)
                bid = block_id(self.hasher, data)
                if bid not in seen:
                    break
                assert n < 4, "only tiny payloads can repeat"
                n += 1  # every 0- to 3-byte value may already be taken
            seen.add(bid)
            blocks.append((bid, data))
        return blocks

    # -- identity -----------------------------------------------------------------------------
    def test_declares_traits(self):
        tier = self.open_tier()
        assert isinstance(tier.traits, TierTraits)
        assert tier.traits.name
        assert tier.traits.name in repr(tier)

    def test_starts_empty(self):
        tier = self.open_tier()
        assert tier.used == 0
        assert list(tier.block_ids()) == []

    # -- data ---------------------------------------------------------------------------------
    @pytest.mark.parametrize("nbytes", ROUND_TRIP_SIZES)
    def test_round_trip(self, nbytes: int, rng: np.random.Generator):
        tier = self.open_tier()
        data = rng.bytes(nbytes)
        bid = store(tier, self.hasher, data)
        assert load(tier, bid) == data
        assert load(tier, bid) == data  # a second read sees the same bytes

    def test_write_accepts_typed_source(self):
        tier = self.open_tier()
        arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        data = arr.tobytes()
        bid = block_id(self.hasher, data)
        assert tier.allocate(bid, arr.nbytes)
        tier.write(bid, memoryview(arr))
        assert load(tier, bid) == data

    def test_read_into_accepts_typed_buffer(self):
        # read_into asks only for a writable buffer of the block's size, as write asks only for
        # C-contiguous bytes: a typed (numpy) buffer is filled byte for byte
        tier = self.open_tier()
        src = np.arange(24, dtype=np.float32)
        bid = store(tier, self.hasher, src.tobytes())
        out = np.zeros(24, dtype=np.float32)
        tier.read_into(bid, memoryview(out))
        np.testing.assert_array_equal(out, src)

    def test_read_into_numpy_byte_view(self, rng: np.random.Generator):
        tier = self.open_tier()
        data = rng.bytes(1000)
        bid = store(tier, self.hasher, data)
        out = np.empty(1000, dtype=np.uint8)
        tier.read_into(bid, memoryview(out))
        assert out.tobytes() == data

    @pytest.mark.parametrize("delta", [-1, 1])
    def test_read_into_wrong_size_buffer_raises_value_error(self, delta: int, rng: np.random.Generator):
        tier = self.open_tier()
        data = rng.bytes(100)
        bid = store(tier, self.hasher, data)
        with pytest.raises(ValueError):
            tier.read_into(bid, memoryview(bytearray(100 + delta)))
        assert load(tier, bid) == data

    @pytest.mark.parametrize("delta", [-1, 1])
    def test_write_wrong_size_source_raises_value_error(self, delta: int, rng: np.random.Generator):
        tier = self.open_tier()
        data = rng.bytes(100)
        bid = store(tier, self.hasher, data)
        with pytest.raises(ValueError):
            tier.write(bid, memoryview(rng.bytes(100 + delta)))
        assert load(tier, bid) == data  # the failed write changed nothing

    def test_read_many_write_many(self, rng: np.random.Generator):
        tier = self.open_tier()
        blocks = self.unique_blocks(rng, [0, 1, 100, 4096, 5000])
        ids = [bid for bid, _ in blocks]
        for bid, data in blocks:
            assert tier.allocate(bid, len(data))
        tier.write_many(ids, [memoryview(data) for _, data in blocks])
        outs = [bytearray(len(data)) for _, data in blocks]
        tier.read_many(ids, [memoryview(o) for o in outs])
        assert [bytes(o) for o in outs] == [data for _, data in blocks]

    def test_batch_length_mismatch_raises_value_error(self, rng: np.random.Generator):
        tier = self.open_tier()
        (bid, data), = self.unique_blocks(rng, [10])
        assert tier.allocate(bid, 10)
        with pytest.raises(ValueError):
            tier.write_many([bid, bid], [memoryview(data)])
        tier.write(bid, memoryview(data))
        with pytest.raises(ValueError):
            tier.read_many([bid], [memoryview(bytearray(10)), memoryview(bytearray(10))])

    # -- room ---------------------------------------------------------------------------------
    def test_allocate_false_when_full_true_after_free(self, rng: np.random.Generator):
        tier = self.open_tier(64 * 1024)
        cap = tier.capacity
        assert cap is not None and cap > 0
        big = store(tier, self.hasher, rng.bytes(cap))
        (small, data), = self.unique_blocks(rng, [1])
        assert tier.allocate(small, 1) is False
        assert not tier.contains(small)  # a refused allocation leaves no trace
        assert tier.used == cap
        assert tier.contains(big)  # and evicts nothing
        tier.free(big)
        assert tier.allocate(small, 1) is True
        tier.write(small, memoryview(data))
        assert load(tier, small) == data

    def test_fits(self):
        tier = self.open_tier(64 * 1024)
        cap = tier.capacity
        assert cap is not None
        assert tier.fits(0) and tier.fits(1) and tier.fits(cap)
        assert not tier.fits(cap + 1)

    @pytest.mark.parametrize("nbytes", [0, 1, 64 * 1024])
    def test_empty_tier_allocates_what_fits(self, nbytes: int, rng: np.random.Generator):
        tier = self.open_tier(64 * 1024)
        nbytes = min(nbytes, tier.capacity)
        (bid, _), = self.unique_blocks(rng, [nbytes])
        assert tier.fits(nbytes)
        assert tier.allocate(bid, nbytes) is True

    def test_used_accounting(self, rng: np.random.Generator):
        tier = self.open_tier()
        blocks = self.unique_blocks(rng, [0, 1, 63, 64, 65, 4096, 10_000])
        used = [tier.used]
        for bid, data in blocks:
            assert tier.allocate(bid, len(data))
            assert tier.used >= used[-1] + len(data)  # at least the bytes, plus any rounding
            used.append(tier.used)
        assert tier.used >= sum(len(d) for _, d in blocks)
        assert tier.capacity is None or tier.used <= tier.capacity
        for bid, _ in reversed(blocks):
            tier.free(bid)
            used.pop()
            assert tier.used == used[-1]  # freeing gives back exactly what allocating took
        assert tier.used == 0

    # -- bookkeeping --------------------------------------------------------------------------
    def test_contains_size_of_block_ids(self, rng: np.random.Generator):
        tier = self.open_tier()
        blocks = self.unique_blocks(rng, [0, 7, 300])
        for bid, data in blocks:
            assert not tier.contains(bid)
            with pytest.raises(KeyError):
                tier.size_of(bid)
            assert tier.allocate(bid, len(data))
            assert tier.contains(bid)  # allocated counts as held, before any write
            assert tier.size_of(bid) == len(data)
        assert sorted(tier.block_ids()) == sorted(bid for bid, _ in blocks)
        tier.free(blocks[1][0])
        assert not tier.contains(blocks[1][0])
        assert sorted(tier.block_ids()) == sorted([blocks[0][0], blocks[2][0]])

    def test_block_ids_is_a_snapshot(self, rng: np.random.Generator):
        tier = self.open_tier()
        blocks = self.unique_blocks(rng, [10] * 6)
        for bid, _ in blocks[:3]:
            assert tier.allocate(bid, 10)
        ids = tier.block_ids()
        for bid, _ in blocks[3:]:
            assert tier.allocate(bid, 10)  # changing the tier while iterating does not break it
        tier.free(blocks[0][0])
        assert sorted(ids) == sorted(bid for bid, _ in blocks[:3])

    def test_free_unknown_id_raises_key_error(self, rng: np.random.Generator):
        tier = self.open_tier()
        (bid, data), = self.unique_blocks(rng, [10])
        with pytest.raises(KeyError):
            tier.free(bid)
        store(tier, self.hasher, data)
        tier.free(bid)
        with pytest.raises(KeyError):
            tier.free(bid)  # freeing twice is freeing an unknown id
        assert tier.used == 0

    def test_double_allocate_raises_key_error(self, rng: np.random.Generator):
        tier = self.open_tier()
        data = rng.bytes(100)
        bid = store(tier, self.hasher, data)
        used = tier.used
        with pytest.raises(KeyError):
            tier.allocate(bid, 100)
        with pytest.raises(KeyError):
            tier.allocate(bid, 200)
        assert tier.used == used and tier.size_of(bid) == 100
        assert load(tier, bid) == data  # the live block is untouched

    def test_freed_block_is_gone(self, rng: np.random.Generator):
        tier = self.open_tier()
        data = rng.bytes(256)
        bid = store(tier, self.hasher, data)
        tier.free(bid)
        assert not tier.contains(bid)
        assert bid not in set(tier.block_ids())
        with pytest.raises(KeyError):
            tier.read_into(bid, memoryview(bytearray(256)))
        # the id can be stored again, and then holds its bytes again
        assert store(tier, self.hasher, data) == bid
        assert load(tier, bid) == data

    def test_serial_block_ids(self, rng: np.random.Generator):
        # with dedup off, a block id is the digest followed by an 8-byte serial
        tier = self.open_tier()
        data = rng.bytes(500)
        digest = block_id(self.hasher, data)
        ids = [BlockId(digest + i.to_bytes(8, "big")) for i in range(3)]
        for bid in ids:
            assert tier.allocate(bid, len(data))
            tier.write(bid, memoryview(data))
        tier.free(ids[1])
        assert load(tier, ids[0]) == data and load(tier, ids[2]) == data

    # -- many blocks --------------------------------------------------------------------------
    def test_random_sizes_no_crosstalk(self, rng: np.random.Generator):
        tier = self.open_tier(1 * MiB)
        sizes = [int(s) for s in rng.integers(0, 20_000, size=40)] + [0, 1, 63, 64, 65]
        live = dict(self.unique_blocks(rng, sizes))
        for bid, data in live.items():
            assert tier.allocate(bid, len(data))
            tier.write(bid, memoryview(data))
        # free every other block and fill the holes with new ones, so neighbours are fresh writes
        for bid in list(live)[::2]:
            tier.free(bid)
            del live[bid]
        for bid, data in self.unique_blocks(rng, [int(s) for s in rng.integers(0, 10_000, size=20)]):
            if tier.allocate(bid, len(data)):
                tier.write(bid, memoryview(data))
                live[bid] = data
        for bid, data in live.items():
            assert load(tier, bid) == data
        assert sorted(tier.block_ids()) == sorted(live)

    # each subclass runs this with its own tier on purpose (differing executors), and every example
    # opens a fresh tier itself rather than reusing the function-scoped workspace's
    @settings(max_examples=15, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors])
    @given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12), seed=st.integers(0, 2**32 - 1))
    def test_any_sizes_round_trip(self, sizes: list[int], seed: int):
        tier = self.open_tier(64 * 1024)
        blocks = self.unique_blocks(np.random.default_rng(seed), sizes)
        for _, data in blocks:
            store(tier, self.hasher, data)
        for bid, data in blocks:
            assert load(tier, bid) == data
        for bid, _ in blocks:
            tier.free(bid)
        assert tier.used == 0

    # -- threads ------------------------------------------------------------------------------
    def test_concurrent_reads_and_writes_of_different_blocks(self, rng: np.random.Generator):
        tier = self.open_tier()
        n_threads, rounds = 4, 6
        shared = self.unique_blocks(rng, [3000, 70_000])
        for _, data in shared:
            store(tier, self.hasher, data)
        own = [self.unique_blocks(rng, [int(s) for s in rng.integers(1, 50_000, size=rounds)])
               for _ in range(n_threads)]
        barrier = threading.Barrier(n_threads)
        errors: list[BaseException] = []

        def worker(mine: list[tuple[BlockId, bytes]]) -> None:
            try:
                barrier.wait()
                for bid, data in mine:
                    assert tier.allocate(bid, len(data))
                    tier.write(bid, memoryview(data))
                    for sid, sdata in shared:
                        assert load(tier, sid) == sdata
                    assert load(tier, bid) == data
                for i, (bid, data) in enumerate(mine):
                    assert load(tier, bid) == data
                    if i % 2:
                        tier.free(bid)
            except BaseException as e:  # reported on the main thread below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(mine,)) for mine in own]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for mine in own:
            for i, (bid, data) in enumerate(mine):
                assert tier.contains(bid) == (i % 2 == 0)
                if i % 2 == 0:
                    assert load(tier, bid) == data
