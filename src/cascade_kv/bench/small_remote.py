"""Small blocks from another rank's memory: ``get_many`` of 64 blocks against a bare MPI ``Get`` loop over
the same bytes. Part of ``cascade bench --ranks N``.

An engine moves many small blocks, so a remote read's fixed costs (directory round trips, slot-header
checks, per-block Python) matter more than its bandwidth. Rank 1 puts ``batch`` blocks of each size
(``locality_aware=False``: no replica is made); rank 0 reads the batch with ``get_many`` and with a bare
``Get`` per block in one ``Lock_all`` epoch (the least MPI can do for the same blocks), the two taking
turns batch by batch. Every read is checked. Target: ``get_many`` >= 50 % of the bare loop's rate
(:mod:`.cluster` records and judges it).

Imports ``mpi4py.MPI``: import this module only in a rank a launcher started.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from mpi4py import MPI

from ..cluster.window import ARENA_OFFSET
from .suite.core import POISON

TARGET_RATIO = 0.5
SIZES = (4 << 10, 64 << 10)
_READER, _OWNER = 0, 1


def reads(store, keys: Sequence[str], displacements: Sequence[int], contents: Sequence[np.ndarray],
          reps: int) -> dict[str, list[float]]:
    """Rank 0's side: ``reps`` batches of each kind, interleaved (the kind that goes first alternates) after
    two of each to warm up; blocks per second of each batch, per kind (``store``, ``bare``). ``displacements``:
    where each block's bytes lie in rank 1's arena (:func:`~.remote_get.memory_offsets`)."""
    n, nbytes = len(keys), contents[0].nbytes
    outs = [np.empty(nbytes, np.uint8) for _ in range(n)]
    win = store.window.win

    def store_batch() -> None:
        store.get_many(keys, outs)

    def bare_batch() -> None:
        win.Lock_all()
        try:
            for out, disp in zip(outs, displacements):
                win.Get([out, MPI.BYTE], _OWNER, (ARENA_OFFSET + disp, nbytes, MPI.BYTE))
        finally:
            win.Unlock_all()

    rates: dict[str, list[float]] = {"store": [], "bare": []}
    kinds: dict[str, Callable[[], None]] = {"store": store_batch, "bare": bare_batch}
    for rep in range(reps + 2):  # two warm-up batches of each
        for name in ("store", "bare") if rep % 2 else ("bare", "store"):
            for o in outs:
                o.fill(POISON)
            t0 = time.perf_counter()
            kinds[name]()
            took = time.perf_counter() - t0
            for o, c in zip(outs, contents):
                if not np.array_equal(o, c):
                    raise RuntimeError(f"small remote get ({name}, {nbytes} B blocks): wrong bytes read")
            if rep >= 2:
                rates[name].append(n / took)
    return rates


__all__ = ["SIZES", "TARGET_RATIO", "reads"]
