"""Store.demote: blocks leave memory for the disk tier on request (cold starts), and nothing else changes."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from cascade_kv import ConfigError

from .conftest import block, check_consistent, same, snapshot, values


def test_demote_moves_blocks_to_disk_and_reads_bring_them_back(store):
    a, b = block(seed=1), block(seed=2)
    store.put_many(["a", "b"], [a, b])
    store.put("a2", a)  # shares a's block
    store.demote(["a", "b"])
    assert store.info("a").tiers == ("disk",) and store.info("b").tiers == ("disk",)
    assert store.stats().tier("host").blocks == 0
    assert same(store.get("a2"), a) and same(store.get("b"), b)
    assert store.stats().tier("disk").hits == 2
    store.demote(["a"])  # a block on disk only: nothing to do
    assert same(store.get("a"), a)
    check_consistent(store)


def test_demote_a_block_already_on_disk_keeps_its_file(store):
    a = block(seed=3)
    store.put("a", a)
    store.demote(["a"])
    for _ in range(4):  # read until promoted: copies in both tiers
        store.get("a")
    assert store.info("a").tiers == ("host", "disk")
    store.demote(["a"])
    assert store.info("a").tiers == ("disk",) and same(store.get("a"), a)


def test_demote_refuses_protected_keys_missing_keys_and_no_disk(store, host_only):
    store.put("p", block(seed=4), is_prefix=True)
    store.put("u", block(seed=5))
    data, before = values(store), snapshot(store)
    with pytest.raises(ValueError, match="protected"):
        store.demote(["u", "p"])
    with pytest.raises(KeyError):
        store.demote(["u", "nope"])
    assert snapshot(store) == before and values(store) == data  # nothing moved
    host_only.put("x", block(seed=6))
    with pytest.raises(ConfigError):
        host_only.demote(["x"])


def test_demote_waits_for_a_reader_of_the_memory_copy(make_store):
    store = make_store(host_capacity=4 << 20)
    big = np.random.default_rng(7).integers(0, 256, 2 << 20, dtype=np.uint8)  # read outside the lock
    store.put("big", big)
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            if not same(store.get("big"), big):
                bad.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(20):
            store.demote(["big"])
            store.get("big")
            for _ in range(3):  # promote it back so the next demote has a memory copy to drop
                store.get("big")
    finally:
        stop.set()
        t.join()
    assert not bad
    check_consistent(store)
