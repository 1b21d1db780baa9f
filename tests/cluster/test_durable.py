"""A persistent distributed store (issue 12): per-home journals, the manifest switch, recovery under another
rank count, crash windows, and a job killed with SIGKILL mid-workload.

The unit tests drive :mod:`cascade_kv.cluster.durable` with ranks simulated by threads (its ``comm`` is
anything with ``allgather``, ``bcast`` and ``Barrier``). The MPI tests run this file as its own MPI program
(``python -m mpi4py test_durable.py PHASE DIR [N]``), as ``test_store.py`` does; MPI is imported only there.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

KIB = 1024
STRUCT = np.dtype([("pos", "<i4"), ("w", "<f2"), ("tag", "S2")])


def _value(tag: str, nbytes: int = 4 * KIB, dtype: np.dtype | str = "uint8") -> np.ndarray:
    """Pseudo-random bytes named by ``tag`` (any process rebuilds them)."""
    dt = np.dtype(dtype)
    raw = np.random.default_rng(zlib.crc32(tag.encode())).integers(0, 256, size=nbytes, dtype=np.uint8)
    return raw[: nbytes // dt.itemsize * dt.itemsize].view(dt)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ unit tests: ranks as threads
class _Ranks:
    """``size`` simulated ranks: each gets a comm whose collectives meet at a thread barrier."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._slots: list[object] = [None] * size

    def comm(self, rank: int) -> object:
        ranks = self

        class Comm:
            def allgather(self, x: object) -> list[object]:
                ranks._slots[rank] = x
                ranks._barrier.wait()
                out = list(ranks._slots)
                ranks._barrier.wait()
                return out

            def bcast(self, x: object, root: int = 0) -> object:
                return self.allgather(x)[root]

            def Barrier(self) -> None:
                ranks._barrier.wait()

        return Comm()

    def run(self, fn) -> list[object]:
        """``fn(rank, comm)`` on every rank; the results, or the first exception raised."""
        results: list[object] = [None] * self.size

        def one(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.comm(rank))
            except BaseException as e:  # handed to the test thread below
                results[rank] = e

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results


def _disk(root: Path):
    from cascade_kv.hashing import Hasher
    from cascade_kv.tiers.disk import DiskTier

    return DiskTier(root, Hasher("blake3"), durable=True)


def _open(root: Path, size: int, **kwargs) -> list:
    from cascade_kv.cluster.durable import open_directory

    return _Ranks(size).run(lambda rank, comm: open_directory(comm, rank, size, _disk(root), "blake3", **kwargs))


def _write_block(root: Path, data: np.ndarray) -> bytes:
    from cascade_kv.hashing import Hasher

    disk = _disk(root)
    digest = Hasher("blake3").digest(memoryview(data).cast("B"))
    disk.allocate(digest, data.nbytes)
    disk.write(digest, memoryview(data).cast("B"))
    return digest


def _states(recoveries: list) -> list:
    from cascade_kv.cluster.durable import JournalledState

    states = []
    for rank, rec in enumerate(recoveries):
        s = JournalledState(rec.journal)
        s.restore(rec, rank)
        states.append(s)
    return states


def _bind(states: list, key, data: np.ndarray, root: Path, prefix: bool = False) -> bytes:
    from cascade_kv.cluster.directory import KeyRecord, dtype_text
    from cascade_kv.cluster.homes import home_of_key

    digest = _write_block(root, data.reshape(-1).view(np.uint8))
    states[home_of_key(key, len(states))].bind(key, KeyRecord(digest, dtype_text(data.dtype), data.shape, prefix))
    return digest


