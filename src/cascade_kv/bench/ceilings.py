"""Ceilings: what the machine does with no store in the way, measured in the same run.

Every store figure is printed beside one of these, taken on the same buffers,
the same files and the same sizes, interleaved rep by rep with the store's own
passes so both see the same page cache and the same noisy neighbours. A figure
from a data sheet or an earlier run was rejected as a ceiling: on a shared VM
the memory bandwidth moves by tens of percent from one minute to the next.

Also here: the deterministic block contents the workloads write and check
(generated, never kept: a 2 GiB workload would otherwise fault 2 GiB of fresh
memory in at the ~0.5 GB/s this class of VM manages).
"""
from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import blake3
import numpy as np

_PAGE = 4096
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection mod 2**64
_POOL_WORDS = (1 << 20) // 8  # 1 MiB of random words, XORed with a per-chunk key


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and range of one measurement repeated ``reps`` times (a rate: higher is better)."""

    median: float
    low: float
    high: float
    reps: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.low, "max": self.high, "reps": self.reps}


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Seconds ``fn(*args, **kwargs)`` takes (wall clock)."""
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def touch(arr: np.ndarray) -> np.ndarray:
    """Fault every page of ``arr`` in now, so no timed pass pays for fresh memory."""
    flat = arr.reshape(-1).view(np.uint8)
    flat[::_PAGE] = 0
    return arr


