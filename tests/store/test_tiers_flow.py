"""How blocks move between tiers: demotion (not loss), promotion, drops only from a full last tier."""
from __future__ import annotations

import pytest

from cascade_kv import BlockNotFound
from cascade_kv.hashing import Hasher

from .conftest import BLOCK, HOST, KIB, block, same

SLOTS = HOST // BLOCK  # blocks the host tier holds


def _put_range(store, n, start=0, **kw):
    for i in range(start, start + n):
        store.put(f"k{i}", block(seed=i), **kw)


def test_a_full_host_tier_demotes_its_lru_blocks_to_disk(store):
    _put_range(store, 2 * SLOTS)
    s = store.stats()
    assert s.demotions == SLOTS and s.drops == 0 and s.keys == 2 * SLOTS
    assert s.tier("host").blocks == SLOTS and s.tier("host").used_bytes == HOST
    assert s.tier("disk").blocks == SLOTS and s.tier("disk").used_bytes == SLOTS * BLOCK
    assert s.tier("host").evictions == SLOTS
    for i in range(SLOTS):
        assert store.info(f"k{i}").tiers == ("disk",)
        assert store.tiers[1].path(bytes.fromhex(store.info(f"k{i}").digest)).is_file()
    for i in range(SLOTS, 2 * SLOTS):
        assert store.info(f"k{i}").tiers == ("host",)
    for i in range(2 * SLOTS):
        assert same(store.get(f"k{i}"), block(seed=i))


def test_victims_are_least_recently_used(make_store):
    store = make_store(locality_aware=False)
    _put_range(store, SLOTS)
    store.get("k0")  # k0 becomes the most recently used; k1 is now the LRU block
    store.put("new", block(seed=99))
    assert "host" in store.info("k0").tiers
    assert store.info("k1").tiers == ("disk",)


def test_a_dedup_hit_counts_as_a_use(make_store):
    store = make_store(locality_aware=False)
    _put_range(store, SLOTS)
    store.put("again", block(seed=0))  # the bytes of k0: a hit that refreshes k0's block
    store.put("new", block(seed=99))
    assert "host" in store.info("k0").tiers
    assert store.info("k1").tiers == ("disk",)


def test_hits_and_misses_are_counted_per_tier(store):
    _put_range(store, SLOTS + 1)  # k0 is on disk
    store.get("k5")
    store.get("k0")
    with pytest.raises(BlockNotFound):
        store.get("nope")
    with pytest.raises(KeyError):
        store.get_many(["k1", "nope"])
    s = store.stats()
    assert s.tier("host").hits == 1 and s.tier("disk").hits == 1 and s.hits == 2
    assert s.tier("host").misses == 1 and s.tier("disk").misses == 0  # k0 went past the host tier
    assert s.tier("host").bytes_read == BLOCK and s.tier("disk").bytes_read == BLOCK
    assert s.misses == 2 and s.gets == 2


def test_a_block_read_from_disk_threshold_times_is_promoted(make_store):
    store = make_store(promotion_threshold=3)  # the seed's threshold: reads below it leave the block on disk
    _put_range(store, SLOTS + 1)
    assert store.info("k0").tiers == ("disk",)
    for _ in range(2):
        assert same(store.get("k0"), block(seed=0))
        assert store.info("k0").tiers == ("disk",)
    assert store.stats().promotions == 0
    assert same(store.get("k0"), block(seed=0))  # third read: promoted
    s = store.stats()
    assert s.promotions == 1 and store.info("k0").tiers == ("host", "disk")
    assert s.demotions == 2  # making room for it demoted the LRU block
    assert store.info("k1").tiers == ("disk",)
    hits = s.tier("host").hits
    assert same(store.get("k0"), block(seed=0))
    assert store.stats().tier("host").hits == hits + 1
    for i in range(SLOTS + 1):
        assert same(store.get(f"k{i}"), block(seed=i))


def test_a_promoted_block_keeps_its_disk_copy_and_demotes_for_free(make_store):
    store = make_store(promotion_threshold=1, eviction_order="lru")  # reuse credit would keep k0 longer
    _put_range(store, SLOTS + 1)
    store.get("k0")
    assert store.info("k0").tiers == ("host", "disk")
    demotions = store.stats().demotions
    _put_range(store, SLOTS, start=100)  # pushes k0 out of the host tier again
    assert store.info("k0").tiers == ("disk",)
    assert store.stats().demotions == demotions + SLOTS - 1  # k0 itself was not copied again
    assert same(store.get("k0"), block(seed=0))


