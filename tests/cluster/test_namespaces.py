"""Namespaces on the distributed store, over 2 real ranks: keys apart across ranks, the issue's attack (a
guess of another namespace's bytes takes the miss path), per-namespace counters summed over ranks, the
cluster-wide protected quota, and a persistent store reopened with its namespaced keys.

Also the MPI program itself (``python -m mpi4py test_namespaces.py PHASES``), as ``test_store.py``. Verdicts are
reached on values gathered from every rank, so every rank fails or passes together.
"""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np

BLOCK = 64 * 1024
TIMEOUT = 10.0


def _run(phases: str) -> None:
    from .conftest import run_scenario  # here: this file is also run as a plain MPI program, outside the package

    run_scenario(__file__, 2, phases, 120)


def test_namespaces_across_ranks() -> None:
    _run("isolation,attack,quota")


def test_a_persistent_distributed_store_reopens_with_namespaced_keys() -> None:
    _run("persist")


# ------------------------------------------------------------------ phases (run under mpiexec)
def _value(tag: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(tag.encode())).integers(0, 256, size=BLOCK, dtype=np.uint8)


def _open(comm, root: Path, **overrides):
    from cascade_kv.cluster.store import DistributedStore

    overrides.setdefault("host_capacity", 16 * BLOCK)
    overrides.setdefault("disk_path", root / "disk")
    return DistributedStore(comm=comm, timeout=TIMEOUT, **overrides)


def _counts(s) -> tuple:
    """Every counter of a snapshot except the shared tiers' capacity figures."""
    return (s.keys, s.blocks, s.logical_bytes, s.unique_bytes, s.protected_blocks, s.puts, s.gets, s.misses,
            s.deletes, s.dedup_hits, s.dedup_bytes_saved, [(t.name, t.hits, t.misses, t.bytes_read, t.bytes_written,
                                                            t.evictions, t.blocks) for t in s.tiers])


def _isolation(comm, root: Path) -> None:
    from mpi_program import agree  # this folder is on sys.path when the file runs as a program

    from cascade_kv import BlockNotFound

    rank = comm.Get_rank()
    store = _open(comm, root)
    a, b = store.namespace("a"), store.namespace("b")
    if rank == 0:
        store.put("k", _value("default"))
        a.put_many(["k", b"raw"], [_value("a"), _value("a-raw")])
    comm.Barrier()
    ok = sorted(map(repr, a.keys())) == sorted(map(repr, ["k", b"raw"])) and store.keys() == ["k"]
    ok &= b.keys() == [] and len(a) == 2 and len(store) == 1 and "k" in a and b"raw" not in store
    ok &= a.get("k").tobytes() == _value("a").tobytes() and store.get("k").tobytes() == _value("default").tobytes()
    try:
        b.get("k")
        ok = False
    except BlockNotFound:
        pass
    agree(comm, ok, "keys of each namespace, seen from every rank")
    if rank == 1:
        a.delete("k")
    comm.Barrier()
    agree(comm, "k" not in a and "k" in store, "a delete in one namespace leaves the other's key")
    store.close()


def _attack(comm, root: Path) -> None:
    from mpi_program import agree  # this folder is on sys.path when the file runs as a program

    rank = comm.Get_rank()
    store = _open(comm, root)
    a, b = store.namespace("tenant-a"), store.namespace("tenant-b")
    x = _value("secret")
    if rank == 0:
        a.put("secret", x)
    comm.Barrier()
    a_before = store.cluster_stats(namespace="tenant-a")
    total = store.cluster_stats(all_namespaces=True)
    if rank == 1:  # the guess, from another rank
        b.put("guess", x)
    comm.Barrier()
    sb, sa = store.cluster_stats(namespace="tenant-b"), store.cluster_stats(namespace="tenant-a")
    after = store.cluster_stats(all_namespaces=True)
    checks = [sb.dedup_hits == 0, sb.puts == 1, sb.blocks == 1,
              _counts(sa) == _counts(a_before),  # tiers' used bytes are shared: compared apart from them
              b.info("guess").shared_by == 1, a.info("secret").shared_by == 1,
              after.blocks == total.blocks + 1, after.dedup_hits == total.dedup_hits == 0,
              after.tier("host").bytes_written == total.tier("host").bytes_written + x.nbytes]  # stored again
    agree(comm, all(checks), f"a guess of another namespace's bytes takes the miss path {checks}")
    if rank == 0:  # inside one namespace, dedup still works across ranks
        b.put("again", x)
    comm.Barrier()
    agree(comm, store.cluster_stats(namespace="tenant-b").dedup_hits == 1, "dedup inside a namespace")
    store.close()


def _quota(comm, root: Path) -> None:
    from mpi_program import agree  # this folder is on sys.path when the file runs as a program

    from cascade_kv import CapacityError

    rank = comm.Get_rank()
    store = _open(comm, root)
    q = store.namespace("q", protected_quota=2 * BLOCK)
    if rank == 0:
        q.put_many(["p0", "p1"], [_value("p0"), _value("p1")], is_prefix=True)
    comm.Barrier()
    refused = False
    if rank == 1:  # the other rank sees the bytes protected from rank 0: the bound is cluster-wide
        try:
            q.put("p2", _value("p2"), is_prefix=True)
        except CapacityError as e:
            refused = "protected_quota" in str(e)
        refused &= "p2" not in q
        q.put("p2", _value("p2"))  # unprotected: no quota
        try:
            q.protect("p2")
        except CapacityError:
            refused &= not q.info("p2").prefix
        else:
            refused = False
        q.unprotect("p0")
        q.protect("p2")
    comm.Barrier()
    ok = refused if rank == 1 else True
    ok &= store.cluster_stats(namespace="q").protected_blocks == 2
    agree(comm, ok, "protected_quota over the cluster")
    store.close()


def _persist(comm, root: Path) -> None:
    from mpi_program import agree  # this folder is on sys.path when the file runs as a program

    rank = comm.Get_rank()
    store = _open(comm, root, persist=True)
    a = store.namespace("a")
    if rank == 0:
        a.put_many(["k", b"b"], [_value("a-k"), _value("a-b")], is_prefix=[True, False])
        store.put("k", _value("d-k"))
    if rank == 1:
        a.put("gone", _value("gone"))
        a.delete("gone")
    comm.Barrier()
    store.close()
    store = _open(comm, root, persist=True)
    a = store.namespace("a")
    ok = sorted(map(repr, a.keys())) == sorted(map(repr, ["k", b"b"])) and store.keys() == ["k"]
    ok &= a.get("k").tobytes() == _value("a-k").tobytes() and a.info("k").prefix
    ok &= store.get("k").tobytes() == _value("d-k").tobytes() and a.get(b"b").tobytes() == _value("a-b").tobytes()
    agree(comm, ok, "namespaced keys after reopening")
    store.close()


PHASES = {"isolation": _isolation, "attack": _attack, "quota": _quota, "persist": _persist}


if __name__ == "__main__":
    from mpi_program import run_phases  # this file's folder is on sys.path when it runs as a program

    run_phases([(name, PHASES[name]) for name in sys.argv[1].split(",")], prefix="cascade-namespaces-test-")