def buffers(n: int, nbytes: int) -> list[np.ndarray]:
    """``n`` touched ``uint8`` buffers of ``nbytes`` each."""
    return [touch(np.empty(nbytes, np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------- block contents
class Contents:
    """Block ``i`` of ``nbytes``: a fixed random pool XOR a key unique to (i, chunk).

    Distinct indices give distinct bytes (the key is a bijection of (i, chunk)), so a store that
    returns another block's bytes, or stale bytes, fails :meth:`check`. Generating runs at tens of
    GB/s from cache; a check regenerates into a scratch buffer and compares.
    """

    def __init__(self, nbytes: int, seed: int = 0) -> None:
        if nbytes % 8:
            raise ValueError(f"block size must be a multiple of 8 bytes, got {nbytes}")
        self.nbytes = nbytes
        words = nbytes // 8
        self._chunk = min(words, _POOL_WORDS)
        self._pool = np.random.default_rng(seed).integers(0, 2**63, self._chunk, dtype=np.uint64)
        self._chunks = -(-words // self._chunk)
        self._next = 0
        self._scratch: np.ndarray | None = None
        self.checked = 0
        self.wrong = 0

    def new_ids(self, n: int) -> range:
        """Indices never handed out before: their contents were never stored."""
        first, self._next = self._next, self._next + n
        return range(first, first + n)

    def fill(self, i: int, out: np.ndarray) -> np.ndarray:
        words = out.reshape(-1).view(np.uint64)
        keys = (np.arange(self._chunks, dtype=np.uint64) + np.uint64((i << 24) + 1)) * _GOLDEN
        full = words.size // self._chunk
        np.bitwise_xor(self._pool[None, :], keys[:full, None], out=words[:full * self._chunk].reshape(full, -1))
        rest = words.size - full * self._chunk
        if rest:
            np.bitwise_xor(self._pool[:rest], keys[full], out=words[full * self._chunk:])
        return out

    def fill_rows(self, ids: range, out: np.ndarray) -> np.ndarray:
        """Blocks ``ids`` as the rows of ``out`` (small blocks: one vectorised pass)."""
        assert self._chunks == 1
        keys = (np.arange(ids.start, ids.stop, dtype=np.uint64) << np.uint64(24)) + np.uint64(1)
        np.bitwise_xor(self._pool[None, :], (keys * _GOLDEN)[:, None], out=out.view(np.uint64))
        return out

    def check(self, i: int, got: np.ndarray) -> bool:
        """Whether ``got`` holds block ``i``; counted in ``checked``/``wrong``."""
        if self._scratch is None:
            self._scratch = touch(np.empty(self.nbytes, np.uint8))
        ok = bool(np.array_equal(self.fill(i, self._scratch), got.reshape(-1).view(np.uint8)))
        self.checked += 1
        self.wrong += not ok
        return ok

    def check_rows(self, ids: range, got: np.ndarray, scratch: np.ndarray) -> int:
        """Check every row of ``got`` against blocks ``ids``; how many were wrong."""
        self.fill_rows(ids, scratch)
        bad = int(np.count_nonzero((scratch != got).any(axis=1)))
        self.checked += len(ids)
        self.wrong += bad
        return bad


# ---------------------------------------------------------------------- raw passes
def copy_pass(dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray]) -> float:
    """Seconds to ``np.copyto`` every source into its destination: the memory ceiling."""
    t0 = time.perf_counter()
    for d, s in zip(dsts, srcs):
        np.copyto(d, s)
    return time.perf_counter() - t0


def readinto_pass(paths: Sequence[str | os.PathLike[str]], outs: Sequence[np.ndarray]) -> float:
    """Seconds to open each file and ``readinto`` a preallocated buffer: the disk-read ceiling."""
    t0 = time.perf_counter()
    for p, out in zip(paths, outs):
        with open(p, "rb", buffering=0) as f:
            got = f.readinto(out)  # type: ignore[arg-type]
        assert got == out.nbytes, (p, got)
    return time.perf_counter() - t0


def write_pass(directory: str | os.PathLike[str], srcs: Sequence[np.ndarray]) -> float:
    """Seconds to create one file per source and write it (not fsynced): the disk-write ceiling.
    The files are removed afterwards, outside the time."""
    paths = [os.path.join(directory, f"raw-{i}") for i in range(len(srcs))]
    t0 = time.perf_counter()
    for p, s in zip(paths, srcs):
        with open(p, "wb", buffering=0) as f:
            f.write(s)  # type: ignore[arg-type]
    took = time.perf_counter() - t0
    for p in paths:
        os.unlink(p)
    return took


def hash_pass(algorithm: str, bufs: Sequence[np.ndarray]) -> float:
    """Seconds to hash every buffer alone: BLAKE3 with its thread pool (``max_threads=AUTO``), or SHA-256."""
    views = [memoryview(b.reshape(-1).view(np.uint8)) for b in bufs]
    t0 = time.perf_counter()
    for v in views:
        if algorithm == "blake3":
            blake3.blake3(v, max_threads=blake3.blake3.AUTO).digest()
        else:
            hashlib.sha256(v).digest()
    return time.perf_counter() - t0


def small_put_pass(dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray]) -> float:
    """Hash (BLAKE3, one thread, as the store does below 1 MiB) and copy each small block."""
    t0 = time.perf_counter()
    for d, s in zip(dsts, srcs):
        blake3.blake3(memoryview(s)).digest()
        np.copyto(d, s)
    return time.perf_counter() - t0


def drop_page_cache(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Write the files back (``fsync``) and drop them from the page cache (``POSIX_FADV_DONTNEED``),
    so the next read comes from the device. Dirty pages cannot be dropped, hence the fsync first."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def combined(*rates: float) -> float:
    """Rate of doing each step in turn on the same bytes: ``1 / sum(1 / rate)``."""
    return 1.0 / sum(1.0 / r for r in rates)


def interleaved_rates(kinds: dict[str, Callable[[int], None]], count: int, reps: int, nbytes: int,
                      outs: Sequence[np.ndarray], ids: Sequence[int], contents: Contents, poison: int,
                      after_rep: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """GB/s of single reads of ``nbytes``, ``count`` per rep, the ``kinds`` taking turns (and swapping who
    goes first every rep) so that a read and its ceiling meet the same machine state. ``kinds[name](j)``
    reads slot ``j`` (``k % len(outs)``) into ``outs[j]``, which is poisoned before and checked against
    ``ids[j]`` after. Rep 0 warms up and is not kept; ``after_rep(rep)`` is called after each."""
    names = list(kinds)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps + 1):
        order = names if rep % 2 else names[::-1]
        for k in range(count):
            j, name = k % len(outs), order[k % len(order)]
            outs[j].fill(poison)
            t0 = time.perf_counter()
            kinds[name](j)
            dt = time.perf_counter() - t0
            contents.check(ids[j], outs[j])
            if rep:
                rates[name].append(nbytes / dt / 1e9)
        if after_rep is not None:
            after_rep(rep)
    return rates