def _close(recoveries: list) -> None:
    from cascade_kv.cluster.durable import release_lock

    for rec in recoveries:
        rec.journal.close()
        release_lock(rec)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _populate(root: Path, size: int = 2) -> dict:
    """A directory written by a job of ``size`` ranks: puts (two keys share a block), an overwrite, a delete,
    a protect, an unprotect, a structured dtype. The expected keys: ``key -> (array, prefix)``."""
    recs = _open(root, size)
    states = _states(recs)
    expected = {}
    for i in range(12):
        v = _value(f"u/{i}")
        _bind(states, f"k{i}", v, root, prefix=i % 4 == 0)
        expected[f"k{i}"] = (v, i % 4 == 0)
    shared = _value("u/3")
    _bind(states, b"bytes-key", shared, root)  # same block as k3
    expected[b"bytes-key"] = (shared, False)
    s = _value("struct", 8 * STRUCT.itemsize, STRUCT)
    _bind(states, "struct", s, root)
    expected["struct"] = (s, False)
    _bind(states, "k5", _value("u/5b"), root)  # overwrite
    expected["k5"] = (_value("u/5b"), False)
    from cascade_kv.cluster.homes import home_of_key

    for key, prefix in (("k7", True), ("k8", False)):
        states[home_of_key(key, size)].set_prefix(key, prefix)
        expected[key] = (expected[key][0], prefix)
    states[home_of_key("k2", size)].unbind("k2")
    del expected["k2"]
    _close(recs)
    return expected


def _check(recoveries: list, expected: dict) -> None:
    from cascade_kv.cluster.directory import dtype_of
    from cascade_kv.cluster.homes import home_of_digest, home_of_key

    size = len(recoveries)
    found = {}
    for rank, rec in enumerate(recoveries):
        for key, r in rec.keys.items():
            assert home_of_key(key, size) == rank, (key, rank)
            found[key] = r
    assert set(found) == set(expected)
    refs: dict[bytes, list[int]] = {}
    for key, (v, prefix) in expected.items():
        r = found[key]
        assert dtype_of(r.dtype) == v.dtype and r.shape == v.shape and r.prefix == prefix, (key, r)
        c = refs.setdefault(r.digest, [0, 0])
        c[0] += 1
        c[1] += prefix
    for rank, rec in enumerate(recoveries):
        for d, c in rec.digests.items():
            assert home_of_digest(d, size) == rank
            assert [c.refs, c.protected] == refs[d], (d.hex(), c, refs[d])
    assert sum(len(rec.digests) for rec in recoveries) == len(refs)


@pytest.mark.parametrize("new_size", [1, 2, 3, 4])
def test_every_key_comes_back_at_its_new_home_with_refs_and_protection(tmp_path, new_size):
    expected = _populate(tmp_path, 2)
    recs = _open(tmp_path, new_size)
    try:
        _check(recs, expected)
        assert recs[0].manifest.ranks == new_size and recs[0].lost_keys == 0 and recs[0].recovered_keys == len(expected)
    finally:
        _close(recs)
    epochs = sorted(p.name for p in (tmp_path / "journal").iterdir() if p.is_dir())
    assert epochs == [f"{recs[0].manifest.epoch:010d}"], epochs  # the old epoch is gone


