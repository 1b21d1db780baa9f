"""Semantic eviction: prefix blocks stay in memory while anything unprotected can go instead."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cascade_kv import CapacityError

from .conftest import BLOCK, HOST, KIB, block, same, snapshot, values


def _fill(store, n, seed=1000, prefix="fill"):
    for i in range(n):
        store.put(f"{prefix}{i}", block(seed=seed + i))


def test_prefix_blocks_stay_in_memory_under_pressure(store):
    for i in range(4):
        store.put(f"p{i}", block(seed=i), is_prefix=True)
    _fill(store, 20)
    s = store.stats()
    assert s.protected_blocks == 4 and s.protected_in_memory == 4
    assert s.demotions >= 16 and s.drops == 0
    for i in range(4):
        assert "host" in store.info(f"p{i}").tiers
        assert store.info(f"p{i}").prefix
        assert same(store.get(f"p{i}"), block(seed=i))
    for i in range(20):
        assert same(store.get(f"fill{i}"), block(seed=1000 + i))


def test_prefix_blocks_outlive_hotter_unprotected_blocks(store):
    """Protection beats recency: the prefix blocks are the least recently used, yet they stay."""
    store.put("p", block(seed=1), is_prefix=True)
    _fill(store, 7)
    for _ in range(3):
        for i in range(7):
            store.get(f"fill{i}")
    store.put("new", block(seed=2))
    assert "host" in store.info("p").tiers
    assert store.stats().demotions == 1


def test_unprotect_lets_a_block_be_demoted(store):
    store.put("p", block(seed=1), is_prefix=True)
    store.unprotect("p")
    assert not store.info("p").prefix and store.stats().protected_blocks == 0
    _fill(store, 8)
    assert store.info("p").tiers == ("disk",)
    assert same(store.get("p"), block(seed=1))


def test_protect_brings_a_demoted_block_back_into_memory(store):
    store.put("a", block(seed=1))
    _fill(store, 8)
    assert store.info("a").tiers == ("disk",)
    store.protect("a")
    assert store.info("a").prefix and "host" in store.info("a").tiers
    _fill(store, 8, seed=2000, prefix="more")
    assert "host" in store.info("a").tiers
    assert store.stats().protected_in_memory == store.stats().protected_blocks == 1
    assert same(store.get("a"), block(seed=1))


def test_protect_and_unprotect_are_idempotent(store):
    store.put("a", block(seed=1))
    store.protect("a")
    store.protect("a")
    assert store.stats().protected_blocks == 1
    store.unprotect("a")
    store.unprotect("a")
    assert store.stats().protected_blocks == 0
    _fill(store, 8)
    assert store.info("a").tiers == ("disk",)


def test_block_stays_protected_while_any_of_its_keys_is_a_prefix(store):
    a = block(seed=1)
    store.put("p1", a, is_prefix=True)
    store.put("p2", a.copy(), is_prefix=True)
    store.put("u", a.copy())
    assert store.stats().protected_blocks == 1
    store.unprotect("p1")
    _fill(store, 10)
    assert "host" in store.info("u").tiers  # p2 still protects the shared block
    store.delete("p2")
    assert store.stats().protected_blocks == 0
    _fill(store, 10, seed=3000, prefix="more")
    assert store.info("u").tiers == ("disk",)
    assert same(store.get("u"), a) and same(store.get("p1"), a)
    assert not store.info("p1").prefix


def test_prefix_put_of_bytes_that_live_on_disk_brings_them_into_memory(store):
    a = block(seed=1)
    store.put("u", a)
    _fill(store, 8)
    assert store.info("u").tiers == ("disk",)
    store.put("p", a.copy(), is_prefix=True)
    assert store.stats().dedup_hits == 1
    assert "host" in store.info("p").tiers
    assert store.stats().protected_in_memory == 1


def test_overwriting_a_prefix_key_with_unprotected_bytes_releases_protection(store):
    store.put("k", block(seed=1), is_prefix=True)
    store.put("k", block(seed=2))
    assert store.stats().protected_blocks == 0 and not store.info("k").prefix
    store.put("k", block(seed=2), is_prefix=True)  # same bytes, now protected: a dedup hit that protects
    assert store.stats().protected_blocks == 1 and store.info("k").prefix


def test_deleting_a_prefix_key_frees_its_memory(store):
    store.put("p", block(seed=1), is_prefix=True)
    store.delete("p")
    s = store.stats()
    assert s.protected_blocks == 0 and s.tier("host").used_bytes == 0


def _full_of_prefixes(store):
    for i in range(HOST // BLOCK):
        store.put(f"p{i}", block(seed=i), is_prefix=True)
    assert store.stats().tier("host").used_bytes == HOST


def test_protected_put_that_cannot_fit_raises_and_changes_nothing(store):
    _full_of_prefixes(store)
    store.put("u", block(seed=50))  # unprotected: goes to disk
    vals, before = values(store), snapshot(store)
    with pytest.raises(CapacityError) as err:
        store.put("p-new", block(seed=99), is_prefix=True)
    msg = str(err.value)
    assert str(BLOCK) in msg and str(HOST) in msg, msg  # names the sizes
    assert "p-new" not in store
    assert snapshot(store) == before and values(store) == vals
    store.put("ok", block(seed=98))  # still usable


def test_protected_put_fails_with_unprotected_memory_too_small(store):
    """Memory holds 6 protected blocks and 2 unprotected ones; 3 more protected blocks cannot fit even
    after demoting every unprotected block: refused before anything moves (nothing is demoted)."""
    for i in range(6):
        store.put(f"p{i}", block(seed=i), is_prefix=True)
    store.put_many(["u0", "u1"], [block(seed=40), block(seed=41)])
    vals, before = values(store), snapshot(store)
    with pytest.raises(CapacityError):
        store.put_many(["n0", "n1", "n2"], [block(seed=60), block(seed=61), block(seed=62)], is_prefix=True)
    assert snapshot(store) == before and values(store) == vals
    assert store.stats().demotions == 0


def test_protect_that_cannot_fit_raises_and_changes_nothing(store):
    store.put("u", block(seed=50))
    _fill(store, 8)
    _full_of_prefixes(store)
    assert store.info("u").tiers == ("disk",)
    before = snapshot(store)
    with pytest.raises(CapacityError):
        store.protect("u")
    assert not store.info("u").prefix
    assert snapshot(store) == before
    assert same(store.get("u"), block(seed=50))


def test_unprotected_put_goes_to_disk_when_memory_holds_only_prefixes(store):
    _full_of_prefixes(store)
    store.put("u", block(seed=50))
    assert store.info("u").tiers == ("disk",)
    assert store.stats().protected_in_memory == HOST // BLOCK
    assert same(store.get("u"), block(seed=50))


def test_unprotected_put_without_disk_raises_when_memory_holds_only_prefixes(host_only):
    _full_of_prefixes(host_only)
    before = snapshot(host_only)
    with pytest.raises(CapacityError):
        host_only.put("u", block(seed=50))
    assert snapshot(host_only) == before


def test_unprotected_put_without_disk_that_cannot_fit_drops_nothing(host_only):
    """40 KiB protected + 16 KiB unprotected in a 64 KiB memory-only store: a 32 KiB block can never
    fit, so the put must fail without dropping the unprotected blocks first."""
    for i in range(5):
        host_only.put(f"p{i}", block(seed=i), is_prefix=True)
    host_only.put_many(["u0", "u1"], [block(seed=10), block(seed=11)])
    vals, before = values(host_only), snapshot(host_only)
    with pytest.raises(CapacityError):
        host_only.put("big", block(32 * KIB, seed=12))
    assert snapshot(host_only) == before and values(host_only) == vals


def test_prefix_block_larger_than_memory_is_refused_even_with_a_disk(store):
    before = snapshot(store)
    with pytest.raises(CapacityError, match=str(HOST + BLOCK)):
        store.put("huge", block(HOST + BLOCK, seed=1), is_prefix=True)
    assert snapshot(store) == before
    store.put("huge", block(HOST + BLOCK, seed=1))  # unprotected: it lives on disk
    assert store.info("huge").tiers == ("disk",)


def test_batch_places_protected_blocks_before_unprotected_ones(store):
    """One batch: 24 KiB unprotected + 48 KiB protected in an empty 64 KiB host. Both fit the store
    (the unprotected block can live on disk), so the batch must succeed."""
    store.put_many(["u", "p"], [block(24 * KIB, seed=1), block(48 * KIB, seed=2)], is_prefix=[False, True])
    assert "host" in store.info("p").tiers
    assert same(store.get("u"), block(24 * KIB, seed=1)) and same(store.get("p"), block(48 * KIB, seed=2))


def test_protected_duplicates_in_one_batch_need_memory_once(store):
    a = block(40 * KIB, seed=1)
    store.put_many(["p1", "p2"], [a, a.copy()], is_prefix=True)
    s = store.stats()
    assert s.protected_blocks == 1 and s.protected_in_memory == 1 and s.dedup_hits == 1


def test_semantic_eviction_off_is_plain_lru(make_store):
    store = make_store(semantic_eviction=False)
    store.put("p", block(seed=1), is_prefix=True)
    _fill(store, 8)
    assert store.info("p").tiers == ("disk",)
    assert store.info("p").prefix  # the flag is recorded, only ignored
    assert same(store.get("p"), block(seed=1))


def test_capacity_error_message_names_tier_sizes(store):
    _full_of_prefixes(store)
    with pytest.raises(CapacityError) as err:
        store.put("x", block(seed=77), is_prefix=True)
    numbers = {int(n) for n in re.findall(r"\d+", str(err.value))}
    assert BLOCK in numbers and HOST in numbers
    assert isinstance(err.value, MemoryError)


def test_prefix_flags_per_key_in_a_batch(store):
    store.put_many(["a", "b", "c"], [block(seed=1), block(seed=2), block(seed=3)], is_prefix=[True, False, True])
    assert [store.info(k).prefix for k in "abc"] == [True, False, True]
    assert store.stats().protected_blocks == 2
    with pytest.raises(ValueError):
        store.put_many(["d", "e"], [block(seed=4), block(seed=5)], is_prefix=[True])
    with pytest.raises(ValueError):
        store.put_many(["d"], [block(seed=4)], is_prefix=["yes"])
    assert "d" not in store and "e" not in store


def test_protected_in_memory_after_mixed_workload(store):
    rng = np.random.default_rng(0)
    for i in range(40):
        store.put(f"k{i % 12}", block(seed=int(rng.integers(0, 20))), is_prefix=bool(i % 5 == 0))
        if i % 7 == 0:
            store.get(f"k{int(rng.integers(0, i % 12 + 1))}")
    s = store.stats()
    assert s.protected_in_memory == s.protected_blocks
    for k in store.keys():
        if store.info(k).prefix:
            assert "host" in store.info(k).tiers


@pytest.mark.parametrize("disk_capacity", [None, 4 * BLOCK])
def test_protect_that_can_never_fit_moves_and_drops_nothing(make_store, disk_capacity):
    """7 protected blocks and one unprotected block fill the host tier; protecting a 16 KiB block can
    never fit, so nothing may be demoted (or, over a bounded disk, dropped) before the refusal."""
    store = make_store(disk_capacity=disk_capacity)
    store.put("u", block(2 * BLOCK, seed=1))
    store.put_many(["x", "y"], [block(seed=2), block(seed=3)])
    for i in range(7):
        store.put(f"p{i}", block(seed=10 + i), is_prefix=True)
    store.put("d", block(seed=20))
    vals, before = values(store), snapshot(store)
    demotions = store.stats().demotions
    with pytest.raises(CapacityError):
        store.protect("u")
    assert snapshot(store) == before and values(store) == vals
    assert store.stats().demotions == demotions