def test_promotion_is_off_when_locality_aware_is_false(make_store):
    store = make_store(locality_aware=False, promotion_threshold=1)
    _put_range(store, SLOTS + 1)
    for _ in range(5):
        assert same(store.get("k0"), block(seed=0))
    assert store.info("k0").tiers == ("disk",) and store.stats().promotions == 0


def test_promotion_threshold_counts_batch_reads(make_store):
    store = make_store(promotion_threshold=2)
    _put_range(store, SLOTS + 1)
    store.get_many(["k0", "k5"])
    assert store.info("k0").tiers == ("disk",)
    store.get_many(["k0"])
    assert "host" in store.info("k0").tiers


def test_no_promotion_into_a_host_full_of_prefixes(make_store):
    store = make_store(promotion_threshold=1)
    store.put("u", block(seed=1))
    _put_range(store, SLOTS, start=10, is_prefix=True)
    assert store.info("u").tiers == ("disk",)
    for _ in range(3):
        assert same(store.get("u"), block(seed=1))
    assert store.info("u").tiers == ("disk",) and store.stats().promotions == 0


def test_a_block_larger_than_the_host_tier_lives_on_disk(store):
    big = block(HOST + KIB, seed=1)
    store.put("big", big)
    assert store.info("big").tiers == ("disk",)
    store.put("small", block(seed=2))
    for _ in range(4):
        assert same(store.get("big"), big)  # never promoted: it cannot fit
    assert store.info("big").tiers == ("disk",)


def test_a_full_disk_drops_its_lru_blocks_and_counts_them(make_store):
    store = make_store(host_capacity=2 * BLOCK, disk_capacity=4 * BLOCK)
    _put_range(store, 8)
    s = store.stats()
    assert s.drops == 2 and s.dropped_bytes == 2 * BLOCK
    assert s.keys == 6 and s.demotions == 6
    assert s.tier("disk").used_bytes == 4 * BLOCK and s.tier("host").used_bytes == 2 * BLOCK
    for i in (0, 1):
        assert f"k{i}" not in store
        with pytest.raises(BlockNotFound):
            store.get(f"k{i}")
        assert not any(p.name == block_file(store, i) for p in store.tiers[1].root.rglob("*"))
    for i in range(2, 8):
        assert same(store.get(f"k{i}"), block(seed=i))


def block_file(store, seed):
    return Hasher(store.config.hash_algorithm).digest(memoryview(block(seed=seed))).hex()


def test_dropping_a_shared_block_removes_every_key_and_counts_once(make_store):
    store = make_store(host_capacity=BLOCK, disk_capacity=BLOCK)
    store.put_many(["a", "b"], [block(seed=1), block(seed=1)])
    store.put("c", block(seed=2))  # a/b's block goes to disk
    store.put("d", block(seed=3))  # c to disk pushes a/b's block out of the last tier
    assert "a" not in store and "b" not in store
    s = store.stats()
    assert s.drops == 1 and s.dropped_bytes == BLOCK and s.keys == 2


def test_without_disk_host_victims_are_dropped_and_counted(host_only):
    host_only.put("p", block(seed=100), is_prefix=True)
    _put_range(host_only, 12)
    s = host_only.stats()
    assert s.drops == 5 and s.dropped_bytes == 5 * BLOCK and s.demotions == 0
    assert s.keys == 8 and "p" in host_only
    assert sorted(host_only.keys()) == sorted(["p"] + [f"k{i}" for i in range(5, 12)])
    for i in range(5, 12):
        assert same(host_only.get(f"k{i}"), block(seed=i))


def test_prefix_blocks_are_never_dropped_by_a_full_disk(make_store):
    store = make_store(host_capacity=2 * BLOCK, disk_capacity=2 * BLOCK)
    store.put("p", block(seed=100), is_prefix=True)
    _put_range(store, 10)
    assert same(store.get("p"), block(seed=100))
    assert store.stats().drops == 10 - 1 - 2  # one k in the host tier, two on disk


def test_evicting_the_disk_copy_of_a_promoted_block_loses_nothing(make_store):
    store = make_store(host_capacity=2 * BLOCK, disk_capacity=2 * BLOCK, promotion_threshold=1)
    _put_range(store, 3)  # host: k1 k2, disk: k0
    store.get("k0")  # promoted: host k2 k0(+disk), disk k0 k1
    assert store.info("k0").tiers == ("host", "disk")
    store.put("k3", block(seed=3))  # demoting k2 needs disk room: k0's disk copy can go, k0 stays
    assert store.stats().drops == 0 and len(store) == 4
    assert store.info("k0").tiers == ("host",)
    got = store.get_many([f"k{i}" for i in range(4)])
    assert all(same(g, block(seed=i)) for i, g in enumerate(got))


