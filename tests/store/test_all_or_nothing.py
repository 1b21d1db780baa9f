"""put_many is all or nothing, side effects included: a batch that cannot fit raises CapacityError
before any block is demoted or dropped, and the store is left exactly as it was."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_kv import CapacityError, CascadeConfig, Store

from .conftest import BLOCK, HOST, KIB, block, check_consistent, snapshot, values

MIB = 1 << 20


def test_the_reported_batch_drops_nothing_before_failing(tmp_path):
    """6 x 1 MiB into a 1 MiB host tier over a 4 MiB disk: 5 MiB of room for 6 MiB of new blocks."""
    with Store(CascadeConfig(host_capacity=MIB, disk_path=tmp_path, disk_capacity=4 * MIB)) as store:
        store.put("old", np.full(MIB, 7, np.uint8))
        vals, before = values(store), snapshot(store)
        with pytest.raises(CapacityError, match=r"1048576 B.*5 of the call's 6 blocks"):
            store.put_many([f"k{i}" for i in range(6)], [np.full(MIB, 10 + i, np.uint8) for i in range(6)])
        assert snapshot(store) == before and values(store) == vals
        s = store.stats()
        assert s.drops == 0 and s.demotions == 0 and s.puts == 1
        # five fit (old is the cache's LRU block: dropping it for a put that fits is normal)
        store.put_many([f"k{i}" for i in range(5)], [np.full(MIB, 10 + i, np.uint8) for i in range(5)])
        assert len(store) == 5 and store.stats().drops == 1


def test_fragmented_memory_refuses_a_protected_batch_without_evicting(host_only):
    host_only.put("x", block(12 * KIB, seed=1))
    vals, before = values(host_only), snapshot(host_only)
    with pytest.raises(CapacityError, match="14336 B"):  # x evicted would leave two 12 KiB holes
        host_only.put_many(["a", "b", "c"], [block(20 * KIB, seed=2), block(20 * KIB, seed=3),
                                             block(14 * KIB, seed=4)], is_prefix=True)
    assert snapshot(host_only) == before and values(host_only) == vals


def test_a_demotion_the_disk_cannot_take_moves_nothing(make_store):
    store = make_store(disk_capacity=2 * BLOCK)
    for i in range(6):
        store.put(f"k{i}", block(8 * KIB, seed=i))
    store.put("keep", block(8 * KIB, seed=50))
    before = snapshot(store)
    with pytest.raises(CapacityError):
        store.demote([f"k{i}" for i in range(6)])
    assert snapshot(store) == before


# -------------------------------------------------------------------- generated batches
SIZES = [2 * KIB, 8 * KIB, 14 * KIB, 24 * KIB, HOST + 8 * KIB]
item = st.tuples(st.sampled_from("abcdefgh"), st.sampled_from(SIZES), st.integers(0, 3), st.booleans())


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(disk=st.sampled_from([None, HOST, 2 * HOST, 4 * HOST]), persist=st.booleans(),
       existing=st.lists(item, max_size=6), batch=st.lists(item, min_size=1, max_size=6))
def test_a_batch_either_fits_or_changes_nothing(tmp_path_factory, disk, persist, existing, batch):
    """Small bounded tiers, protected keys, dedup hits within the batch (same size and seed) and against
    stored blocks: every put_many either succeeds or leaves every key, byte, tier and counter as it was."""
    path = None if disk is None else tmp_path_factory.mktemp("disk")
    cfg = CascadeConfig(host_capacity=HOST, disk_path=path, disk_capacity=disk,
                        persist=persist and path is not None)
    with Store(cfg) as store:
        for key, nbytes, seed, prefix in existing:
            try:
                store.put(key, block(nbytes, seed=seed), is_prefix=prefix)
            except CapacityError:
                pass
        vals, before, stats = values(store), snapshot(store), store.stats()
        try:
            store.put_many([f"n{k}" for k, _, _, _ in batch], [block(n, seed=s) for _, n, s, _ in batch],
                           is_prefix=[p for _, _, _, p in batch])
        except CapacityError:
            after = store.stats()
            assert snapshot(store) == before and values(store) == vals
            assert (after.demotions, after.drops, after.puts) == (stats.demotions, stats.drops, stats.puts)
            assert [t.evictions for t in after.tiers] == [t.evictions for t in stats.tiers]
        else:
            for key, nbytes, seed, _ in {k: (k, n, s, p) for k, n, s, p in batch}.values():
                assert store.get(f"n{key}").tobytes() == block(nbytes, seed=seed).tobytes()
        check_consistent(store)
