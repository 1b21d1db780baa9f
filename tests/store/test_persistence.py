"""Persistence: every acknowledged put survives a clean close and a kill -9; nothing half-written shows."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cascade_kv import CascadeConfig, StorageError, Store

from .conftest import HOST, KIB, block, same, values

# The workload, shared by the child (which runs it) and the parent (which knows what each ack means).
WORKLOAD = textwrap.dedent("""
    import numpy as np

    KEYS = 40

    def value(seed):
        kind = seed % 5
        nbytes = (512, 4 * 1024, 8 * 1024, 40 * 1024, 320 * 1024)[kind]  # the last is larger than the host
        dtype = (np.uint8, np.float32, ">i2", [("a", "<i4"), ("b", "<f4")], np.float64)[kind]
        raw = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
        arr = raw.view(np.dtype(dtype))
        return arr.reshape(4, -1) if kind in (1, 4) else arr

    def op(i):
        '''Op i: ("del", key) or ("put", key, seed, is_prefix). Seeds repeat, so contents dedup.'''
        if i % 6 == 5:
            return ("del", op(i - 1)[1])  # the key the previous op just put
        seed = i if i % 3 else i % 13
        prefix = i % 10 == 0 and seed % 5 < 3  # only small blocks are protected: they must fit in memory
        key = f"k{i % KEYS}" if i % 4 else f"k{i % KEYS}".encode()
        return ("put", key, seed, prefix)
""")

CHILD = WORKLOAD + textwrap.dedent("""
    import sys
    from cascade_kv import CascadeConfig, Store

    disk, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = Store(CascadeConfig(host_capacity=64 * 1024, disk_path=disk, persist=True))
    print("open", flush=True)
    for i in range(start, start + count):
        o = op(i)
        if o[0] == "del":
            if o[1] in store:  # absent when the put before it was in flight at the last kill
                store.delete(o[1])
        else:
            store.put(o[1], value(o[2]), is_prefix=o[3])
        print(i, flush=True)  # acknowledged: the call returned
    store.close()
    print("done", flush=True)
""")

WL: dict = {}
exec(WORKLOAD, WL)  # noqa: S102 (our own source text: the parent must run exactly what the child runs)


def _apply(model, i):
    o = WL["op"](i)
    if o[0] == "del":
        model.pop(o[1], None)
    else:
        model[o[1]] = (WL["value"](o[2]), o[3])


def _check_store_matches(store, model, in_flight):
    """Every acknowledged key has its bytes, dtype, shape and prefix flag; only the op in flight
    may have happened or not, and if it happened it happened whole."""
    allowed_extra = set()
    if in_flight is not None:
        allowed_extra.add(WL["op"](in_flight)[1])
    keys = set(store.keys())
    assert keys - set(model) <= allowed_extra, keys - set(model)
    assert set(model) - keys <= allowed_extra, set(model) - keys
    alt: dict = {}
    if in_flight is not None:
        _apply(alt, in_flight)
    for k in keys | set(model):
        candidates = []
        if k in model:
            candidates.append(model[k])
        if k in allowed_extra and k in alt:
            candidates.append(alt[k])
        if k not in keys:
            assert k in allowed_extra
            continue
        got, info = store.get(k), store.info(k)
        assert any(same(got, v) and info.prefix == p for v, p in candidates), k
    s = store.stats()
    assert s.protected_in_memory == s.protected_blocks
    root = store.tiers[1].root
    assert not any((root / "tmp").iterdir())  # no half-written block is visible (or left behind)
    files = [p for p in (root / "blocks").rglob("*") if p.is_file()]
    assert len(files) == s.blocks  # no orphan block files: each file belongs to a key


def _reopened_model(store, model, in_flight):
    """The model after the in-flight op turned out to have happened or not."""
    if in_flight is None:
        return model
    key = WL["op"](in_flight)[1]
    if key in store:
        model[key] = (store.get(key), store.info(key).prefix)
    else:
        model.pop(key, None)
    return model


def test_every_acknowledged_put_survives_kill_9(disk_dir):
    rng = random.Random(20261128)
    model: dict = {}
    start = 0
    rounds = int(os.environ.get("CASCADE_CRASH_ROUNDS", "6"))  # more to run it big (the note: 40)
    for _ in range(rounds):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(disk_dir), str(start), "100000"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "open", child.stderr.read()
            acked = []
            for _ in range(rng.randint(0, 40)):
                line = child.stdout.readline().strip()
                assert line.isdigit(), (line, child.stderr.read() if not line else "")
                acked.append(int(line))
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.02))  # land anywhere inside the next put
            child.send_signal(signal.SIGKILL)
            rest, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, err
        acked += [int(x) for x in rest.split()]  # printed before it died: acknowledged too
        assert acked == list(range(start, start + len(acked)))
        for i in acked:
            _apply(model, i)
        in_flight = start + len(acked)
        with Store(CascadeConfig(host_capacity=HOST, disk_path=disk_dir, persist=True)) as store:
            _check_store_matches(store, model, in_flight)
            model = _reopened_model(store, model, in_flight)
        start = in_flight + 1
    assert start > 12  # the rounds really ran a workload
    print(f"kill -9 rounds: {rounds}, acknowledged operations: {start - rounds}, lost: 0")  # shown with -s


def test_clean_close_and_reopen_keeps_everything(make_store):
    store = make_store(persist=True)
    vals = {
        "u8": block(seed=1), b"bytes-key": block(seed=2, dtype=np.float32, shape=(16, 128)),
        "be": block(4 * KIB, seed=3, dtype=">i4"), "rec": block(4 * KIB, seed=4, dtype=[("a", "<i2"), ("b", "<f2")]),
        "f16": block(4 * KIB, seed=5, dtype=np.float16, shape=(2, 4, 256)), "scalar": np.array(7, dtype=np.int64),
        "empty": np.empty((0, 3), np.float32), "dup": block(seed=1, dtype=np.int16, shape=(64, 64)),
        "big": block(HOST + KIB, seed=6), "gone": block(seed=7), "over": block(seed=8),
    }
    for k, v in vals.items():
        store.put(k, v)
    store.put("p", block(seed=9), is_prefix=True)
    store.put("unp", block(seed=10), is_prefix=True)
    store.unprotect("unp")
    store.put("prot", block(seed=11))
    store.protect("prot")
    store.delete("gone")
    store.put("over", block(seed=12))
    for i in range(10):  # push most blocks down to disk
        store.put(f"fill{i}", block(seed=100 + i))
    expected = values(store)
    blocks = store.stats().blocks
    store.close()
    reopened = make_store(persist=True)
    assert values(reopened) == expected
    assert "gone" not in reopened and same(reopened.get("over"), block(seed=12))
    assert [reopened.info(k).prefix for k in ("p", "unp", "prot", "u8")] == [True, False, True, False]
    s = reopened.stats()
    assert s.blocks == blocks and s.keys == len(expected)
    assert s.protected_blocks == 2 and s.protected_in_memory == 2
    assert "host" in reopened.info("p").tiers and "host" in reopened.info("prot").tiers
    assert reopened.info("dup").shared_by == 2  # dedup survives: one block for "u8" and "dup"
    reopened.put("again", block(seed=1))
    assert reopened.stats().dedup_hits == 1 and reopened.stats().blocks == blocks


def test_reopen_without_dedup_keeps_every_copy(make_store):
    store = make_store(persist=True, dedup_enabled=False)
    for k in ("a", "b"):
        store.put(k, block(seed=1))
    store.close()
    reopened = make_store(persist=True, dedup_enabled=False)
    assert reopened.stats().blocks == 2
    assert same(reopened.get("a"), block(seed=1)) and same(reopened.get("b"), block(seed=1))
    reopened.put("c", block(seed=1))
    assert reopened.stats().blocks == 3


def test_every_persistent_put_is_on_disk_before_put_returns(make_store):
    store = make_store(persist=True)
    store.put("p", block(seed=1), is_prefix=True)
    store.put("u", block(seed=2))
    for k in ("p", "u"):
        assert "disk" in store.info(k).tiers
        path = store.tiers[1].path(bytes.fromhex(store.info(k).digest))
        assert path.read_bytes() == store.get(k).tobytes()


def test_a_second_persistent_store_on_the_same_directory_is_refused(make_store, disk_dir):
    first = make_store(persist=True)
    first.put("a", block(seed=1))
    with pytest.raises(StorageError) as err:
        Store(CascadeConfig(host_capacity=HOST, disk_path=disk_dir, persist=True))
    assert isinstance(err.value, OSError) and str(disk_dir) in str(err.value)
    assert same(first.get("a"), block(seed=1))  # the first store is unharmed
    first.put("b", block(seed=2))
    first.close()
    second = make_store(persist=True)  # free once the first is closed
    assert sorted(second.keys()) == ["a", "b"]


def test_a_second_persistent_store_from_another_process_is_refused(make_store, disk_dir):
    make_store(persist=True)
    code = textwrap.dedent(f"""
        from cascade_kv import CascadeConfig, Store, StorageError
        try:
            Store(CascadeConfig(host_capacity=65536, disk_path={str(disk_dir)!r}, persist=True))
        except StorageError:
            print("refused")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "refused", out.stderr


