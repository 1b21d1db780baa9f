"""The MPI program that runs the conformance suite on :class:`~cascade_kv.DistributedStore`:
``mpiexec -n N python tests/contract/mpi_main.py [pytest args]`` (``test_distributed.py`` starts it).

Rank 0 runs pytest in-process on ``TestDistributedStore``; the other ranks follow it. Opening and closing a
DistributedStore are collective, so rank 0's ``open_store`` fixture announces each open and close with a
``comm.bcast`` that the followers answer by opening or closing their own store with the same config; the
stores' other calls are not collective, so the followers only serve them (their service threads answer the
keys and digests they are home to). At the end rank 0 broadcasts pytest's exit code, and every rank exits
with it. MPI is imported inside the functions: ``test_distributed.py`` imports this module in the plain
pytest process too, which must not initialise MPI.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

JOB_ENV = "CASCADE_CONTRACT_RANKS"
"""Set (to the number of ranks) in rank 0's pytest: the distributed subclass runs only there."""
TIMEOUT = 20.0  # seconds a rank waits on a peer: a lost reply fails the test, well before the job's limit

_ids = itertools.count()


@contextlib.contextmanager
def leader_store(**overrides: object) -> Iterator[object]:
    """Rank 0's side of ``open_store``: the followers open the same store, and close it when this one closes
    (whether the test closes it or the ``with`` does)."""
    from mpi4py import MPI

    from cascade_kv import CascadeConfig
    from cascade_kv.cluster.store import DistributedStore

    comm = MPI.COMM_WORLD
    config = CascadeConfig(**overrides)  # a bad config fails here, before any rank starts opening
    sid = next(_ids)

    class LeaderStore(DistributedStore):
        def close(self) -> None:
            if not self._closed:
                comm.bcast(("close", sid), root=0)
            super().close()

    comm.bcast(("open", sid, overrides), root=0)
    store = LeaderStore(config, comm=comm, timeout=TIMEOUT)
    try:
        yield store
    finally:
        store.close()


def follow() -> int:
    """A follower's loop: open and close stores as rank 0 says; its pytest exit code at the end."""
    from mpi4py import MPI

    from cascade_kv import CascadeConfig
    from cascade_kv.cluster.store import DistributedStore

    comm = MPI.COMM_WORLD
    stores = {}
    while True:
        message = comm.bcast(None, root=0)
        if message[0] == "open":
            _, sid, overrides = message
            stores[sid] = DistributedStore(CascadeConfig(**overrides), comm=comm, timeout=TIMEOUT)
        elif message[0] == "close":
            try:
                stores.pop(message[1]).close()
            except Exception as e:  # rank 0's close raised too, and its test reports it; keep following
                print(f"rank {comm.rank}: close: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        else:
            return int(message[1])


def lead(pytest_args: list[str]) -> int:
    import pytest
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    os.environ[JOB_ENV] = str(comm.size)
    here = Path(__file__).resolve().parent
    # --noconftest: the session that started this job watches /dev/shm and TMPDIR for leftovers; the repo's
    # watcher run in here as well would take the job's own Open MPI folder, made after it started, for one
    rc = int(pytest.main(["-q", "--color=no", "--noconftest", "-p", "no:cacheprovider", f"{here / 'test_distributed.py'}::TestDistributedStore",
                          *pytest_args]))
    comm.bcast(("exit", rc), root=0)
    return rc


def main() -> int:
    from mpi4py import MPI

    return lead(sys.argv[1:]) if MPI.COMM_WORLD.rank == 0 else follow()


if __name__ == "__main__":
    sys.exit(main())
