"""A store's get from another rank's memory against a bare MPI ``Get`` of the same bytes out of the same
window, read by read: the one place this measurement lives (the main job's remote get,
:mod:`cascade_kv.bench.cluster`, and ``cascade bench rma``'s remote tier, :mod:`.suite.rma`, both call it).

The owner has put the blocks with promotion off (``locality_aware=False``), so each has one copy, in the
owner's memory, and every get reads it one-sidedly. The reader times a ``get`` and a bare ``Get`` in turns
on neighbouring blocks (so neither reads what the other just brought into the cache), swapping who goes
first every rep (:func:`~.ceilings.interleaved_rates`); a burst of load from a neighbour then lands on both
alike. Timing whole passes of one kind, then the other, was rejected: on a shared two-core machine one
burst moved a single pass by 2x. The store's counters must show every get as a remote hit and no promotion,
or the figure measured something else.

Imports nothing of MPI at import time: :mod:`.suite.rma` imports this module in a run of one process too.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .ceilings import Contents, interleaved_rates
from .suite.core import POISON, BenchError


def memory_offsets(store: Any, keys: Sequence[str], owner: int) -> list[int]:
    """Where each key's block lies in ``owner``'s arena (the bytes past its slot header), from the directory;
    :class:`BenchError` unless each key has one copy, in ``owner``'s memory."""
    from ..cluster.directory import TIER_MEMORY
    from ..cluster.slots import SLOT_HEADER

    offsets = []
    for key in keys:
        locations = store.locations(key)
        if len(locations) != 1 or locations[0].tier != TIER_MEMORY or locations[0].rank != owner:
            raise BenchError(f"{key!r}: expected one copy, in rank {owner}'s memory; the directory says {locations}")
        offsets.append(locations[0].offset + SLOT_HEADER)
    return offsets


def bare_get(store: Any, owner: int, offsets: Sequence[int], outs: Sequence[np.ndarray]) -> Callable[[int], None]:
    """The ceiling's read of block ``j``: one passive-target epoch and one ``Get`` of its bytes into ``outs[j]``,
    nothing checked."""
    from mpi4py import MPI

    from ..cluster.window import ARENA_OFFSET, epoch

    def read(j: int) -> None:
        # [buffer, MPI.BYTE], not the bare buffer: mpi4py would describe that as MPI_UNSIGNED_CHAR against the
        # BYTE target, a mismatch osc/sm copies through its convertor, ~1.5x slower (measured here)
        with epoch(store.window, owner) as win:
            win.Get([outs[j], MPI.BYTE], owner, (ARENA_OFFSET + offsets[j], outs[j].nbytes, MPI.BYTE))

    return read


def get_vs_bare(store: Any, get: Callable[[int], None], keys: Sequence[str], ids: Sequence[int],
                outs: Sequence[np.ndarray], contents: Contents, *, owner: int, count: int, reps: int,
                after_rep: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """The reader's side: ``get(j)`` (the store's read of ``keys[j]`` into ``outs[j]``) and a bare ``Get`` of the
    same bytes take turns, ``count`` reads per rep (even: both kinds read every block as often), ``reps`` reps
    after a warm-up; every read checked against ``contents``. GB/s of each single read, per kind: ``store``
    and ``bare_get``, rep after rep (``count // 2`` of each per rep). ``store`` is the
    :class:`~cascade_kv.cluster.store.DistributedStore` ``get`` reads from."""
    read = bare_get(store, owner, memory_offsets(store, keys, owner), outs)
    before = store.stats()
    rates = interleaved_rates({"store": get, "bare_get": read}, count, reps, contents.nbytes, outs, ids, contents,
                              POISON, after_rep)
    after = store.stats()
    gets = (reps + 1) * count // 2
    remote = after.tier("remote").hits - before.tier("remote").hits
    if remote != gets or after.promotions != before.promotions:
        raise BenchError(f"remote get: {gets} gets of rank {owner}'s blocks, but the store counts {remote} remote "
                         f"hits and {after.promotions - before.promotions} promotions (promotion is off)")
    return rates


__all__ = ["bare_get", "get_vs_bare", "memory_offsets"]