def test_leftovers_of_a_crash_are_cleaned_on_open(make_store, disk_dir):
    store = make_store(persist=True)
    store.put("a", block(seed=1))
    store.close()
    (disk_dir / "tmp" / "half-written.tmp").write_bytes(b"\1" * 100)
    orphan_id = bytes(32 * [7])
    orphan_path = store.tiers[1].path(orphan_id)
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(b"\2" * 100)  # a block file whose put crashed before its journal record
    with open(disk_dir / "journal.log", "ab") as f:
        f.write(b"\x40\0\0\0garbage")  # a torn last record
    reopened = make_store(persist=True)
    assert reopened.keys() == ["a"] and same(reopened.get("a"), block(seed=1))
    assert not any((disk_dir / "tmp").iterdir())
    assert not orphan_path.exists()
    reopened.put("b", block(seed=2))  # the journal is appendable after the torn record
    reopened.close()
    assert sorted(make_store(persist=True).keys()) == ["a", "b"]


def test_a_non_persistent_store_removes_its_files_on_close(make_store, disk_dir):
    store = make_store()
    for i in range(12):
        store.put(f"k{i}", block(seed=i))
    assert any(p.is_file() for p in (disk_dir / "blocks").rglob("*"))
    store.close()
    assert not any(p.is_file() for p in (disk_dir / "blocks").rglob("*"))


def test_reopening_with_another_hash_algorithm_is_refused_not_quarantined(tmp_path):
    """Block files are named by their digest: a store hashing with another algorithm would find every
    file 'corrupt'. The directory says which algorithm wrote it, and another one is refused."""
    import numpy as np

    from cascade_kv import CascadeConfig, ConfigError, Store

    with Store(CascadeConfig(host_capacity=1 << 20, disk_path=tmp_path, persist=True)) as s:
        s.put("k", np.arange(100))
    with pytest.raises(ConfigError, match="hash_algorithm"):
        Store(CascadeConfig(host_capacity=1 << 20, disk_path=tmp_path, persist=True, hash_algorithm="sha256"))
    with Store(CascadeConfig(host_capacity=1 << 20, disk_path=tmp_path, persist=True)) as s:
        assert (s.get("k") == np.arange(100)).all()
        assert s.stats().quarantined == 0