def test_files_are_private(tmp_path):
    _populate(tmp_path)
    for p in [tmp_path / "FORMAT", tmp_path / "LOCK", tmp_path / "journal" / "MANIFEST",
              *(tmp_path / "journal").rglob("*.log"), *(tmp_path / "blocks").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


@pytest.mark.parametrize("stop", ["written", "switched"])
def test_an_open_killed_between_its_steps_leaves_a_directory_the_next_open_recovers(tmp_path, stop):
    from cascade_kv.cluster.durable import read_manifest

    expected = _populate(tmp_path, 2)
    before = read_manifest(tmp_path)
    assert _open(tmp_path, 3, stop_after=stop) == [None] * 3
    after = read_manifest(tmp_path)
    assert (after == before) if stop == "written" else (after.epoch > before.epoch and after.ranks == 3)
    for p in (tmp_path / "LOCK",):
        assert p.exists()
    recs = _open(tmp_path, 2)
    try:
        _check(recs, expected)
    finally:
        _close(recs)
    assert len([p for p in (tmp_path / "journal").iterdir() if p.is_dir()]) == 1


def test_a_torn_tail_loses_only_the_unanswered_record_and_orphans_go(tmp_path):
    from cascade_kv import catalog
    from cascade_kv.cluster.durable import journal_path, read_manifest

    expected = _populate(tmp_path, 1)
    m = read_manifest(tmp_path)
    orphan = _write_block(tmp_path, _value("orphan"))  # a put that died before its bind
    rec = catalog.KeyRecord("late", orphan, 4 * KIB, np.dtype("uint8"), (4 * KIB,), False)
    with open(journal_path(tmp_path, m.epoch, 0), "ab") as f:
        f.write(catalog.put_record(rec)[:-7])  # killed mid-append: the put was never answered
    recs = _open(tmp_path, 2)
    try:
        _check(recs, expected)
        # this one, and the blocks of the overwritten and the deleted key (here nothing freed them)
        assert sum(r.orphans_removed for r in recs) == 3 and not recs[0].damaged
    finally:
        _close(recs)
    assert not _disk(tmp_path).path(orphan).exists()


def test_a_damaged_journal_keeps_unaccounted_block_files(tmp_path):
    from cascade_kv.cluster.durable import journal_path, read_manifest

    expected = _populate(tmp_path, 1)
    m = read_manifest(tmp_path)
    path = journal_path(tmp_path, m.epoch, 0)
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF  # one flipped byte inside the first record
    path.write_bytes(bytes(data))
    recs = _open(tmp_path, 1)
    try:
        assert recs[0].damaged and recs[0].orphans_removed == 0 and recs[0].orphans_kept >= 1
        assert recs[0].recovered_keys == len(expected) - 1
    finally:
        _close(recs)


def test_a_flipped_journal_byte_never_brings_back_an_older_state(tmp_path):
    """Every byte of a home's journal (puts, an overwrite, a delete, a protect, an unprotect) flipped in turn:
    a header byte is repaired, a payload byte drops at most the key of its record; no key is ever served
    as an older record had it. A full open of a few of them keeps the damaged journal and every block file."""
    from cascade_kv import catalog
    from cascade_kv.cluster.durable import journal_path, read_epoch, read_manifest

    expected = _populate(tmp_path, 1)
    m = read_manifest(tmp_path)
    path = journal_path(tmp_path, m.epoch, 0)
    data = path.read_bytes()
    truth, damaged, lost = read_epoch(tmp_path, m)
    assert set(truth) == set(expected) and not damaged and not lost
    spans, off = [], 0
    while off < len(data):
        end = off + 24 + int.from_bytes(data[off + 4:off + 8], "little")
        spans.append((off, end, catalog._decode_key(json.loads(data[off + 24:end])["k"])))
        off = end
    for off in range(len(data)):
        start, end, key = next(s for s in spans if s[0] <= off < s[1])
        broken = bytearray(data)
        broken[off] ^= 0x5A
        path.write_bytes(bytes(broken))
        got, damaged, lost = read_epoch(tmp_path, m)
        assert all(got[k] == truth[k] for k in got), off  # never stale
        if off - start < 24:
            assert got == truth and not damaged, off
        else:
            assert len(damaged) == 1 and set(truth) - set(got) <= {key}, off
    path.write_bytes(data)
    blocks = {p.name for p in (tmp_path / "blocks").rglob("*") if p.is_file()}
    work = tmp_path.parent / f"{tmp_path.name}-work"
    for start, end, key in spans[::4]:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path, work)
        broken = bytearray(data)
        broken[end - 3] ^= 0x5A  # the record's payload: its key is dropped (or decided by a later record)
        journal_path(work, m.epoch, 0).write_bytes(bytes(broken))
        recs = _open(work, 1)
        try:
            assert recs[0].damaged and recs[0].journal_lost_keys <= 1 and recs[0].orphans_removed == 0
            assert set(expected) - {key} <= set(recs[0].keys) <= set(expected)
        finally:
            _close(recs)
        kept = {p.name.split(".")[0] for p in (work / "quarantine").rglob("*") if p.is_file()}
        assert blocks <= {p.name for p in (work / "blocks").rglob("*") if p.is_file()} | kept
        assert any((work / "quarantine").glob("journal-*")), "the damaged journal is kept"
    shutil.rmtree(work, ignore_errors=True)


