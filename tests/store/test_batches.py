"""The batch paths of get_many and put_many: the fast path for small blocks in the top tier and the general
path for everything else share one call, and a put that fails while copying leaves nothing allocated."""
from __future__ import annotations

import numpy as np
import pytest

from cascade_kv import CascadeConfig, Store
from cascade_kv.tiers import HostTier

from .conftest import HOST, KIB, block, check_consistent, snapshot, values

MIB = 1 << 20


def test_one_get_many_mixes_every_path(make_store):
    """Small host blocks (copied under the lock), a large one (outside it), a disk-only one, a staged
    (non-contiguous) out, and dtypes whose buffers cannot be cast to bytes or are empty."""
    store = make_store(host_capacity=1 * MIB)
    values_ = {
        "u8": block(4 * KIB, seed=1),
        "f16": block(4 * KIB, seed=2, dtype=np.float16, shape=(2, 1024)),
        "c64": block(4 * KIB, seed=3, dtype=np.complex64),
        "when": block(4 * KIB, seed=4).view("M8[s]"),
        "empty": np.zeros((0, 5), np.int16),
        "large": block(256 * KIB, seed=5),
        "cold": block(8 * KIB, seed=6),
    }
    store.put_many(list(values_), list(values_.values()))
    store.demote(["cold"])
    outs = {k: np.empty_like(v) for k, v in values_.items()}
    outs["f16"] = np.empty((1024, 2), np.float16).T  # the right shape, not C-contiguous: read through a temporary
    keys = list(values_)
    got = store.get_many(keys, [outs[k] for k in keys])
    for k, g in zip(keys, got):
        assert g is outs[k] and g.dtype == values_[k].dtype and g.shape == values_[k].shape, k
        assert g.tobytes() == values_[k].tobytes(), k
    for k, g in zip(keys, store.get_many(keys)):  # fresh results
        assert g.tobytes() == values_[k].tobytes(), k
    s = store.stats()
    assert s.gets == 2 * len(keys) and s.tier("host").hits + s.tier("disk").hits == 2 * len(keys)


@pytest.mark.parametrize("sizes", [[4 * KIB] * 6, [4 * KIB, 4 * KIB, 128 * KIB, 4 * KIB]],
                         ids=["small", "small and large"])
def test_a_put_whose_copy_fails_leaves_nothing_allocated(monkeypatch, make_store, sizes):
    store = make_store(host_capacity=1 * MIB, disk_path=None)
    store.put("kept", block(4 * KIB, seed=99))
    vals, before = values(store), snapshot(store)
    used = store.tiers[0].used
    calls = []

    def failing_write(self, block_id, src):
        calls.append(block_id)
        if len(calls) == 2:
            raise OSError(5, "injected copy failure")
        return HostTier.write(self, block_id, src)

    def failing_write_many(self, block_ids, srcs):
        for block_id, src in zip(block_ids, srcs):
            failing_write(self, block_id, src)

    monkeypatch.setattr(HostTier, "write", failing_write)
    monkeypatch.setattr(HostTier, "write_many", failing_write_many)
    with pytest.raises(OSError, match="injected"):
        store.put_many([f"k{i}" for i in range(len(sizes))], [block(n, seed=i) for i, n in enumerate(sizes)])
    monkeypatch.undo()
    assert snapshot(store) == before and values(store) == vals
    assert store.tiers[0].used == used
    assert store.stats() == store._walk_stats(store._default)
    store.put_many([f"k{i}" for i in range(len(sizes))], [block(n, seed=i) for i, n in enumerate(sizes)])
    assert len(store) == len(sizes) + 1


def test_put_many_batches_fill_and_drain_the_host_tier(host_only):
    """Batches larger than the tier's room evict within the batch path; counts stay equal to the walk."""
    store = host_only
    for r in range(4):
        keys = [f"r{r}-{i}" for i in range(12)]
        store.put_many(keys, [block(2 * KIB, seed=100 * r + i) for i in range(12)])
        assert store.tiers[0].used <= HOST
        assert store.stats() == store._walk_stats(store._default)
    for k in store.keys():
        r, i = map(int, k[1:].split("-"))
        assert store.get(k).tobytes() == block(2 * KIB, seed=100 * r + i).tobytes()


def test_batches_keep_the_store_consistent(tmp_path):
    with Store(CascadeConfig(host_capacity=HOST, disk_path=tmp_path)) as store:
        store.put_many([f"a{i}" for i in range(20)], [block(4 * KIB, seed=i % 7) for i in range(20)],
                       is_prefix=[i < 3 for i in range(20)])
        store.get_many([f"a{i}" for i in range(20)])
        store.settle()
        check_consistent(store)
        assert store.stats() == store._walk_stats(store._default)
