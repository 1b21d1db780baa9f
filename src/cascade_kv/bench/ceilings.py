"""Ceilings: what the machine does with no store in the way, measured in the same run.

Every store figure is printed beside one of these, taken on the same buffers,
the same files and the same sizes, interleaved rep by rep with the store's own
passes so both see the same page cache and the same noisy neighbours. A figure
from a data sheet or an earlier run was rejected as a ceiling: on a shared VM
the memory bandwidth moves by tens of percent from one minute to the next.

A ceiling is the best way this machine does the operation, not one way: each is
measured several ways (:data:`COPY_WAYS`, :func:`put_ways`, :data:`READ_WAYS`: one
thread and split over threads, read ahead or not) and each rep keeps the fastest
(:func:`best_of`). A store that splits a copy over two threads would otherwise beat
a one-thread "ceiling" and print 1.6x of it.

Also here: the deterministic block contents the workloads write and check
(generated, never kept: a 2 GiB workload would otherwise fault 2 GiB of fresh
memory in at the ~0.5 GB/s this class of VM manages).
"""
from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial

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
def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made once per size: a pass must not time thread start-up."""
    return ThreadPoolExecutor(workers, thread_name_prefix=f"ceiling-{workers}")


def split_copy(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """``np.copyto(dst, src)`` cut into ``threads`` parts copied at once (numpy releases the GIL while it copies):
    the caller copies the first part itself while ``threads - 1`` pool threads copy the others, at 64-byte
    aligned cuts. Handing every part to the pool and waiting was 20 % slower than the store's own split copy
    (``memcopy.copy_bytes``, built this way) on 16 MiB blocks, which then read as 1.10x this "ceiling"."""
    if threads == 1:
        np.copyto(dst, src)
        return
    d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
    n = d.nbytes
    step = -(-n // threads) + 63 & ~63
    cuts = list(range(0, n, step)) + [n]
    futures = [_pool(threads - 1).submit(np.copyto, d[a:b], s[a:b]) for a, b in zip(cuts[1:-1], cuts[2:])]
    try:
        np.copyto(d[:cuts[1]], s[:cuts[1]])
    finally:
        for f in futures:
            f.result()


def copy_pass(dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray], threads: int = 1) -> float:
    """Seconds to copy every source into its destination, each copy split over ``threads`` threads."""
    t0 = time.perf_counter()
    for d, s in zip(dsts, srcs):
        split_copy(d, s, threads)
    return time.perf_counter() - t0


def copy_ways(dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray]) -> dict[str, Callable[[], float]]:
    """The copy ceiling's ways: one ``np.copyto``, and the copy split over 2 .. :func:`cpus` threads."""
    return {("np.copyto" if k == 1 else f"split copy, {k} threads"): partial(copy_pass, dsts, srcs, k)
            for k in range(1, cpus() + 1)}


def best_of(rates: dict[str, list[float]], ways: Sequence[str]) -> tuple[list[float], str]:
    """Rep by rep, the fastest of ``ways`` (rates: higher is better); and the way that won most reps, for the label."""
    per_rep = list(zip(*(rates[w] for w in ways)))
    winners = Counter(ways[max(range(len(ways)), key=row.__getitem__)] for row in per_rep)
    return [max(row) for row in per_rep], winners.most_common(1)[0][0]


def readinto_pass(paths: Sequence[str | os.PathLike[str]], outs: Sequence[np.ndarray]) -> float:
    """Seconds to open each file and ``readinto`` a preallocated buffer, one after the other."""
    return read_pass(paths, outs)


def _read_file(path: str | os.PathLike[str], out: np.ndarray) -> None:
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(out)  # type: ignore[arg-type]
    if got != out.nbytes:
        raise OSError(f"{path}: read {got} of {out.nbytes} B")


