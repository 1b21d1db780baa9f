"""Content-addressed dedup: equal bytes are stored once, whatever key, dtype or shape they come under."""
from __future__ import annotations

import numpy as np

from .conftest import BLOCK, HOST, KIB, block, same


def test_same_bytes_under_another_key_store_nothing_new(store):
    a = block(seed=1)
    store.put("a", a)
    used = store.stats().tier("host").used_bytes
    written = [t.bytes_written for t in store.stats().tiers]
    store.put("b", a.copy())
    s = store.stats()
    assert s.keys == 2 and s.blocks == 1
    assert s.dedup_hits == 1 and s.dedup_bytes_saved == BLOCK
    assert s.logical_bytes == 2 * BLOCK and s.unique_bytes == BLOCK
    assert s.tier("host").used_bytes == used
    assert [t.bytes_written for t in s.tiers] == written
    assert same(store.get("a"), a) and same(store.get("b"), a)
    assert store.info("a").digest == store.info("b").digest
    assert store.info("a").shared_by == 2


def test_each_key_keeps_its_own_dtype_and_shape(store):
    raw = block(4 * KIB, seed=2)
    views = {
        "u8": raw,
        "f32": raw.view(np.float32).reshape(8, 128),
        "i16": raw.view(np.int16).reshape(2, 16, 64),
        "be": raw.view(">i4"),
        "rec": raw.view([("a", "<i4"), ("b", "<f4")]).reshape(16, 32),
        "f16": raw.view(np.float16).reshape(64, 32),
    }
    for k, v in views.items():
        store.put(k, v)
    assert store.stats().blocks == 1
    assert store.stats().dedup_hits == len(views) - 1
    for k, v in views.items():
        got = store.get(k)
        assert same(got, v), k
        out = np.empty(v.shape, v.dtype)
        assert store.get(k, out) is out and same(out, v)
        info = store.info(k)
        assert (info.dtype, info.shape, info.nbytes) == (v.dtype, v.shape, 4 * KIB)


def test_empty_arrays_of_any_shape_share_one_block(store):
    shapes = {"a": ((0,), np.float32), "b": ((3, 0), np.int64), "c": ((0, 2, 2), np.uint8)}
    for k, (shape, dt) in shapes.items():
        store.put(k, np.empty(shape, dt))
    assert store.stats().blocks == 1 and store.stats().dedup_hits == 2
    for k, (shape, dt) in shapes.items():
        got = store.get(k)
        assert got.shape == shape and got.dtype == dt


def test_zero_dim_array_round_trips(store):
    store.put("scalar", np.array(3.5, dtype=np.float64))
    got = store.get("scalar")
    assert got.shape == () and got.dtype == np.float64 and got == 3.5


def test_reput_same_bytes_under_same_key_is_a_dedup_hit(store):
    a = block(seed=3)
    store.put("a", a)
    store.put("a", a)
    s = store.stats()
    assert s.keys == 1 and s.blocks == 1 and s.dedup_hits == 1 and s.puts == 2
    assert same(store.get("a"), a)


def test_block_is_refcounted_and_freed_with_its_last_key(store):
    a = block(seed=4)
    store.put_many(["a", "b", "c"], [a, a.copy(), a.copy()])
    for k in ("a", "b"):
        store.delete(k)
        assert same(store.get("c"), a)
        assert store.stats().blocks == 1
    store.delete("c")
    s = store.stats()
    assert s.blocks == 0 and s.keys == 0 and s.unique_bytes == 0
    assert all(t.used_bytes == 0 and t.blocks == 0 for t in s.tiers)


