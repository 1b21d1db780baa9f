"""A really full and a really read-only disk tier (a small tmpfs), not a monkeypatched one.

Needs permission to mount (root in a container that allows it, as CI here); skipped with the
reason otherwise.
"""
from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest

from cascade_kv import CascadeConfig, StorageError, Store

BLOCK = 256 << 10


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _block(i: int) -> np.ndarray:
    return np.full(BLOCK // 4, i, dtype=np.int32)


def test_full_disk_raises_storage_error_and_keeps_memory_copies(small_fs):
    with Store(CascadeConfig(host_capacity=4 * BLOCK, disk_path=small_fs)) as store:
        stored = []
        with pytest.raises(StorageError) as exc:
            for i in range(64):  # 16 MiB of blocks through a 1 MiB host tier onto a 1 MiB disk
                store.put(f"k{i}", _block(i))
                stored.append(i)
        assert exc.value.errno == errno.ENOSPC
        assert "disk tier" in str(exc.value)
        failed = len(stored)
        assert f"k{failed}" not in store  # the put that failed stored nothing
        assert sorted(store.keys()) == sorted(f"k{i}" for i in stored)
        for i in stored:  # every acknowledged block is still readable, from memory or disk
            assert np.array_equal(store.get(f"k{i}"), _block(i))
        assert not list((small_fs / "tmp").iterdir())  # no half-written file left behind
        # freeing disk space makes the store usable again
        store.delete_many([f"k{i}" for i in stored])
        store.put("again", _block(999))
        assert np.array_equal(store.get("again"), _block(999))


def test_read_only_disk_raises_storage_error_and_keeps_memory_copies(small_fs):
    with Store(CascadeConfig(host_capacity=2 * BLOCK, disk_path=small_fs)) as store:
        store.put("a", _block(1))
        store.put("b", _block(2))
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        try:
            with pytest.raises(StorageError) as exc:
                store.put("c", _block(3))  # needs a demotion, which cannot write
            assert exc.value.errno == errno.EROFS
            assert "c" not in store
            assert np.array_equal(store.get("a"), _block(1))
            assert np.array_equal(store.get("b"), _block(2))
            assert store.stats().tier("host").blocks == 2
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
        store.put("c", _block(3))
        assert np.array_equal(store.get("c"), _block(3))


def _fill(fs) -> None:
    """Take every free byte of the file system (what another job on a shared $SCRATCH does)."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "filler"}


def test_a_persistent_store_reopens_on_a_really_full_disk_and_keeps_every_key(small_fs):
    # issue 9, item 1: reopening on a full disk used to fail in compaction, and the failed open's close
    # rewrote the journal from an empty key table; now opening needs no free space at all
    cfg = CascadeConfig(host_capacity=4 * BLOCK, disk_path=small_fs / "kv", persist=True)
    with Store(cfg) as store:
        for i in range(2):
            store.put(f"k{i}", _block(i))
        store.delete("k1")
        store.put("k1", _block(11))  # records to compact away at the next open
    before = _tree(small_fs / "kv")
    _fill(small_fs)
    with Store(cfg) as store:
        assert store.recovery is not None and not store.recovery.compacted  # no room: skipped, not needed
        assert np.array_equal(store.get("k0"), _block(0)) and np.array_equal(store.get("k1"), _block(11))
        with pytest.raises(StorageError):  # no room for a new block: refused, and nothing changes
            store.put("k2", _block(2))
        assert sorted(store.keys()) == ["k0", "k1"]
    assert _tree(small_fs / "kv") == before  # neither the open nor the close changed a byte
    (small_fs / "filler").unlink()
    with Store(cfg) as store:  # with room again, the journal is compacted and the store is usable
        assert store.recovery.compacted and sorted(store.keys()) == ["k0", "k1"]
        store.put("k2", _block(2))
    with Store(cfg) as store:
        assert np.array_equal(store.get("k2"), _block(2))


def test_a_persistent_store_on_a_read_only_disk_refuses_to_open_and_changes_nothing(small_fs):
    cfg = CascadeConfig(host_capacity=4 * BLOCK, disk_path=small_fs / "kv", persist=True)
    with Store(cfg) as store:
        store.put("k0", _block(0))
    before = _tree(small_fs / "kv")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with pytest.raises(StorageError) as exc:  # EROFS opening LOCK (or the journal): in the family
            Store(cfg)
        assert exc.value.errno == errno.EROFS
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert _tree(small_fs / "kv") == before
    with Store(cfg) as store:
        assert np.array_equal(store.get("k0"), _block(0))
