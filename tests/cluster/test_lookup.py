"""DistributedStore.lookup over 2 real ranks: the leading count of a prompt's keys, homed on both ranks, is the
same from either rank; namespaces apart; nothing counted; and one directory request per home rank at most.

Also the MPI program itself (``python -m mpi4py test_lookup.py SCENARIO``), as ``test_namespaces.py``.
Verdicts are reached on values gathered from every rank, so every rank fails or passes together.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

BLOCK = 4096
TIMEOUT = 10.0
BLOCKS = 12  # a prompt of 12 full blocks: both ranks are home to some of its keys (checked)


def test_lookup_across_ranks() -> None:
    from .conftest import run_scenario

    run_scenario(__file__, 2, "lookup", 120)


# ------------------------------------------------------------------ the scenario (run under mpiexec)
class _Requests:
    """Records the directory requests this rank sends (wraps its service's ``call_many``, through which
    ``call`` goes too): ``(rank, op)`` per request, a call to this rank included (it runs in place)."""

    def __init__(self, service) -> None:
        self.seen: list[tuple[int, int]] = []
        inner = service.call_many

        def call_many(requests):
            self.seen.extend((rank, op) for rank, op, _ in requests)
            return inner(requests)

        service.call_many = call_many

    def during(self, fn):
        self.seen.clear()
        result = fn()
        return result, list(self.seen)


def _lookup(comm, root: Path) -> None:
    from mpi_program import agree  # this folder is on sys.path when the file runs as a program

    from cascade_kv import InvalidArgumentType
    from cascade_kv.cluster.directory import OP_BOUND
    from cascade_kv.cluster.homes import home_of_key
    from cascade_kv.cluster.store import DistributedStore
    from cascade_kv.tokens import namespace_for, prefix_keys

    rank, size = comm.Get_rank(), comm.Get_size()
    store = DistributedStore(comm=comm, timeout=TIMEOUT, host_capacity=64 * BLOCK, disk_path=root / "disk")
    tokens = np.arange(BLOCKS * 16 + 5)  # and a partial block, which gets no key
    keys = prefix_keys(tokens, 16, model="m", kv_spec="fp16")
    homes = [home_of_key(k, size) for k in keys]
    agree(comm, len(keys) == BLOCKS and set(homes) == set(range(size)), f"keys homed on every rank {homes}")
    values = [np.full(BLOCK, i, np.uint8) for i in range(BLOCKS)]
    requests = _Requests(store.service)

    # rank 0 stores the first 7 blocks, rank 1 blocks 9.. (a gap at 7 and 8): both see 7
    if rank == 0:
        store.put_many(keys[:7], values[:7])
    if rank == 1:
        store.put_many(keys[9:], values[9:])
    comm.Barrier()
    before = store.stats()
    n, sent = requests.during(lambda: store.lookup(keys))
    ok = n == 7 and store.stats() == before
    # one request per home at most, all of them the batched op; the one to this rank runs in place
    ok &= len(sent) <= len(set(homes)) and {op for _, op in sent} == {OP_BOUND}
    ok &= len({r for r, _ in sent}) == len(sent) and {r for r, _ in sent} == set(homes)
    agree(comm, ok, f"7 leading keys from rank {rank}, in {sent} ({n})")

    # keys homed here only: answered in place, no message
    stored = [i < 7 or i >= 9 for i, h in enumerate(homes) if h == rank]
    n, sent = requests.during(lambda: store.lookup([k for k, h in zip(keys, homes) if h == rank]))
    ok = n == (stored + [False]).index(False) and sent == [(rank, OP_BOUND)]
    n, sent = requests.during(lambda: store.lookup([]))
    ok &= n == 0 and sent == []
    try:
        store.lookup(keys[0])  # one key (bytes), not a list of keys
        ok = False
    except InvalidArgumentType:
        pass
    try:
        store.lookup([keys[0], 5])
        ok = False
    except InvalidArgumentType:
        pass
    agree(comm, ok and requests.seen == [], "empty and bad lookups: answered here, nothing sent")

    comm.Barrier()
    if rank == 1:  # fill the gap from the other rank, then cut the prefix at 4
        store.put_many(keys[7:9], values[7:9])
        store.delete(keys[4])
    comm.Barrier()
    agree(comm, store.lookup(keys) == 4 and store.lookup(keys[5:]) == BLOCKS - 5, "after rank 1's changes")

    # a tenant's keys, in its namespace: apart from the default namespace and from other tenants
    t1, t2 = store.namespace(namespace_for(b"t1")), store.namespace(namespace_for(b"t2"))
    salted = prefix_keys(tokens, 16, salt=b"t1", model="m", kv_spec="fp16")
    if rank == 0:
        t1.put_many(salted[:BLOCKS], values)
        t2.put_many(keys, values)  # the unsalted keys, stored by another tenant
    comm.Barrier()
    ok = t1.lookup(salted) == BLOCKS and t2.lookup(salted) == 0 and store.lookup(salted) == 0
    ok &= t1.lookup(keys) == 0 and t2.lookup(keys) == BLOCKS and store.lookup(keys) == 4
    agree(comm, ok, "namespaces apart")
    comm.Barrier()
    store.close()


if __name__ == "__main__":
    from mpi_program import run_phases  # this file's folder is on sys.path when it runs as a program

    run_phases([(sys.argv[1], {"lookup": _lookup}[sys.argv[1]])], prefix="lookup-")