def test_a_key_whose_block_is_missing_or_torn_is_dropped_and_counted(tmp_path):
    expected = _populate(tmp_path, 2)
    recs = _open(tmp_path, 1)
    digests = {r.digest: k for k, r in recs[0].keys.items()}
    _close(recs)
    disk = _disk(tmp_path)
    victims = [d for d in digests if sum(1 for r in recs[0].keys.values() if r.digest == d) == 1][:2]
    disk.path(victims[0]).unlink()
    with open(disk.path(victims[1]), "r+b") as f:
        f.truncate(100)
    recs = _open(tmp_path, 2)
    try:
        assert recs[0].lost_keys == 2
        found = {k for r in recs for k in r.keys}
        assert found == set(expected) - {digests[v] for v in victims}
    finally:
        _close(recs)
    assert any((tmp_path / "quarantine").iterdir())  # the torn one is kept for a look


def test_a_second_job_is_refused_and_a_failed_open_changes_nothing(tmp_path):
    from cascade_kv.errors import CascadeError, ConfigError, StorageError

    _populate(tmp_path, 2)
    recs = _open(tmp_path, 2)
    try:
        snapshot = _tree(tmp_path)
        with pytest.raises(StorageError) as e:
            _open(tmp_path, 2)
        assert isinstance(e.value, CascadeError) and isinstance(e.value, OSError) and "in use" in str(e.value)
        assert _tree(tmp_path) == snapshot
    finally:
        _close(recs)
    snapshot = _tree(tmp_path)
    (tmp_path / "journal" / "MANIFEST").write_bytes(b"cascade-kv cluster manifest v1 epoch=9 ranks=2 crc=00000000\n")
    with pytest.raises(StorageError, match="damaged"):
        _open(tmp_path, 2)
    single = tmp_path / "single"
    single.mkdir()
    (single / "journal.log").write_bytes(b"")
    with pytest.raises(ConfigError, match="single-node"):
        _open(single, 1)
    assert set(_tree(tmp_path)) - {"journal/MANIFEST", "single/journal.log", "single/LOCK"} == set(snapshot) - {
        "journal/MANIFEST"}


def test_a_missing_journal_refuses_the_open(tmp_path):
    from cascade_kv.cluster.durable import journal_path, read_manifest
    from cascade_kv.errors import StorageError

    _populate(tmp_path, 2)
    journal_path(tmp_path, read_manifest(tmp_path).epoch, 1).unlink()
    snapshot = _tree(tmp_path)
    with pytest.raises(StorageError, match="missing"):
        _open(tmp_path, 2)
    assert _tree(tmp_path) == snapshot


def test_a_failed_journal_append_changes_nothing(tmp_path):
    from cascade_kv.cluster.directory import KeyRecord

    recs = _open(tmp_path, 1)
    state = _states(recs)[0]
    recs[0].journal.close()  # appends now fail (EBADF: an OSError; a failing disk raises StorageError)
    with pytest.raises(OSError):
        state.bind("x", KeyRecord(b"\x01" * 32, "|u1", (4,), False))
    assert state.lookup("x") is None
    _close(recs)


# ------------------------------------------------------------------ MPI tests
def _ranks(n: int, phase: str, directory: Path, *extra: str, timeout: float = 60) -> str:
    from .conftest import run_ranks

    out = run_ranks(n, [sys.executable, "-m", "mpi4py", __file__, phase, str(directory), *extra], timeout)
    for rank in range(n):
        assert f"rank {rank}: ok" in out, out
    return out


def test_a_cluster_directory_reopens_on_one_two_and_four_ranks(tmp_path):
    _ranks(2, "write", tmp_path / "d")
    for n in (1, 4, 2):
        _ranks(n, "read", tmp_path / "d")