def test_demoted_block_file_is_removed_with_its_last_key(store):
    store.put("a", block(seed=5))
    store.put("a2", block(seed=5))
    for i in range(HOST // BLOCK):  # push "a" down to disk
        store.put(f"fill{i}", block(seed=100 + i))
    assert store.info("a").tiers == ("disk",)
    path = store.tiers[1].path(bytes.fromhex(store.info("a").digest))
    assert path.exists()
    store.delete("a")
    assert path.exists()  # "a2" still refers to it
    store.delete("a2")
    assert not path.exists()
    assert store.stats().tier("disk").used_bytes == 0


def test_overwriting_a_key_releases_its_old_block(store):
    store.put("a", block(seed=6))
    store.put("a", block(seed=7))
    s = store.stats()
    assert s.keys == 1 and s.blocks == 1 and s.dedup_hits == 0
    assert s.tier("host").used_bytes == BLOCK
    assert same(store.get("a"), block(seed=7))


def test_overwrite_keeps_block_shared_with_another_key(store):
    store.put_many(["a", "b"], [block(seed=8), block(seed=8)])
    store.put("a", block(seed=9))
    assert same(store.get("b"), block(seed=8)) and same(store.get("a"), block(seed=9))
    assert store.stats().blocks == 2
    assert store.info("b").shared_by == 1


def test_dedup_hit_on_a_block_that_lives_on_disk_writes_nothing(store):
    a = block(seed=10)
    store.put("a", a)
    for i in range(HOST // BLOCK):
        store.put(f"fill{i}", block(seed=200 + i))
    assert store.info("a").tiers == ("disk",)
    before = store.stats()
    store.put("b", a.copy())
    after = store.stats()
    assert after.dedup_hits == before.dedup_hits + 1
    assert [t.bytes_written for t in after.tiers] == [t.bytes_written for t in before.tiers]
    assert [t.used_bytes for t in after.tiers] == [t.used_bytes for t in before.tiers]
    assert same(store.get("b"), a)


def test_duplicates_inside_one_batch_are_stored_once(store):
    a = block(seed=11)
    store.put_many([f"k{i}" for i in range(5)], [a.copy() for _ in range(5)])
    s = store.stats()
    assert s.blocks == 1 and s.keys == 5 and s.dedup_hits == 4 and s.dedup_bytes_saved == 4 * BLOCK


def test_a_key_given_twice_in_a_batch_takes_its_last_array(store):
    store.put_many(["k", "k"], [block(seed=12), block(seed=13)])
    assert same(store.get("k"), block(seed=13))
    assert store.stats().keys == 1 and store.stats().blocks == 1


def test_str_and_bytes_keys_are_different_keys(store):
    store.put("a", block(seed=14))
    store.put(b"a", block(seed=15))
    assert len(store) == 2 and "a" in store and b"a" in store
    assert same(store.get("a"), block(seed=14)) and same(store.get(b"a"), block(seed=15))


def test_dedup_disabled_stores_every_put_separately(make_store):
    store = make_store(dedup_enabled=False)
    a = block(seed=16)
    for k in ("a", "b", "c"):
        store.put(k, a.copy())
    store.put("a", a.copy())  # re-put under the same key: a new block replaces the old
    s = store.stats()
    assert s.blocks == 3 and s.dedup_hits == 0 and s.dedup_bytes_saved == 0
    assert s.tier("host").used_bytes == 3 * BLOCK
    store.delete("b")
    assert store.stats().blocks == 2
    for k in ("a", "c"):
        assert same(store.get(k), a)
        assert store.info(k).shared_by == 1


def test_dedup_disabled_demotes_and_frees_each_copy(make_store):
    store = make_store(dedup_enabled=False)
    a = block(seed=17)
    for i in range(12):  # 12 copies of the same bytes: 8 fit in the host tier, the rest go to disk
        store.put(f"k{i}", a)
    s = store.stats()
    assert s.blocks == 12 and s.tier("disk").blocks == 4 and s.drops == 0
    for i in range(12):
        assert same(store.get(f"k{i}"), a)
    store.delete_many([f"k{i}" for i in range(12)])
    assert all(t.used_bytes == 0 for t in store.stats().tiers)
    assert not any(p.is_file() for p in (store.tiers[1].root / "blocks").rglob("*"))
