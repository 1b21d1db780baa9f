"""The ``__main__`` of test files that are also their own MPI program (``python -m mpi4py FILE SCENARIO``).

Every such program does the same around its phases: share one scratch folder, run each phase on every
rank, meet at a barrier after each, remove the folder, and print ``rank R: ok`` (which
``conftest.run_scenario`` looks for). It lives here, beside the programs in this folder, because a program
started as ``python -m mpi4py FILE`` has its own folder on ``sys.path`` and is no package member: they import
it as ``mpi_program``; one elsewhere (``tests/bench``) puts this folder on ``sys.path`` first.

Nothing here imports ``mpi4py.MPI`` at import time: that would initialise MPI in whatever imported it.
"""
from __future__ import annotations

import faulthandler
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Phase = Callable[[Any, Path], object]
"""``phase(comm, folder)``: run on every rank with ``MPI.COMM_WORLD`` and the phase's folder (shared by the ranks)."""


def run_phases(phases: Sequence[tuple[str, Phase]], prefix: str) -> None:
    """Run ``(name, phase)`` in order on every rank of ``MPI.COMM_WORLD``, each followed by a barrier and
    ``rank R: NAME ok (S s)``; then ``rank R: ok``. Each phase gets a folder of its own (``I-NAME``) in one
    scratch folder that rank 0 makes under ``TMPDIR`` (named ``prefix...``) and removes at the end, whether
    the phases passed or not: a phase run twice, or after another, finds none of their files.

    A phase that raises fails its rank; ``python -m mpi4py`` then aborts the whole job at once, so no rank is
    left waiting in a collective the failed one never reaches.
    """
    from mpi4py import MPI

    # a rank killed because another failed (MPI_Abort) or the job ran out of time shows where it was
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    # This bcast is also mpi4py's first pickle-based collective on the communicator, which duplicates it with
    # the GIL held: done here, before any store's service thread may be waiting on this rank.
    scratch = Path(comm.bcast(tempfile.mkdtemp(prefix=prefix) if rank == 0 else None))
    try:
        for i, (name, phase) in enumerate(phases):
            started = time.perf_counter()  # printed only, to tell a slow phase: no test asserts on it
            folder = scratch / f"{i}-{name}"
            folder.mkdir(exist_ok=True)  # by every rank: no rank's phase may start before the folder exists
            phase(comm, folder)
            comm.Barrier()
            print(f"rank {rank}: {name} ok ({time.perf_counter() - started:.1f} s)", flush=True)
    finally:
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"rank {rank}: ok", flush=True)


def agree(comm: Any, ok: bool, what: str) -> None:
    """Collective: every rank's ``ok`` held. The verdict is reached on values gathered from every rank, so
    every rank passes or fails together (a rank failing alone would leave the others in the next collective)."""
    oks = comm.allgather(bool(ok))
    if not all(oks):
        raise AssertionError(f"{what}: failed on rank(s) {[r for r, o in enumerate(oks) if not o]}")


__all__ = ["Phase", "agree", "run_phases"]
