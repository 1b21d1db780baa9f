"""Remembered key records (``cluster/bindings.py``): a get of keys read before asks no home while their binding
versions hold, and never returns a value a key no longer names.

The directory's change hook is tested alone (no MPI); the rest on 2 real ranks
(``python -m mpi4py test_bindings.py SCENARIO``), rank 1 changing keys between rank 0's gets, every step
between barriers: what rank 0 must see is fixed by the order, not by timing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

BLOCK = 4096
KEYS = 32  # both ranks are home to some of them (checked)


def test_every_change_of_a_binding_reaches_the_hook() -> None:
    from cascade_kv.cluster.directory.records import KeyRecord
    from cascade_kv.cluster.directory.state import DirectoryState

    s = DirectoryState()
    seen: list[object] = []
    s.on_change = seen.append
    a, b = KeyRecord(b"a" * 32, "|u1", (4,)), KeyRecord(b"b" * 32, "|u1", (4,))
    s.bind("k", a)
    s.bind("k", b)  # rebound
    s.set_prefix("k", True)  # the record changes (its prefix flag)
    s.set_prefix("k", True)  # no change: no call
    s.unbind("k")
    s.unbind("k")  # not bound: no call
    s.restore_entries({"r": a}, [])
    assert seen == ["k", "k", "k", "k", "r"]
    assert s.lookup_many(["k"]) == [None]  # lookups change nothing


def test_remembered_records_across_ranks() -> None:
    from .conftest import run_scenario

    run_scenario(__file__, 2, "remembered", 120)


# ------------------------------------------------------------------ the scenario (run under mpiexec)
def _remembered(comm, root: Path) -> None:
    from mpi_program import agree  # this folder is on sys.path when the file runs as a program

    from cascade_kv import BlockNotFound
    from cascade_kv.cluster.bindings import route
    from cascade_kv.cluster.store import DistributedStore
    from cascade_kv.config import CascadeConfig

    rank, size = comm.Get_rank(), comm.Get_size()
    keys = [f"key-{i}" for i in range(KEYS)]
    homes = {route(k, size)[0] for k in keys}
    agree(comm, homes == set(range(size)), f"keys homed on every rank ({homes})")

    def value(i: int, generation: int) -> np.ndarray:
        return np.full(BLOCK, (i * 7 + generation) % 251, np.uint8)

    with DistributedStore(CascadeConfig(host_capacity=8 << 20, locality_aware=False), comm=comm, timeout=30) as st:
        if rank == 1:
            st.put_many(keys, [value(i, 0) for i in range(KEYS)])
        comm.Barrier()
        outs = [np.empty(BLOCK, np.uint8) for _ in keys]
        ok = True
        if rank == 0:
            st.get_many(keys, outs)  # first read: every key asked, and remembered
            before = st.bindings.confirmed
            st.get_many(keys, outs)
            ok = st.bindings.confirmed - before == KEYS and all(
                np.array_equal(o, value(i, 0)) for i, o in enumerate(outs))
        agree(comm, ok, "a second get of the same keys takes every record from memory, and reads right")

        # every kind of change, made by the other rank, is seen by the next get
        for generation in range(1, 6):
            changed = keys[generation]
            if rank == 1:
                st.put(changed, value(generation, generation))  # rebound to other bytes
                st.put(keys[0], value(0, generation % 2))  # rebound back and forth between two values
            comm.Barrier()
            ok = True
            if rank == 0:
                st.get_many(keys, outs)
                ok = (np.array_equal(outs[generation], value(generation, generation))
                      and np.array_equal(outs[0], value(0, generation % 2)))
            agree(comm, ok, f"generation {generation}: a rebound key reads its new value")

        # same bytes, another shape and dtype: the record changes, not the block
        if rank == 1:
            st.put(keys[10], value(10, 0).view(np.uint32).reshape(32, -1))
        comm.Barrier()
        ok = True
        if rank == 0:
            got = st.get_many([keys[10]])[0]
            ok = got.dtype == np.uint32 and got.shape == (32, BLOCK // 128)
        agree(comm, ok, "a key rebound to the same bytes under another dtype and shape reads the new ones")

        if rank == 1:
            st.delete(keys[11])
        comm.Barrier()
        ok = True
        if rank == 0:
            try:
                st.get_many([keys[11]])
                ok = False
            except BlockNotFound:
                pass
        agree(comm, ok, "a deleted key is not found")

        # a version read mid-update (its complement not yet written) is no version: the home is asked
        key = keys[12]
        home, bucket = route(key, size)
        if rank == home:
            st.window._bindings[2 * bucket + 1] ^= 1  # as if caught between the version's two stores
        comm.Barrier()
        ok = True
        if rank == 0:
            before = st.bindings.confirmed
            st.get_many([key], [outs[12]])
            ok = st.bindings.confirmed == before and np.array_equal(outs[12], value(12, 0))
        agree(comm, ok, "a torn version sends the key to its home")
        comm.Barrier()
        if rank == home:
            st.window._bindings[2 * bucket + 1] ^= 1
        comm.Barrier()


if __name__ == "__main__":
    from mpi_program import run_phases  # this file's folder is on sys.path when it runs as a program

    run_phases([(sys.argv[1], {"remembered": _remembered}[sys.argv[1]])], prefix="bindings-")
