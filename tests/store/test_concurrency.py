"""Concurrency: many threads put, get and delete at once; the metadata stays consistent."""
from __future__ import annotations

import random
import threading

import pytest

from cascade_kv import BlockNotFound, CascadeConfig, Store

from .conftest import HOST, KIB, block, check_consistent, same

THREADS = 8
JOIN_TIMEOUT = 60  # seconds: a thread still alive after this is a deadlock


def run_threads(n, target):
    """Run ``target(i)`` on ``n`` threads started together; re-raise the first failure."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "deadlock: threads still running"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("nbytes, prefix", [(4 * KIB, False), (32 * KIB, False), (HOST + KIB, False),
                                            (4 * KIB, True), (32 * KIB, True)])
def test_concurrent_puts_of_the_same_bytes_store_one_block(make_store, nbytes, prefix):
    store = make_store()
    for _ in range(3):  # a few rounds: the race is won by a different thread each time
        store.delete_many(store.keys())
        before = store.stats().dedup_hits
        run_threads(THREADS, lambda i: store.put(f"k{i}", block(nbytes, seed=1), is_prefix=prefix))
        s = store.stats()
        assert s.blocks == 1 and s.keys == THREADS
        assert s.dedup_hits - before == THREADS - 1
        for i in range(THREADS):
            assert same(store.get(f"k{i}"), block(nbytes, seed=1))
        check_consistent(store)


def test_concurrent_put_many_of_overlapping_contents(make_store):
    store = make_store()

    def work(i):
        keys = [f"t{i}-{j}" for j in range(4)]
        store.put_many(keys, [block(4 * KIB, seed=j) for j in range(4)])

    run_threads(THREADS, work)
    s = store.stats()
    assert s.blocks == 4 and s.keys == 4 * THREADS and s.dedup_hits == 4 * THREADS - 4
    check_consistent(store)


def _mixed_workload(store, seed, rounds, prefix_ok=True, may_drop=False):
    """Each thread owns its keys (so it knows what they must hold) and shares contents with the others
    (so dedup, refcounts, eviction and promotion are contended). Returns the expected final state."""
    pool = [block(int(n) * KIB, seed=100 + s) for s, n in enumerate([1, 2, 4, 8, 8, 12, 16, 3, 6, 10])]
    expected: dict[str, tuple[int, bool]] = {}
    lock = threading.Lock()

    def work(t):
        rng = random.Random(seed * 1000 + t)
        mine: dict[str, tuple[int, bool]] = {}
        protected = None
        for _ in range(rounds):
            r = rng.random()
            key = f"t{t}-{rng.randrange(8)}"
            if r < 0.4:
                c = rng.randrange(len(pool))
                prefix = prefix_ok and protected in (None, key) and rng.random() < 0.2 and pool[c].nbytes <= 4 * KIB
                store.put(key, pool[c], is_prefix=prefix)
                mine[key] = (c, prefix)
                protected = key if prefix else (None if protected == key else protected)
            elif r < 0.75:
                other = f"t{rng.randrange(THREADS)}-{rng.randrange(8)}"
                try:
                    got = store.get(other)
                except BlockNotFound:
                    assert may_drop or other not in mine
                    if other in mine:
                        assert not mine[other][1]  # a protected key is never dropped
                        del mine[other]
                    continue
                if other in mine:
                    assert same(got, pool[mine[other][0]]), other
                else:
                    assert any(same(got, p) for p in pool)  # another thread's key: some pool value
            elif r < 0.9:
                if key in mine:
                    try:
                        store.delete(key)
                    except BlockNotFound:
                        assert may_drop and not mine[key][1]
                    del mine[key]
                    protected = None if protected == key else protected
            elif key in mine and prefix_ok:
                try:
                    if mine[key][1]:
                        store.unprotect(key)
                        protected = None
                    elif protected is None and pool[mine[key][0]].nbytes <= 4 * KIB:
                        store.protect(key)
                        protected = key
                    else:
                        continue
                except BlockNotFound:
                    assert may_drop and not mine[key][1]
                    del mine[key]
                    continue
                mine[key] = (mine[key][0], not mine[key][1])
        with lock:
            expected.update(mine)

    run_threads(THREADS, work)
    return pool, expected


def test_mixed_concurrent_workload_keeps_metadata_consistent(make_store):
    store = make_store(promotion_threshold=2)
    pool, expected = _mixed_workload(store, seed=1, rounds=150)
    assert sorted(store.keys()) == sorted(expected)
    for k, (c, prefix) in expected.items():
        assert same(store.get(k), pool[c]), k
        assert store.info(k).prefix == prefix, k
    s = store.stats()
    assert s.drops == 0 and s.demotions > 0
    assert s.blocks == len({c for c, _ in expected.values()})
    check_consistent(store)


def test_mixed_concurrent_workload_without_disk_only_drops_unprotected_keys(make_store):
    store = make_store(disk_path=None)
    pool, expected = _mixed_workload(store, seed=2, rounds=150, may_drop=True)
    keys = set(store.keys())
    assert keys <= set(expected)
    for k, (c, prefix) in expected.items():
        if k not in keys:
            assert not prefix, k  # only unprotected keys may have been dropped
            continue
        assert same(store.get(k), pool[c]), k
    assert store.stats().drops > 0
    check_consistent(store)


def test_concurrent_reads_of_one_disk_block_promote_it_once(make_store):
    store = make_store(promotion_threshold=2)
    store.put("cold", block(8 * KIB, seed=1))
    for i in range(8):
        store.put(f"fill{i}", block(8 * KIB, seed=10 + i))
    assert store.info("cold").tiers == ("disk",)

    def work(i):
        for _ in range(20):
            assert same(store.get("cold"), block(8 * KIB, seed=1))
            assert same(store.get(f"fill{i}"), block(8 * KIB, seed=10 + i))

    run_threads(THREADS, work)
    check_consistent(store)
    assert store.stats().drops == 0


def test_concurrent_put_and_delete_of_shared_bytes(make_store):
    store = make_store()
    x = block(16 * KIB, seed=1)

    def work(i):
        for j in range(40):
            store.put(f"k{i}", x, is_prefix=j % 5 == 0)
            assert same(store.get(f"k{i}"), x)
            store.delete(f"k{i}")

    run_threads(THREADS, work)
    s = store.stats()
    assert s.keys == 0 and s.blocks == 0 and s.protected_blocks == 0
    assert all(t.used_bytes == 0 for t in s.tiers)
    check_consistent(store)


def test_concurrent_persistent_puts_survive_reopen(make_store, disk_dir):
    store = make_store(persist=True)

    def work(i):
        for j in range(6):
            store.put(f"t{i}-{j}", block(4 * KIB, seed=(i * 6 + j) % 20), is_prefix=j == 0 and i < 4)

    run_threads(THREADS, work)
    check_consistent(store)
    store.close()
    with Store(CascadeConfig(host_capacity=HOST, disk_path=disk_dir, persist=True)) as reopened:
        assert len(reopened) == THREADS * 6
        for i in range(THREADS):
            for j in range(6):
                assert same(reopened.get(f"t{i}-{j}"), block(4 * KIB, seed=(i * 6 + j) % 20))
        assert reopened.stats().blocks == 20
        check_consistent(reopened)


def test_stats_snapshots_are_consistent_during_writes(make_store):
    store = make_store()
    writers_done = threading.Event()
    watching = threading.Event()
    finished = []
    seen: list[tuple[int, int]] = []

    def work(i):
        if i == 0:
            while not writers_done.is_set():
                s = store.stats()
                seen.append((s.keys, s.puts))
                assert s.keys <= s.puts and s.blocks <= s.keys
                assert s.tier("host").used_bytes <= HOST
                assert s.protected_in_memory == s.protected_blocks
                watching.set()
            return
        assert watching.wait(JOIN_TIMEOUT)
        for j in range(150):
            store.put(f"w{i}-{j % 16}", block(2 * KIB, seed=i * 100 + j % 7), is_prefix=j % 16 == 0)
        finished.append(i)
        if len(finished) == 3:
            writers_done.set()

    run_threads(4, work)
    check_consistent(store)
    assert len(store) == 3 * 16
    assert seen[0][0] == 0 and len(seen) > 1
