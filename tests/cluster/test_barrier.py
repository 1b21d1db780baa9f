"""Bounded collective waits name the ranks that did not arrive (issue 7): ``DistributedStore.barrier()``
and ``Service.close()``, on three ranks of which one stays away until the others have timed out.

Also its own MPI program (``python -m mpi4py test_barrier.py``). The absent rank waits in a blocking
receive (its service thread still answers), released by a message the others send once their wait has
raised, so the order is fixed by messages, not by time. Then it enters the same barrier, which completes
the others' abandoned one, and every rank closes normally.
"""
from __future__ import annotations

import sys

import numpy as np

SHORT = 3.0  # the timeout under test: every wait on the absent rank raises after it (the rest stay well within)
ABSENT = 2


def test_barrier_and_service_close_name_the_missing_rank():
    from .conftest import run_scenario

    out = run_scenario(__file__, 3, "all", timeout=60)
    for rank in (0, 1):
        assert f"rank {rank}: barrier named [{ABSENT}]" in out, out
        assert f"rank {rank}: close named [{ABSENT}]" in out, out


def _expect_timeout(call, rank: int, what: str) -> None:
    from cascade_kv.errors import PeerTimeout

    try:
        call()
    except PeerTimeout as e:
        # its service thread says it has not arrived; on a loaded machine it may answer too late to say so
        assert f"rank(s) [{ABSENT}] did not arrive" in str(e) or f"rank(s) [{ABSENT}] did not answer" in str(e), e
        print(f"rank {rank}: {what} named [{ABSENT}]: {e}", flush=True)
        return
    raise AssertionError(f"rank {rank}: {what}: no PeerTimeout while rank {ABSENT} stayed away")


def _store_barrier(comm) -> None:
    from cascade_kv.cluster.store import DistributedStore

    rank = comm.Get_rank()
    store = DistributedStore(comm=comm, timeout=SHORT, host_capacity=1 << 16)
    if rank == ABSENT:
        # until every other rank's barrier has timed out (not rank 0's alone: on a loaded machine another
        # rank's clock starts later, and it would see this rank arrive before it gave up)
        for r in range(comm.Get_size()):
            if r != ABSENT:
                comm.Recv(np.empty(1, np.int8), source=r, tag=7)
        store.barrier()  # completes the barrier the others gave up on
        for r in range(comm.Get_size()):
            if r != ABSENT:
                comm.Send(np.zeros(1, np.int8), dest=r, tag=9)
    else:
        _expect_timeout(store.barrier, rank, "barrier")
        comm.Send(np.zeros(1, np.int8), dest=ABSENT, tag=7)
        comm.Recv(np.empty(1, np.int8), source=ABSENT, tag=9)  # close together: its waits are short too
    store.close()


def _service_close(comm) -> None:
    from cascade_kv.cluster.service import Service

    rank = comm.Get_rank()
    service = Service(comm, timeout=SHORT)
    if rank == ABSENT:
        for r in range(comm.Get_size()):  # every other rank has timed out (see _store_barrier)
            if r != ABSENT:
                comm.Recv(np.empty(1, np.int8), source=r, tag=8)
    else:
        _expect_timeout(service.close, rank, "close")
        comm.Send(np.zeros(1, np.int8), dest=ABSENT, tag=8)
    service.close()  # the others wait again on the same barrier, which the absent rank now joins


def _main() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    _store_barrier(comm)
    _service_close(comm)
    print(f"rank {comm.Get_rank()}: ok", flush=True)


if __name__ == "__main__":
    _main()
    sys.exit(0)
