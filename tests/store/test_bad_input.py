"""Bad input and failing storage: a clear error, raised before anything changes; the store stays usable."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import cascade_kv.catalog as catalog_module
import cascade_kv.tiers.disk as disk_module
from cascade_kv import (
    BlockNotFound,
    CapacityError,
    CascadeError,
    StorageError,
    StoreClosed,
)

from .conftest import BLOCK, HOST, KIB, block, same, snapshot, values

SENTINEL = 0x5A


def _filled(shape, dtype):
    out = np.empty(shape, dtype)
    out.view(np.uint8).reshape(-1)[:] = SENTINEL if out.nbytes else 0
    return out


def _untouched(out):
    return out.nbytes == 0 or bool((out.view(np.uint8) == SENTINEL).all())


@pytest.fixture
def loaded(store):
    """A store with blocks in both tiers, one of them protected, and one shared."""
    store.put("p", block(seed=1), is_prefix=True)
    for i in range(10):
        store.put(f"k{i}", block(seed=10 + i, dtype=np.float32, shape=(16, 128)))
    store.put("dup", block(seed=10, dtype=np.float32, shape=(16, 128)))
    return store


# ------------------------------------------------------------------ out buffers
@pytest.mark.parametrize("shape, dtype", [
    ((16, 128), np.float64),  # wrong dtype
    ((16, 64), np.float32),  # wrong size
    ((128, 16), np.float32),  # right size, wrong shape
    ((2048,), np.float32),  # flat
    ((16, 128), np.int32),  # same itemsize, wrong dtype
    ((16, 128), ">f4"),  # wrong byte order
])
def test_out_of_the_wrong_dtype_or_shape_is_refused_untouched(loaded, shape, dtype):
    for key in ("k9", "k0"):  # one in the host tier, one on disk
        out = _filled(shape, dtype)
        with pytest.raises(ValueError, match="dtype|shape"):
            loaded.get(key, out)
        assert _untouched(out)


def test_get_many_checks_every_out_before_copying_any(loaded):
    good = [_filled((16, 128), np.float32) for _ in range(3)]
    bad = _filled((16, 128), np.float64)
    before = loaded.stats().gets
    with pytest.raises(ValueError):
        loaded.get_many(["k9", "k0", "k8", "k7"], good + [bad])
    assert all(_untouched(o) for o in good + [bad])
    assert loaded.stats().gets == before
    with pytest.raises(ValueError):
        loaded.get_many(["k9", "k0"], good[:1])  # one out for two keys


def test_get_many_checks_every_key_before_copying_any(loaded):
    outs = [_filled((16, 128), np.float32) for _ in range(2)]
    with pytest.raises(BlockNotFound):
        loaded.get_many(["k9", "missing"], outs)
    assert all(_untouched(o) for o in outs)
    with pytest.raises(TypeError):
        loaded.get_many(["k9", 3], outs)
    assert all(_untouched(o) for o in outs)


def test_read_only_out_is_refused(loaded):
    out = _filled((16, 128), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        loaded.get("k9", out)
    assert _untouched(out)


def test_out_that_is_not_an_array_is_refused(loaded):
    with pytest.raises((ValueError, TypeError)):
        loaded.get("k9", [0.0] * 2048)


@pytest.mark.parametrize("key", ["k9", "k0", "big"])  # host (small copy), disk, host (copy outside the lock)
def test_non_contiguous_out_is_filled_correctly(loaded, key):
    if key == "big":
        loaded.put("big", block(48 * KIB, seed=99, dtype=np.float32, shape=(96, 128)))
    want = loaded.get(key)
    rows, cols = want.shape
    base = _filled((rows, 2 * cols), np.float32)
    strided = base[:, ::2]
    assert not strided.flags.c_contiguous
    assert loaded.get(key, strided) is strided
    assert same(np.ascontiguousarray(strided), want)
    assert _untouched(base[:, 1::2].copy())  # the gaps between the elements were not written
    fortran = np.asfortranarray(_filled(want.shape, np.float32))
    assert loaded.get(key, fortran) is fortran
    assert same(np.ascontiguousarray(fortran), want)  # compared as bytes: random floats hold NaNs


def test_get_many_mixes_none_and_given_outs(loaded):
    out = _filled((16, 128), np.float32)
    got = loaded.get_many(["k9", "k0"], [None, out])
    assert got[1] is out
    assert same(got[0], loaded.get("k9")) and same(out, block(seed=10, dtype=np.float32, shape=(16, 128)))


# ------------------------------------------------------------------ arrays to put
@pytest.mark.parametrize("make", [
    lambda a: a[:, ::2],  # strided
    lambda a: a.T,  # transposed
    lambda a: np.asfortranarray(a),  # Fortran order
    lambda a: a[::-1],  # negative stride
])
def test_non_contiguous_array_is_copied_and_stored(store, make):
    base = block(16 * KIB, seed=3, dtype=np.int32, shape=(64, 64))
    arr = make(base)
    store.put("nc", arr)
    got = store.get("nc")
    assert got.shape == arr.shape and got.dtype == arr.dtype and np.array_equal(got, arr)
    assert got.flags.c_contiguous
    store.put("c", np.ascontiguousarray(arr))
    assert store.stats().dedup_hits == 1  # the same logical bytes, so the same block


def test_array_like_is_stored_as_an_array(store):
    store.put("list", [[1, 2], [3, 4]])
    assert np.array_equal(store.get("list"), np.array([[1, 2], [3, 4]]))


@pytest.mark.parametrize("value", [np.array([1, "a", None], dtype=object),
                                   np.zeros(3, dtype=[("a", "i4"), ("o", object)]),
                                   None, "text", b"bytes", 3, {"a": 1}])
def test_values_without_bytes_to_store_raise_type_error(loaded, value):
    vals, before = values(loaded), snapshot(loaded)
    with pytest.raises(TypeError):
        loaded.put("bad", value)
    with pytest.raises(TypeError):
        loaded.put_many(["ok", "bad"], [block(seed=77), value])
    assert "ok" not in loaded and "bad" not in loaded
    assert snapshot(loaded) == before and values(loaded) == vals


@pytest.mark.parametrize("key", [1, 1.5, None, ("a",), bytearray(b"a"), ["a"]])
def test_keys_must_be_str_or_bytes(loaded, key):
    before = snapshot(loaded)
    a = block(seed=5)
    calls = [
        lambda: loaded.put(key, a), lambda: loaded.put_many(["fine", key], [a, a]),
        lambda: loaded.get(key), lambda: loaded.get_many(["k9", key]),
        lambda: loaded.delete(key), lambda: loaded.delete_many(["k9", key]),
        lambda: loaded.protect(key), lambda: loaded.unprotect(key),
        lambda: loaded.info(key), lambda: loaded.contains(key),
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    assert "fine" not in loaded and "k9" in loaded
    assert snapshot(loaded) == before


def test_missing_key_raises_block_not_found_which_is_a_key_error(loaded):
    before = snapshot(loaded)
    for call in (lambda: loaded.get("nope"), lambda: loaded.delete("nope"), lambda: loaded.info("nope"),
                 lambda: loaded.protect("nope"), lambda: loaded.unprotect("nope"),
                 lambda: loaded.delete_many(["k9", "nope"]), lambda: loaded.get(b"k9")):
        with pytest.raises(BlockNotFound) as err:
            call()
        assert isinstance(err.value, KeyError) and isinstance(err.value, CascadeError)
        assert "nope" in str(err.value) or "k9" in str(err.value)
    assert "k9" in loaded  # delete_many removed nothing
    assert snapshot(loaded) == before
    assert "nope" not in loaded and not loaded.contains("nope")


def test_put_many_with_mismatched_lengths_stores_nothing(loaded):
    before = snapshot(loaded)
    with pytest.raises(ValueError):
        loaded.put_many(["a", "b"], [block(seed=1)])
    assert snapshot(loaded) == before


def test_block_larger_than_every_tier_raises_capacity_error(make_store):
    host_only = make_store(disk_path=None)
    with pytest.raises(CapacityError, match=str(HOST + 64)):
        host_only.put("big", block(HOST + 64, seed=1))
    assert len(host_only) == 0 and host_only.stats().tier("host").used_bytes == 0
    bounded = make_store(disk_capacity=2 * HOST)
    bounded.put("a", block(seed=2))
    before = snapshot(bounded)
    with pytest.raises(CapacityError) as err:
        bounded.put("big", block(2 * HOST + 64, seed=3))
    assert isinstance(err.value, MemoryError) and str(2 * HOST + 64) in str(err.value)
    with pytest.raises(CapacityError):
        bounded.put_many(["ok", "big"], [block(seed=4), block(2 * HOST + 64, seed=3)])
    assert "ok" not in bounded and snapshot(bounded) == before


def test_closed_store_refuses_every_call(store):
    store.put("a", block(seed=1))
    store.close()
    for call in (lambda: store.put("b", block(seed=2)), lambda: store.get("a"), lambda: store.delete("a"),
                 lambda: store.protect("a"), lambda: store.get_many(["a"])):
        with pytest.raises(StoreClosed):
            call()
    store.close()  # twice is fine


# ------------------------------------------------------------------ failing disk
class _FailingWrites:
    """Stands in for the ``os`` module of one cascade_kv module: every ``os.write`` fails with ``err``."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: object) -> int:
        self.calls += 1
        raise OSError(self.err, os.strerror(self.err))