def _job_env(scratch: Path) -> dict[str, str]:
    """Launcher environment whose Open MPI session files and shared-memory segments go under ``scratch``:
    a job killed with SIGKILL cannot clean them up, and they must not pile up in /tmp and /dev/shm."""
    from cascade_kv.cluster.launch import local_mpi_env

    env = local_mpi_env()
    env.update(TMPDIR=str(scratch), OMPI_MCA_btl_sm_backing_directory=str(scratch),
               OMPI_MCA_osc_sm_backing_directory=str(scratch), PYTHONUNBUFFERED="1")
    return env


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once (mpiexec puts each rank in its own group)."""
    from cascade_kv.cluster.launch import _descendants

    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)  # freeze all first: no rank outlives the others by a step
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _crash_round(tmp_path: Path, directory: Path, round_no: int, acks_wanted: int, earlier: list[str]
                 ) -> list[str]:
    """One job doing persistent puts, deletes and protects, killed after ``acks_wanted`` acknowledgements;
    then a new job (1, 2 or 3 ranks) checks them and those of every ``earlier`` round. This round's acks."""
    from cascade_kv.cluster.launch import mpiexec_path

    scratch = tmp_path / f"job{round_no}"
    scratch.mkdir()
    cmd = [str(mpiexec_path()), "-n", "2", sys.executable, "-m", "mpi4py", __file__, "work", str(directory),
           str(round_no)]
    proc = subprocess.Popen(cmd, env=_job_env(scratch), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    acks: list[str] = []
    other: list[bytes] = []  # everything but acks (tracebacks, MPI errors): the failure message shows it
    buf = b""
    try:
        while len(acks) < acks_wanted:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            said = b"\n".join([*other[-200:], buf]).decode(errors="replace")
            assert ready, f"no output from the job for 60 s; acks so far {len(acks)}\n{said}"
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the job ended (exit {proc.wait()}) before {acks_wanted} acks, {len(acks)} seen:\n{said}"
            buf += chunk
            *lines, rest = buf.split(b"\n")
            buf = rest
            acks += [ln.decode() for ln in lines if ln.startswith(b"ack ")]
            other += [ln for ln in lines if not ln.startswith(b"ack ")]
    finally:
        _kill_job(proc)
        proc.stdout.close()
    expect = tmp_path / f"acks{round_no}.json"
    expect.write_text(json.dumps(earlier + acks))
    _ranks(1 + round_no % 3, "check", directory, str(expect))
    return acks


def _crash_rounds(tmp_path: Path, rounds: int) -> None:
    directory = tmp_path / "d"
    shm_before = set(os.listdir("/dev/shm"))
    acks: list[str] = []
    for i in range(rounds):
        acks += _crash_round(tmp_path, directory, i, 10 + (i * 17) % 40, acks)
    puts = {a.split()[2] for a in acks if a.startswith("ack put ")}
    deletes = {a.split()[2] for a in acks if a.startswith("ack del ")}
    print(f"crash rounds: {rounds}, acks {len(acks)}: {len(puts)} keys put ({len(puts - deletes)} live, "
          f"{len(deletes)} deleted), each checked after every later round; lost 0")
    leftovers = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("sm_segment.")}
    # other jobs on this machine make their own segments; ours go to the scratch dirs, so none may name them
    assert not {n for n in leftovers if any((tmp_path / f"job{i}" / n).exists() for i in range(rounds))}


def test_a_job_killed_mid_workload_loses_no_acknowledged_key(tmp_path):
    _crash_rounds(tmp_path, int(os.environ.get("CASCADE_CRASH_ROUNDS", "3")))


# ------------------------------------------------------------------ MPI phases (this file as an MPI program)
def _store(comm, directory: str, **overrides):
    from cascade_kv.cluster.store import DistributedStore

    overrides.setdefault("host_capacity", "256KiB")
    return DistributedStore(comm=comm, disk_path=directory, persist=True, timeout=20, **overrides)


def _write_phase(comm, directory: str) -> None:
    rank = comm.Get_rank()
    with _store(comm, directory) as s:
        for i in range(30):
            s.put(f"w/{rank}/{i}", _value(f"w/{rank}/{i}"), is_prefix=i % 10 == 0)
        s.put(f"w/{rank}/shared", _value("w/0/1"))  # dedup with a key of rank 0
        s.put(f"w/{rank}/struct", _value(f"s/{rank}", 16 * STRUCT.itemsize, STRUCT))
        s.delete(f"w/{rank}/2")
        s.protect(f"w/{rank}/3")
        s.unprotect(f"w/{rank}/10")
        s.put(f"w/{rank}/4", _value(f"w/{rank}/4b"))  # overwrite
        s.barrier()