def read_pass(paths: Sequence[str | os.PathLike[str]], outs: Sequence[np.ndarray], threads: int = 1,
              read_ahead: bool = False) -> float:
    """Seconds to read each file into its buffer (open + ``readinto``), ``threads`` files at once; with
    ``read_ahead``, every file is first announced with ``POSIX_FADV_WILLNEED`` so the kernel reads the next
    files while the first ones are copied out."""
    t0 = time.perf_counter()
    if read_ahead:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
    if threads == 1:
        for p, out in zip(paths, outs):
            _read_file(p, out)
    else:
        for _ in _pool(threads).map(_read_file, paths, outs):
            pass
    return time.perf_counter() - t0


def packed_pass(path: str | os.PathLike[str], outs: Sequence[np.ndarray]) -> float:
    """Seconds to read one file holding every block, block after block into its buffer (the kernel's read-ahead
    then runs across blocks, as it does for HDF5's one file, instead of starting again at every file)."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for out in outs:
            if f.readinto(out) != out.nbytes:  # type: ignore[arg-type]
                raise OSError(f"{path}: ended before {len(outs)} blocks")
    return time.perf_counter() - t0


READ_THREADS = (2, 4, 8)
"""Files read at once by the disk-read ceiling's parallel ways: beyond the CPUs too, as a read mostly waits."""


def read_ways(paths: Sequence[str | os.PathLike[str]], outs: Sequence[np.ndarray],
              packed: str | os.PathLike[str] | None = None) -> dict[str, Callable[[], float]]:
    """The disk-read ceiling's ways: one file after another, with read-ahead, and :data:`READ_THREADS` files at
    once; and with ``packed`` (one file holding the same blocks), that file read through. ``outs`` is one buffer
    per path (reads in flight together need their own)."""
    ways = {"open + readinto": partial(read_pass, paths, outs),
            "WILLNEED read-ahead + readinto": partial(read_pass, paths, outs, read_ahead=True),
            **{f"{k} threads of open + readinto": partial(read_pass, paths, outs, k) for k in READ_THREADS}}
    if packed is not None:
        ways["one file of every block"] = partial(packed_pass, packed, outs)
    return ways


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


def _digest(algorithm: str, view: memoryview) -> bytes:
    if algorithm == "blake3":
        return blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest()
    return hashlib.sha256(view).digest()


def hash_pass(algorithm: str, bufs: Sequence[np.ndarray]) -> float:
    """Seconds to hash every buffer alone: BLAKE3 with its thread pool (``max_threads=AUTO``), or SHA-256."""
    views = [memoryview(b.reshape(-1).view(np.uint8)) for b in bufs]
    t0 = time.perf_counter()
    for v in views:
        _digest(algorithm, v)
    return time.perf_counter() - t0


def put_pass(algorithm: str, dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray], threads: int,
             overlap: bool) -> float:
    """Seconds to hash and copy every source (what a put of a new block cannot avoid): the hash, then the copy split
    over ``threads`` threads; or, ``overlap``, the copy (split over ``threads``) on other threads while this one
    hashes the same source."""
    views = [memoryview(s.reshape(-1).view(np.uint8)) for s in srcs]
    t0 = time.perf_counter()
    for d, s, v in zip(dsts, srcs, views):
        if overlap:
            copying = _pool(1).submit(split_copy, d, s, threads)
            _digest(algorithm, v)
            copying.result()
        else:
            _digest(algorithm, v)
            split_copy(d, s, threads)
    return time.perf_counter() - t0


def put_ways(algorithm: str, dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray]) -> dict[str, Callable[[], float]]:
    """The put ceiling's ways: hash then copy (one thread, or split over 2 .. :func:`cpus`), and hash and copy at
    once on different threads."""
    ways = {(f"{algorithm} + np.copyto" if k == 1 else f"{algorithm} + copy on {k} threads"):
            partial(put_pass, algorithm, dsts, srcs, k, False) for k in range(1, cpus() + 1)}
    ways[f"{algorithm} while another thread copies"] = partial(put_pass, algorithm, dsts, srcs, 1, True)
    return ways


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