@pytest.fixture(params=[errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def failing_disk(request, monkeypatch):
    def fail() -> _FailingWrites:
        shim = _FailingWrites(request.param)
        monkeypatch.setattr(disk_module, "os", shim)
        return shim

    fail.errno = request.param
    fail.undo = monkeypatch.undo
    return fail


def _check_storage_error(err, code):
    assert isinstance(err, StorageError) and isinstance(err, OSError) and isinstance(err, CascadeError)
    assert err.errno == code


def test_failed_demotion_keeps_the_memory_copy(store, failing_disk):
    for i in range(HOST // BLOCK):
        store.put(f"k{i}", block(seed=i))
    vals, before = values(store), snapshot(store)
    shim = failing_disk()
    with pytest.raises(StorageError) as err:
        store.put("new", block(seed=99))
    _check_storage_error(err.value, failing_disk.errno)
    assert shim.calls > 0
    assert "new" not in store
    assert snapshot(store) == before and values(store) == vals
    assert store.info("k0").tiers == ("host",)  # the victim's memory copy is kept
    assert not any(store.tiers[1].root.joinpath("tmp").iterdir())  # no half-written file left
    failing_disk.undo()
    store.put("new", block(seed=99))  # usable once the disk is back
    assert store.info("k0").tiers == ("disk",) and same(store.get("k0"), block(seed=0))


def test_failed_write_of_a_disk_only_block_changes_nothing(store, failing_disk):
    store.put("a", block(seed=1))
    before = snapshot(store)
    failing_disk()
    with pytest.raises(StorageError) as err:
        store.put("big", block(HOST + KIB, seed=2))
    _check_storage_error(err.value, failing_disk.errno)
    assert snapshot(store) == before
    assert store.stats().tier("disk").used_bytes == 0


def test_failed_persistent_put_keeps_the_old_value(make_store, disk_dir, failing_disk):
    store = make_store(persist=True)
    store.put("a", block(seed=1))
    store.put("p", block(seed=2), is_prefix=True)
    vals, before = values(store), snapshot(store)
    failing_disk()
    for call in (lambda: store.put("a", block(seed=3)), lambda: store.put("b", block(seed=4)),
                 lambda: store.put("q", block(seed=5), is_prefix=True),
                 lambda: store.put_many(["a", "c"], [block(seed=6), block(seed=7)])):
        with pytest.raises(StorageError) as err:
            call()
        _check_storage_error(err.value, failing_disk.errno)
        assert snapshot(store) == before and values(store) == vals
    failing_disk.undo()
    store.close()
    reopened = make_store(persist=True)
    assert values(reopened) == vals
    reopened.put("b", block(seed=4))
    assert same(reopened.get("b"), block(seed=4))


def test_failed_journal_append_changes_nothing(make_store, monkeypatch):
    store = make_store(persist=True)
    store.put("a", block(seed=1))
    vals, before = values(store), snapshot(store)
    monkeypatch.setattr(catalog_module, "os", _FailingWrites(errno.ENOSPC))
    for call in (lambda: store.put("a", block(seed=2)), lambda: store.put("b", block(seed=3)),
                 lambda: store.delete("a"), lambda: store.protect("a")):
        with pytest.raises(StorageError):
            call()
        assert snapshot(store) == before and values(store) == vals
    monkeypatch.undo()
    store.close()
    reopened = make_store(persist=True)
    assert values(reopened) == vals and not reopened.info("a").prefix
    assert reopened.stats().blocks == 1
    assert sum(1 for p in (reopened.tiers[1].root / "blocks").rglob("*") if p.is_file()) == 1


def test_read_survives_a_promotion_whose_demotion_fails(make_store, failing_disk):
    store = make_store(promotion_threshold=1)
    for i in range(HOST // BLOCK + 1):
        store.put(f"k{i}", block(seed=i))
    assert store.info("k0").tiers == ("disk",)
    failing_disk()
    assert same(store.get("k0"), block(seed=0))  # the promotion fails; the read does not
    assert len(store) == HOST // BLOCK + 1 and store.stats().drops == 0
    assert store.info("k1").tiers == ("host",)
    failing_disk.undo()
    for i in range(HOST // BLOCK + 1):
        assert same(store.get(f"k{i}"), block(seed=i))