def _read_phase(comm, directory: str) -> None:
    rank, size = comm.Get_rank(), comm.Get_size()
    with _store(comm, directory) as s:
        for r in range(2):
            for i in range(30):
                key = f"w/{r}/{i}"
                if i == 2:
                    assert not s.contains(key), key
                    continue
                want = _value(f"w/{r}/4b" if i == 4 else key)
                assert _same(s.get(key), want), key
                assert s.info(key).prefix == (i in (0, 3, 20)), (key, s.info(key))
            assert _same(s.get(f"w/{r}/shared"), _value("w/0/1"))
            got = s.get(f"w/{r}/struct")
            assert got.dtype == STRUCT and _same(got, _value(f"s/{r}", 16 * STRUCT.itemsize, STRUCT)), got.dtype
        cs = s.cluster_stats()
        assert cs.keys == 2 * 31, cs.keys
        assert cs.protected_blocks == 6 and cs.protected_in_memory == 6, (cs.protected_blocks, cs.protected_in_memory)
        assert comm.allreduce(s.durable.recovered_keys if rank == 0 else 0) == 62
        s.barrier()
    del size


def _work_tag(key: str, i: int) -> str:
    """What the work phase's ``i``-th put stores under ``key``: every third shares its block with keys of every
    round, and protected keys (``i % 7 == 0``) use a few blocks between them. Protected blocks must stay in
    memory, so a store refuses one that does not fit (CapacityError): with a block of its own per protected key,
    20-odd rounds filled the 2 x 128 KiB of the work job and the next one died before its acks."""
    if i % 3 == 0:
        return f"c/{i % 9}"
    return f"c/p{i % 4}" if i % 7 == 0 else key


def _work_phase(comm, directory: str, round_no: str) -> None:
    """Puts (some protected, some sharing a block), deletes and overwrites, printing each acknowledgement
    after the call returned, until killed."""
    rank = comm.Get_rank()
    with _store(comm, directory, host_capacity="128KiB") as s:
        for i in range(100000):
            key = f"c/{round_no}/{rank}/{i}"
            tag = _work_tag(key, i)
            s.put(key, _value(tag), is_prefix=i % 7 == 0)
            print(f"ack put {key} {tag} {int(i % 7 == 0)}", flush=True)
            if i % 5 == 4:
                old = f"c/{round_no}/{rank}/{i - 3}"
                s.delete(old)
                print(f"ack del {old}", flush=True)


def _check_phase(comm, directory: str, acks_file: str) -> None:
    """Every acknowledged key of every round so far is there with its exact bytes (or acknowledged deleted),
    protected keys protected, and no key, acknowledged or not, reads torn bytes."""
    acks = json.loads(Path(acks_file).read_text())
    put: dict[str, tuple[str, bool]] = {}
    deleted = set()
    for a in acks:
        parts = a.split()
        if parts[1] == "put":
            put[parts[2]] = (parts[3], parts[4] == "1")
        else:
            deleted.add(parts[2])
    with _store(comm, directory) as s:
        for key, (tag, prefix) in put.items():
            if key in deleted:
                assert not s.contains(key), f"{key}: deleted (acknowledged), still there"
                continue
            if int(key.rsplit("/", 1)[1]) % 5 == 1 and not s.contains(key):
                continue  # deleted by the schedule at step i + 3, whose ack the test may not have seen
            assert s.contains(key), f"{key}: acknowledged put lost"
            assert _same(s.get(key), _value(tag)), f"{key}: wrong bytes"
            assert s.info(key).prefix == prefix, key
        for key in s.keys():  # unacknowledged puts may or may not be there; never torn
            if key.startswith("c/") and key not in put:
                got = s.get(key)
                i = int(key.rsplit("/", 1)[1])
                assert _same(got, _value(_work_tag(key, i))), f"{key}: torn"
        s.barrier()


def _main(phase: str, directory: str, *extra: str) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    {"write": _write_phase, "read": _read_phase, "work": _work_phase, "check": _check_phase}[phase](
        comm, directory, *extra)
    print(f"rank {comm.Get_rank()}: ok", flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:])
