"""Integrity: a disk copy is checked against its digest; wrong bytes are never returned."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cascade_kv import IntegrityError
from cascade_kv.tiers import disk as disk_module

from .conftest import BLOCK, HOST, block, same



def _path(store, key):
    return store.tiers[1].path(bytes.fromhex(store.info(key).digest))


def _on_disk_only(store, key="a", seed=1, **put):
    store.put(key, block(seed=seed), **put)
    for i in range(HOST // BLOCK):
        store.put(f"fill{i}", block(seed=1000 + i))
    assert store.info(key).tiers == ("disk",)
    return _path(store, key)


def flip_byte(path, offset=BLOCK // 2):
    """Rewrite one byte in place (the file keeps its inode and size; mtime and ctime change)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def flip_byte_keep_mtime(path):
    st = os.stat(path)
    flip_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime now tells


def truncate(path):
    os.truncate(path, BLOCK // 2)


def extend(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 64)


def remove(path):
    os.unlink(path)


DAMAGE = [flip_byte, flip_byte_keep_mtime, truncate, extend, remove]


def _check_refused(store, key="a", seed=1):
    out = np.zeros(BLOCK, np.uint8)
    for _ in range(2):  # and again: the key stays unreadable, never wrong
        with pytest.raises(IntegrityError) as err:
            store.get(key)
        assert isinstance(err.value, ValueError)
        with pytest.raises(IntegrityError):
            store.get(key, out)
        with pytest.raises(IntegrityError):
            store.get_many([f"fill{HOST // BLOCK - 1}", key])
    assert key in store  # the key stays until it is put again or deleted
    for i in range(HOST // BLOCK):
        assert same(store.get(f"fill{i}"), block(seed=1000 + i))


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_file_never_read_before_is_refused(store, damage):
    path = _on_disk_only(store)
    damage(path)
    _check_refused(store)
    s = store.stats()
    assert s.integrity_errors >= 1
    assert not path.exists()
    if damage is not remove:
        assert s.quarantined == 1
        assert len(list((store.tiers[1].root / "quarantine").iterdir())) == 1


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_file_after_a_verified_read_is_refused(make_store, damage, monkeypatch):
    store = make_store(locality_aware=False)  # keep the block on disk across reads
    path = _on_disk_only(store)
    # the tier's clock runs a minute ahead: the file is past its racy window when the read below verifies it
    # (no sleep that a loaded machine could outrun), so the next read trusts its unchanged signature
    monkeypatch.setattr(disk_module, "time", SimpleNamespace(time_ns=lambda: time.time_ns() + 60 * 10**9))
    assert same(store.get("a"), block(seed=1))
    assert same(store.get("a"), block(seed=1))
    damage(path)
    _check_refused(store)
    assert store.stats().integrity_errors >= 1


def test_damage_right_after_a_verified_read_is_refused(make_store):
    store = make_store(locality_aware=False)
    path = _on_disk_only(store)
    assert same(store.get("a"), block(seed=1))
    flip_byte(path)
    _check_refused(store)


def test_verify_always_rehashes_every_read(make_store):
    store = make_store(locality_aware=False, verify_reads="always")
    path = _on_disk_only(store)
    for _ in range(3):
        assert same(store.get("a"), block(seed=1))
    assert store.tiers[1].hashed_reads == 3
    flip_byte(path)
    _check_refused(store)


def test_sha256_digests_are_checked_too(make_store):
    store = make_store(hash_algorithm="sha256")
    flip_byte(_on_disk_only(store))
    _check_refused(store)


def test_a_corrupted_block_is_never_promoted(make_store):
    store = make_store(promotion_threshold=1)
    flip_byte(_on_disk_only(store))
    with pytest.raises(IntegrityError):
        store.get("a")
    assert store.info("a").tiers == ()
    assert store.stats().promotions == 0
    assert store.stats().tier("host").used_bytes == HOST  # the fill blocks, nothing else


def test_putting_the_bytes_again_heals_a_lost_block(store):
    path = _on_disk_only(store)
    flip_byte(path)
    with pytest.raises(IntegrityError):
        store.get("a")
    store.put("b", block(seed=1))  # the same bytes under another key
    assert same(store.get("a"), block(seed=1)) and same(store.get("b"), block(seed=1))
    assert store.stats().blocks == HOST // BLOCK + 1
    assert store.info("a").shared_by == 2


def test_deleting_a_lost_key_frees_it(store):
    flip_byte(_on_disk_only(store))
    with pytest.raises(IntegrityError):
        store.get("a")
    store.delete("a")
    assert "a" not in store and store.stats().blocks == HOST // BLOCK
    store.put("a", block(seed=1))
    assert same(store.get("a"), block(seed=1))


def test_protect_of_a_corrupted_block_is_refused(store):
    flip_byte(_on_disk_only(store))
    with pytest.raises(IntegrityError):
        store.protect("a")
    assert not store.info("a").prefix and store.stats().protected_blocks == 0
    with pytest.raises(IntegrityError):
        store.get("a")


def test_prefix_put_of_bytes_whose_disk_copy_is_corrupted_uses_the_callers_bytes(store):
    """The put carries a good copy of the bytes: it must succeed (and heal the key that shares them)
    rather than fail on the bad disk copy."""
    path = _on_disk_only(store)
    flip_byte(path)
    store.put("p", block(seed=1), is_prefix=True)
    assert "host" in store.info("p").tiers
    assert same(store.get("p"), block(seed=1)) and same(store.get("a"), block(seed=1))


def test_good_memory_copy_is_used_and_bad_disk_copy_found_after_reopen(make_store):
    store = make_store(persist=True)
    store.put("a", block(seed=1))
    store.put("p", block(seed=2), is_prefix=True)
    store.put("ok", block(seed=3))
    bad_a, bad_p = _path(store, "a"), _path(store, "p")
    flip_byte(bad_a)
    flip_byte(bad_p)
    assert same(store.get("a"), block(seed=1))  # served from the host copy
    assert same(store.get("p"), block(seed=2))
    store.close()
    reopened = make_store(persist=True)  # reloading "p" into memory finds its file bad
    assert sorted(reopened.keys()) == ["a", "ok", "p"]
    for key in ("a", "p"):
        with pytest.raises(IntegrityError):
            reopened.get(key)
    assert same(reopened.get("ok"), block(seed=3))
    assert reopened.stats().quarantined == 2
    reopened.put("again", block(seed=1))  # heals "a"
    assert same(reopened.get("a"), block(seed=1))


def test_dedup_put_onto_an_unchecked_corrupt_copy_rewrites_it_from_the_callers_bytes(make_store):
    """An acknowledged put must not rest on a copy nobody checked: after a reopen, the files are
    unchecked, so a put of the same bytes (a dedup hit) rewrites the file from the caller's bytes."""
    first = make_store(persist=True)
    path = _on_disk_only(first, "a")
    first.close()
    flip_byte(path)  # damaged while no store had it open
    again = make_store(persist=True)
    again.put("b", block(seed=1))  # the same bytes as "a": a dedup hit
    assert again.stats().dedup_hits == 1
    assert same(again.get("b"), block(seed=1))
    assert same(again.get("a"), block(seed=1))  # healed for every key that shares the block
    assert again.stats().integrity_errors == 0


def test_a_failed_read_leaves_no_bad_byte_in_the_callers_buffer(store):
    path = _on_disk_only(store)
    flip_byte(path)
    out = np.full(BLOCK, 7, np.uint8)
    with pytest.raises(IntegrityError):
        store.get("a", out)
    assert not out.any()  # scrubbed to zeros: neither the corrupt bytes nor stale ones look like data