def test_a_promotion_never_drops_a_block(make_store):
    """A promotion is an optimisation (a second copy of a block that is safe on disk); it must not
    push a block out of a full last tier: reads never lose keys."""
    store = make_store(host_capacity=2 * BLOCK, disk_capacity=2 * BLOCK, promotion_threshold=1)
    _put_range(store, 4)  # host: k2 k3, disk: k0 k1 (both tiers full)
    for _ in range(3):
        for i in range(4):
            assert same(store.get(f"k{i}"), block(seed=i))
    assert store.stats().drops == 0 and len(store) == 4


def test_bytes_used_per_tier_follow_puts_and_deletes(store):
    _put_range(store, SLOTS + 2)
    store.put("odd", block(100, seed=50))  # rounded to 128 B in the arena
    s = store.stats()
    assert s.tier("host").used_bytes == HOST - BLOCK + 128
    assert s.tier("disk").used_bytes == 3 * BLOCK  # k0, k1 and k2, which "odd" pushed out
    assert s.tier("host").capacity_bytes == HOST and s.tier("disk").capacity_bytes is None
    store.delete_many(list(store.keys()))
    s = store.stats()
    assert s.tier("host").used_bytes == 0 and s.tier("disk").used_bytes == 0
    assert s.tier("host").blocks == 0 and s.tier("disk").blocks == 0


def test_tiers_are_host_then_disk(store, host_only):
    assert [t.name for t in store.stats().tiers] == ["host", "disk"]
    assert [t.name for t in host_only.stats().tiers] == ["host"]
    with pytest.raises(KeyError):
        host_only.stats().tier("disk")


def test_a_block_read_since_it_was_stored_outlives_newer_unread_blocks(make_store):
    store = make_store(locality_aware=False, eviction_order="reuse")
    _put_range(store, SLOTS)
    store.get("k0")
    _put_range(store, SLOTS, start=100)  # a host tier's worth of newer blocks nobody read
    assert store.info("k0").tiers == ("host",)
    assert all(store.info(f"k{i}").tiers == ("disk",) for i in range(1, SLOTS))
    assert same(store.get("k0"), block(seed=0))


def test_plain_lru_order_demotes_it_with_the_others(make_store):
    store = make_store(locality_aware=False, eviction_order="lru")  # the seed's rule (issue 2: LRU victims)
    _put_range(store, SLOTS)
    store.get("k0")
    _put_range(store, SLOTS, start=100)
    assert all(store.info(f"k{i}").tiers == ("disk",) for i in range(SLOTS))


def test_a_promotion_and_the_demotion_it_needs_run_off_the_read_path(make_store, monkeypatch):
    import threading

    store = make_store(promotion_threshold=1)
    _put_range(store, SLOTS + 1)  # k0 on disk, the host tier full of blocks with no disk copy
    disk = store.tiers[1]
    writers: list[str] = []
    write = disk.write
    monkeypatch.setattr(disk, "write", lambda bid, src: (writers.append(threading.current_thread().name),
                                                          write(bid, src))[1])
    assert same(store.get("k0"), block(seed=0))
    assert store.info("k0").tiers == ("host", "disk")  # info waits for the queued promotion
    assert writers == ["cascade-kv-promoter"]  # the victim's demotion was not the reader's
    assert store.stats().promotions == 1 and len(store) == SLOTS + 1


def test_a_queued_promotion_of_a_deleted_key_brings_nothing_back(make_store):
    from .conftest import check_consistent

    store = make_store(promotion_threshold=1)
    _put_range(store, SLOTS + 1)
    with store._ctx.lock:  # a read in flight holds the promoter back: the delete lands while the promotion waits
        store._promoter.reads_in_flight += 1
    store.get("k0")
    store.delete("k0")
    with store._ctx.lock:
        store._promoter.reads_in_flight -= 1
        store._ctx.cond.notify_all()
    check_consistent(store)
    assert store.stats().promotions == 0 and "k0" not in store
    assert store.stats().tier("host").blocks == SLOTS


def test_close_with_promotions_queued_returns_and_cleans_up(make_store, disk_dir):
    store = make_store(promotion_threshold=1)
    _put_range(store, 2 * SLOTS)
    store.get_many([f"k{i}" for i in range(SLOTS)])  # every one read from disk: queued for promotion
    store.close()
    assert not [p for p in (disk_dir / "blocks").rglob("*") if p.is_file()]
