"""Byte copies of large blocks, split over a few threads.

One thread copying a block bigger than the caches moves about 11-20 GB/s on the machines this was
measured on, well below what the memory bus carries; two threads copying halves moved 1.3x more
(16 MiB: 20 -> 27 GB/s, 42 MiB: 12 -> 15 GB/s on the 2-core development VM; four threads there were
slower than two). ``numpy.copyto`` releases the GIL, so the helper threads copy while the caller
copies its own share. Below :data:`PARALLEL_MIN` one ``memcpy`` is faster than handing work over.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

R = TypeVar("R")
PARALLEL_MIN = 8 << 20
"""Copies at least this large are split; smaller ones (which mostly fit in the caches) are one memcpy."""
MAX_THREADS = 4
"""Threads per copy at most (the caller's included), and never more than the CPUs this process may use."""

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def _helpers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, _threads() - 1), thread_name_prefix="cascade-kv-copy")
        return _pool


def copy_bytes(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` for two flat byte views of equal size, in parallel when large."""
    n = dst.nbytes
    if src.nbytes != n:
        raise ValueError(f"copy of {src.nbytes} B into {n} B")
    if n < PARALLEL_MIN or _threads() == 1:
        dst[:] = src
        return
    d = np.frombuffer(dst, np.uint8)
    s = np.frombuffer(src, np.uint8)
    in_parts(n, 64, lambda a, b: np.copyto(d[a:b], s[a:b]))  # 64 B: no cache line written by two threads


def in_parts(n: int, align: int, part: Callable[[int, int], R]) -> list[R]:
    """``part(a, b)`` over ``[0, n)`` cut into one share per thread (:func:`_threads`) at multiples of
    ``align``, the caller's share on the caller's thread while the helpers run the others (work that
    releases the GIL: a copy, a ``preadv``); every share's result, in order. Below :data:`PARALLEL_MIN`,
    one call."""
    k = _threads() if n >= PARALLEL_MIN else 1
    if k == 1:
        return [part(0, n)]
    share = -(-n // k)  # ceil(n / k)
    step = -(-share // align) * align  # rounded up to a multiple of align
    cuts = list(range(0, n, step)) + [n]
    futures = [_helpers().submit(part, a, b) for a, b in zip(cuts[1:-1], cuts[2:])]
    try:
        first = part(0, cuts[1])
    finally:
        rest = [f.result() for f in futures]  # also orders the helpers' stores before the caller's next step
    return [first, *rest]
