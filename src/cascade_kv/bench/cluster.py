"""The distributed part of ``cascade bench``: four experiments over the ranks of an MPI job, each figure
printed beside its ceiling measured in the same run.

1. **remote get**: rank 1 stores blocks, rank 0 gets them (``locality_aware=False``, so no replica is
   made), taking turns read by read with a bare mpi4py ``Get`` of the same bytes out of the same window.
2. **directory round trip**: rank 0 looks up keys homed on other ranks, taking turns with an echo of about
   the same size through the same service thread: the transport with no directory behind it.
3. **dedup put**: rank 1 stores blocks, rank 0 puts the same bytes under new keys. Each put must be a dedup
   hit with no bulk transfer; its ceiling is what such a put cannot avoid: hashing the block and one echo
   each to the digest's home and the key's home.
4. **hot prefix**: blocks start on the shared disk tier (demoted, page cache dropped) and every rank reads
   all of them. Load leases must make it one disk read per block however many ranks ask. Ceiling: the same
   ranks reading the same files cold at once with open + readinto (aggregate, as the store's figure).
5. **idle ranks** (:mod:`.idle`): each rank's CPU while it holds an open store and does nothing, beside a
   rank waiting in a blocking ``MPI_Recv``; round trips to a service that is hot, asleep, or whose rank
   is busy in Python, beside a bare MPI ping-pong.
6. **small remote gets** (:mod:`.small_remote`): ``get_many`` of 64 blocks of 4 KiB and 64 KiB from rank
   1's memory against a bare ``Get`` loop over the same blocks.

Every read is checked against the bytes written. Each experiment opens its own store (its disk tier in a
folder of its own under the run's root, which every rank must see) and closes it. A rank that fails raises
on every rank at the next step boundary (:meth:`ClusterBench._together`), so no rank is left waiting in a
collective. Rank 0 alone gets the report.

Imports ``mpi4py.MPI``, which initialises MPI: import this module only in a rank a launcher started.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from mpi4py import MPI
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cluster.directory import TIER_MEMORY, KeyRecord, Location
from ..cluster.homes import home_of_digest, home_of_key
from ..cluster.store import DistributedStore
from ..cluster.window import ARENA_OFFSET, epoch
from ..config import format_size
from ..hashing import Hasher
from ..cluster.slots import SLOT_HEADER
from .ceilings import Contents, Spread, buffers, drop_page_cache, interleaved_rates, readinto_pass, touch
from .report import run_header, write_json
from . import idle, small_remote
from .waits import idle_barrier
from .single import BenchError
from .suite.core import describe_error as _describe

T = TypeVar("T")
MiB = 1 << 20
GB = 1e9
_READER, _OWNER = 0, 1
_POISON = 0xA5  # outputs are overwritten before each read: a get that copies nothing fails its check
REMOTE_TARGET_RATIO = 0.8
LOOKUP_TARGET_US = 100.0
DEDUP_PUT_TARGET_US = 200.0

_OP_ECHO = 0xFFE0
"""The ceilings' echo op on the store's service: far from the directory's 16..31 and any op the store adds."""
_ECHO_REQUEST = bytes(24)  # about a lookup request: count, key length, type-tagged key
_ECHO_REPLY = bytes(56)  # about a lookup reply: digest, dtype, shape


def _echo(source: int, payload: memoryview) -> bytes:
    return _ECHO_REPLY


@dataclass(frozen=True, slots=True)
class ClusterSizes:
    """How much data each experiment moves."""

    block: int = 16 * MiB
    host_capacity: int = 1 << 30
    """Per rank."""
    reps: int = 5
    remote_set: int = 64 * MiB
    """Remote get: bytes of distinct blocks, twice a 32 MiB L3, so neither kind reads from cache."""
    remote_bytes_per_rep: int = 256 * MiB
    lookups: int = 5000
    lookup_keys: int = 256
    dedup_block: int = 64 << 10
    dedup_blocks: int = 500
    prefix_blocks: int = 16
    prefix_passes: int = 3
    idle_s: float = 3.0
    """Idle CPU: the window each rank sits idle (and the same in a blocking receive)."""
    wake_calls: int = 1000
    """Round trips per state (at most 200 to a sleeping peer: each waits for the peer to fall asleep)."""
    small_batches: int = 30

    @classmethod
    def for_run(cls, *, quick: bool, block: int | None, host_capacity: int | None) -> ClusterSizes:
        base = cls(block=1 * MiB, host_capacity=32 * MiB, reps=3, remote_set=8 * MiB, remote_bytes_per_rep=32 * MiB,
                   lookups=500, lookup_keys=64, dedup_blocks=100, prefix_blocks=8, prefix_passes=2, idle_s=1.0,
                   wake_calls=100, small_batches=6) if quick else cls()
        return cls(**{**{name: getattr(base, name) for name in cls.__dataclass_fields__},
                      "block": block or base.block, "host_capacity": host_capacity or base.host_capacity})

    @property
    def remote_blocks(self) -> int:
        """At least ``remote_set`` bytes, at most half the host tier."""
        return max(2, min(64, -(-self.remote_set // self.block), self.host_capacity // (2 * self.block)))

    @property
    def prefix_count(self) -> int:
        """``prefix_blocks``, at most half the host tier: a rank may end up holding every loaded block."""
        return max(2, min(self.prefix_blocks, self.host_capacity // (2 * self.block)))

    @property
    def ticks(self) -> int:
        """Progress steps: one per :meth:`ClusterBench._together` (store open and close among them), one per
        remote-get rep."""
        return (4 + self.reps + 1) + 3 + 4 + (3 + 4 * self.prefix_passes) + 4 + (2 + 2 * len(small_remote.SIZES))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {
            "remote_blocks": self.remote_blocks, "prefix_count": self.prefix_count}


def _latency_us(samples: Sequence[float]) -> dict[str, float | int]:
    s = sorted(samples)
    return {"median_us": statistics.median(s) * 1e6, "p99_us": s[min(len(s) - 1, int(0.99 * len(s)))] * 1e6,
            "max_us": s[-1] * 1e6, "n": len(s)}


class ClusterBench:
    """Runs the four experiments in every rank of ``comm``; ``tick(description)`` marks progress."""

    def __init__(self, comm: MPI.Comm, sizes: ClusterSizes, root: Path, tick: Callable[[str], None]) -> None:
        if comm.Get_size() < 2:
            raise ValueError(f"cluster bench: needs 2 ranks or more, got {comm.Get_size()}")
        self.comm, self.s, self.root, self.tick = comm, sizes, root, tick
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.checkers: list[Contents] = []
        self.open_seconds: dict[str, float] = {}
        self.experiments: dict[str, dict[str, object]] = {}
        """Filled on rank 0 only."""

    def run(self) -> ClusterReport | None:
        """Collective; rank 0 gets the report, the others ``None``."""
        self.remote_get()
        self.directory()
        self.dedup_put()
        self.hot_prefix()
        self.idle()
        self.small_remote_gets()
        mine = (sum(c.checked for c in self.checkers), sum(c.wrong for c in self.checkers), self.open_seconds)
        every = self.comm.gather(mine, root=0)
        if self.rank != 0:
            return None
        return ClusterReport(
            ranks=self.size, settings={"dir": str(self.root), **self.s.as_dict()}, experiments=self.experiments,
            open_seconds={name: max(o[name] for _, _, o in every) for name in self.open_seconds},
            reads_checked=sum(c for c, _, _ in every), reads_wrong=sum(w for _, w, _ in every))

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _store(self, name: str, **cfg: object) -> Iterator[DistributedStore]:
        """A fresh store (collective) whose service also answers the ceilings' echo. Its close is a step of
        :meth:`_together`: a close that raises on one rank once its own collectives are done then fails the
        run on every rank, where a plain ``with`` would leave that rank in ``MPI_Finalize`` and the others in
        the next collective, hung. (One that raises *between* its collectives still hangs: a store bug.)"""
        t0 = time.perf_counter()
        store = DistributedStore(comm=self.comm, host_capacity=self.s.host_capacity, disk_path=self.root / name,
                                 **cfg)
        self.open_seconds[name] = time.perf_counter() - t0
        try:
            self._together(lambda: store.directory.service.register(_OP_ECHO, _echo), f"{name}: store open")
            yield store
        finally:
            self._together(store.close, f"{name}: store close")

    def _together(self, fn: Callable[[], T], what: str) -> T:
        """Run this rank's part of a step, wait for every rank's, and raise on every rank if any failed.

        Raising on the failing rank alone was rejected: the others would wait forever in the next collective
        (the store's close among them). Any exception is caught, and raised again everywhere, never dropped.
        """
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  raised again below, on every rank
            error = f"rank {self.rank}, {what}: {_describe(e)}"
        idle_barrier(self.comm)
        errors = [e for e in self.comm.allgather(error) if e is not None]
        if errors:
            raise BenchError("; ".join(errors))
        self.tick(what)
        return result  # type: ignore[return-value]

    def _contents(self, nbytes: int, seed: int) -> Contents:
        self.checkers.append(Contents(nbytes, seed=seed))
        return self.checkers[-1]

    def _put_blocks(self, st: DistributedStore, keys: Sequence[str], ids: range, contents: Contents) -> None:
        buf = touch(np.empty(contents.nbytes, np.uint8))
        for key, i in zip(keys, ids):
            st.put(key, contents.fill(i, buf))

    # ------------------------------------------------------------------ 1. remote get
    def remote_get(self) -> None:
        contents = self._contents(self.s.block, seed=21)
        ids = contents.new_ids(self.s.remote_blocks)
        keys = [f"remote-{i}" for i in ids]
        with self._store("remote", locality_aware=False) as st:
            self._together(lambda: self._put_blocks(st, keys, ids, contents) if self.rank == _OWNER else None,
                           f"remote get: rank {_OWNER} puts")
            fig = self._together(lambda: self._remote_reads(st, keys, ids, contents) if self.rank == _READER
                                 else None, f"remote get: rank {_READER} reads")
        if self.rank == _READER:
            self.experiments["remote_get"] = fig

    def _memory_copy(self, st: DistributedStore, key: str, rank: int) -> Location:
        """The one copy of ``key``'s block, which must lie in ``rank``'s memory."""
        locations = st.locations(key)
        if len(locations) != 1 or locations[0].tier != TIER_MEMORY or locations[0].rank != rank:
            raise BenchError(f"{key!r}: expected one copy, in rank {rank}'s memory; the directory says {locations}")
        return locations[0]

    def _remote_reads(self, st: DistributedStore, keys: list[str], ids: range,
                      contents: Contents) -> dict[str, object]:
        """Rank 0's side: ``get`` and a bare ``Get`` take turns on neighbouring blocks (so neither reads what
        the other just cached) and swap places every rep; the figure is the median over single reads, as in
        :mod:`cascade_kv.bench.rma`, where timing whole passes of one kind was rejected as too noisy."""
        bs = self.s.block
        where = [self._memory_copy(st, key, _OWNER) for key in keys]
        outs = buffers(len(keys), bs)
        count = max(2 * len(keys), self.s.remote_bytes_per_rep // bs)
        count += count % 2  # even: both kinds read every block

        def store_get(j: int) -> None:
            st.get(keys[j], out=outs[j])

        def bare_get(j: int) -> None:
            # [buffer, MPI.BYTE], not the bare buffer: mpi4py would describe that as MPI_UNSIGNED_CHAR against
            # the BYTE target, a mismatch osc/sm copies through its convertor, ~1.5x slower (measured here)
            with epoch(st.window, _OWNER) as win:
                win.Get([outs[j], MPI.BYTE], _OWNER, (ARENA_OFFSET + where[j].offset + SLOT_HEADER, bs, MPI.BYTE))

        before = st.stats()
        rates = interleaved_rates(
            {"store": store_get, "bare_get": bare_get}, count, self.s.reps, bs, outs, ids, contents,
            _POISON, lambda rep: self.tick(f"remote get ({'warm-up' if rep == 0 else f'rep {rep}/{self.s.reps}'})"))
        after = st.stats()
        gets = (self.s.reps + 1) * count // 2
        remote = after.tier("remote").hits - before.tier("remote").hits
        if remote != gets or after.promotions != before.promotions:
            raise BenchError(f"remote get: {gets} gets, but stats() counts {remote} remote hits and "
                             f"{after.promotions - before.promotions} promotions (locality_aware=False)")
        value, ceiling = Spread.of(rates["store"]), Spread.of(rates["bare_get"])
        ratio = value.median / ceiling.median
        return {"block_size": bs, "blocks": len(keys), "reads_per_rep": count, "store_GBps": value.as_dict(),
                "bare_get_GBps": ceiling.as_dict(), "ratio": ratio,
                "target": {"kind": "ratio", "value": REMOTE_TARGET_RATIO}, "passed": ratio >= REMOTE_TARGET_RATIO,
                "remote_hits": remote}

    # ------------------------------------------------------------------ 2. directory round trip
    def directory(self) -> None:
        with self._store("directory") as st:
            fig = self._together(lambda: self._lookups(st) if self.rank == _READER else None,
                                 f"directory: rank {_READER} looks keys up")
        if self.rank == _READER:
            self.experiments["directory_lookup"] = fig

    def _lookups(self, st: DistributedStore) -> dict[str, object]:
        """Bind small values under keys homed elsewhere, then time lookups and echoes to the same homes,
        taking turns call by call. Every answer is checked against the digest the value hashes to."""
        keys = [k for k in (f"dir-{i}" for i in range(64 * self.s.lookup_keys))
                if home_of_key(k, self.size) != _READER][:self.s.lookup_keys]
        values = [np.arange(16, dtype=np.uint32) + 16 * i for i in range(len(keys))]
        st.put_many(keys, values)
        hasher = Hasher("blake3")
        expected = [KeyRecord(hasher.digest(memoryview(v.view(np.uint8))), v.dtype.str, v.shape) for v in values]
        homes = [home_of_key(k, self.size) for k in keys]
        service = st.directory.service
        warmup = max(10, self.s.lookups // 10)
        samples: dict[str, list[float]] = {"lookup": [], "echo": []}
        for k in range(warmup + self.s.lookups):
            j = k % len(keys)
            for name in ("lookup", "echo") if k % 2 else ("echo", "lookup"):
                t0 = time.perf_counter()
                got = st.directory.lookup(keys[j]) if name == "lookup" else service.call(homes[j], _OP_ECHO,
                                                                                         _ECHO_REQUEST)
                dt = time.perf_counter() - t0
                if name == "lookup" and (got is None or (got.digest, got.dtype, tuple(got.shape)) !=
                                         (expected[j].digest, expected[j].dtype, expected[j].shape)):
                    raise BenchError(f"directory: lookup({keys[j]!r}) answered {got}, expected {expected[j]}")
                if k >= warmup:
                    samples[name].append(dt)
        value, ceiling = _latency_us(samples["lookup"]), _latency_us(samples["echo"])
        judged = self.size == 2  # the target is set for two ranks; more share this machine's cores
        return {**value, "keys": len(keys), "echo": ceiling, "ratio": ceiling["median_us"] / value["median_us"],
                "target": {"kind": "max_median_us", "value": LOOKUP_TARGET_US, "ranks": 2},
                "passed": value["median_us"] < LOOKUP_TARGET_US if judged else None}

    # ------------------------------------------------------------------ 3. dedup put
    def dedup_put(self) -> None:
        bs, n = self.s.dedup_block, self.s.dedup_blocks
        contents = self._contents(bs, seed=23)
        ids = contents.new_ids(n)
        rows = contents.fill_rows(ids, touch(np.empty((n, bs), np.uint8)))
        with self._store("dedup") as st:
            self._together(lambda: st.put_many([f"dedup-a-{i}" for i in ids], list(rows))
                           if self.rank == _OWNER else None, f"dedup put: rank {_OWNER} puts")
            fig = self._together(lambda: self._dedup_puts(st, rows, ids, contents) if self.rank == _READER
                                 else None, f"dedup put: rank {_READER} puts the same bytes")
        if self.rank == _READER:
            self.experiments["dedup_put"] = fig

    def _dedup_puts(self, st: DistributedStore, rows: np.ndarray, ids: range,
                    contents: Contents) -> dict[str, object]:
        """Time each put of bytes rank 1 stored, taking turns with its ceiling (hash + an echo to the digest's
        home + one to the key's home); then check the counters and read every key back."""
        keys = [f"dedup-b-{i}" for i in ids]
        hasher, service = Hasher("blake3"), st.directory.service
        for _ in range(50):  # a fresh store's service: warm the call path, not the puts (each put counts once)
            service.call(_OWNER, _OP_ECHO, _ECHO_REQUEST)

        def ceiling(key: str, row: np.ndarray) -> float:
            t0 = time.perf_counter()
            digest = hasher.digest(memoryview(row))
            hashed = time.perf_counter() - t0
            service.call(home_of_digest(digest, self.size), _OP_ECHO, _ECHO_REQUEST)
            service.call(home_of_key(key, self.size), _OP_ECHO, _ECHO_REQUEST)
            return hashed

        samples: dict[str, list[float]] = {"put": [], "ceiling": [], "hash": []}
        before = st.stats()
        for k, (key, row) in enumerate(zip(keys, rows)):
            for name in ("put", "ceiling") if k % 2 else ("ceiling", "put"):
                t0 = time.perf_counter()
                if name == "put":
                    st.put(key, row)
                else:
                    samples["hash"].append(ceiling(key, row))
                samples[name].append(time.perf_counter() - t0)
        after = st.stats()
        received = after.bytes_received - before.bytes_received
        hits = after.dedup_hits - before.dedup_hits
        out = touch(np.empty_like(rows))
        out.fill(_POISON)
        st.get_many(keys, list(out))
        contents.check_rows(ids, out, touch(np.empty_like(rows)))
        value = _latency_us(samples["put"])
        return {**value, "block_size": rows.shape[1], "blocks": len(keys), "ceiling": _latency_us(samples["ceiling"]),
                "hash_us": statistics.median(samples["hash"]) * 1e6,
                "ratio": statistics.median(samples["ceiling"]) * 1e6 / value["median_us"],
                "dedup_hits": hits, "bytes_received": received, "bulk_bytes": rows.nbytes,
                "target": {"kind": "max_median_us", "value": DEDUP_PUT_TARGET_US},
                "passed": value["median_us"] < DEDUP_PUT_TARGET_US and hits == len(keys) and received < rows.shape[1]}

    # ------------------------------------------------------------------ 5. idle ranks
    def idle(self) -> None:
        with self._store("idle") as st:
            cpu = self._together(lambda: idle.idle_cpu(self.comm, self.s.idle_s), "idle: every rank sits idle")
            trips = self._together(lambda: idle.round_trips(self.comm, st.directory.service, _OP_ECHO,
                                                            self.s.wake_calls, 2 * st.directory.service.hot_s,
                                                            _OP_ECHO + 1),
                                   "idle: round trips to a hot, sleeping and busy rank")
        if self.rank == 0:
            self.experiments["idle_cpu"] = cpu
            self.experiments["wake_round_trip"] = trips

    # ------------------------------------------------------------------ 6. small remote gets
    def small_remote_gets(self) -> None:
        figures = []
        with self._store("small", locality_aware=False) as st:
            for nbytes in small_remote.SIZES:
                contents = self._contents(nbytes, seed=25 + nbytes)
                ids = contents.new_ids(64)
                keys = [f"small-{nbytes}-{i}" for i in ids]
                rows = list(contents.fill_rows(ids, np.empty((len(ids), nbytes), np.uint8)))
                self._together(lambda: st.put_many(keys, rows) if self.rank == _OWNER else None,
                               f"small remote gets: rank {_OWNER} puts {format_size(nbytes)} blocks")
                fig = self._together(
                    lambda: small_remote.reads(st, keys, [self._memory_copy(st, k, _OWNER).offset + SLOT_HEADER
                                                          for k in keys], rows, self.s.small_batches)
                    if self.rank == _READER else None, f"small remote gets: {format_size(nbytes)} blocks")
                figures.append(fig)
        if self.rank == _READER:
            self.experiments["small_remote_get"] = {"sizes": figures, "passed": all(f["passed"] for f in figures)}

    # ------------------------------------------------------------------ 4. hot prefix
    def hot_prefix(self) -> None:
        bs, p = self.s.block, self.s.prefix_count
        contents = self._contents(bs, seed=24)
        ids = contents.new_ids(p)
        keys = [f"prefix-{i}" for i in ids]
        outs = buffers(p, bs)
        disk = self.root / "prefix"
        passes: list[dict[str, object]] = []
        with self._store("prefix") as st:
            self._together(lambda: self._put_blocks(st, keys, ids, contents) if self.rank == 0 else None,
                           "hot prefix: rank 0 puts")
            for n in range(self.s.prefix_passes):
                what = f"hot prefix, pass {n + 1}/{self.s.prefix_passes}"
                self._together(lambda: self._demote(st, keys) if self.rank == 0 else None, f"{what}: demote")
                # every rank drops: on a cluster each node has its own page cache
                self._together(lambda: drop_page_cache(self._block_files(disk, p)), f"{what}: drop page cache")
                # the ceiling: the same ranks read the same files cold at once, with nothing to coordinate them
                # (one rank's read against the store's N-rank aggregate flattered the store N times)
                self.comm.Barrier()  # a tight start, as the store's reads below
                took = self._together(lambda: readinto_pass(self._block_files(disk, p), outs),
                                      f"{what}: cold readinto, every rank")
                cold = self.size * p * bs / max(self.comm.allgather(took)) / GB
                self._together(lambda: drop_page_cache(self._block_files(disk, p)), f"{what}: drop page cache again")
                before = st.cluster_stats()
                self.comm.Barrier()  # a tight start (not idle_barrier): every rank reads at once
                took = self._together(lambda: self._read_all(st, keys, ids, outs, contents), f"{what}: reads")
                after = st.cluster_stats()
                slowest = max(self.comm.allgather(took))
                passes.append({"cold_readinto_GBps": cold, "aggregate_GBps": self.size * p * bs / slowest / GB,
                               "seconds": slowest, **{f"{tier}_hits": after.tier(tier).hits - before.tier(tier).hits
                                                      for tier in ("disk", "host", "remote")}})
        if self.rank == 0:
            value, ceiling = (Spread.of([q[k] for q in passes]) for k in ("aggregate_GBps", "cold_readinto_GBps"))
            self.experiments["hot_prefix"] = {
                "block_size": bs, "blocks": p, "ranks": self.size, "passes": passes,
                "disk_reads": [q["disk_hits"] for q in passes], "aggregate_GBps": value.as_dict(),
                "cold_readinto_GBps": ceiling.as_dict(), "ratio": value.median / ceiling.median,
                "passed": all(q["disk_hits"] == p for q in passes)}

    def _demote(self, st: DistributedStore, keys: list[str]) -> None:
        st.demote(keys)
        stuck = {k: st.locations(k) for k in keys if any(loc.tier == TIER_MEMORY for loc in st.locations(k))}
        if stuck:
            raise BenchError(f"hot prefix: after demote, {len(stuck)} blocks still have a copy in memory: {stuck}")

    @staticmethod
    def _block_files(disk: Path, expected: int) -> list[Path]:
        files = sorted(f for f in (disk / "blocks").rglob("*") if f.is_file())
        if len(files) != expected:
            raise BenchError(f"hot prefix: {len(files)} block files under {disk / 'blocks'}, expected {expected}")
        return files

    @staticmethod
    def _read_all(st: DistributedStore, keys: list[str], ids: range, outs: list[np.ndarray],
                  contents: Contents) -> float:
        for o in outs:
            o.fill(_POISON)
        t0 = time.perf_counter()
        for key, o in zip(keys, outs):
            st.get(key, out=o)
        took = time.perf_counter() - t0
        for i, o in zip(ids, outs):
            contents.check(i, o)
        return took


# ---------------------------------------------------------------------- report
@dataclass(slots=True)
class ClusterReport:
    """Everything one distributed run measured (rank 0's view)."""

    ranks: int
    settings: dict[str, object]
    experiments: dict[str, dict[str, object]] = field(default_factory=dict)
    open_seconds: dict[str, float] = field(default_factory=dict)
    """Slowest rank's store open, per experiment: never inside a timed figure."""
    reads_checked: int = 0
    reads_wrong: int = 0
    wall_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return run_header(self.settings) | {
            "ranks": self.ranks, "settings": self.settings, "experiments": self.experiments,
            "open_seconds": self.open_seconds, "reads_checked": self.reads_checked,
            "reads_wrong": self.reads_wrong, "wall_seconds": self.wall_seconds}

    def write_json(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.as_dict())


def _gbps(s: dict) -> str:  # type: ignore[type-arg]
    return f"{s['median']:.2f} GB/s\n[dim]{s['min']:.2f} - {s['max']:.2f}[/dim]"


def _rate(median: float, span: list[float]) -> str:
    return f"{median / 1e3:,.0f}k blocks/s\n[dim]{span[0] / 1e3:,.0f}k - {span[1] / 1e3:,.0f}k[/dim]"


def _idle_rows(table: Table, cpu: dict, trips: dict, n: int) -> None:  # type: ignore[type-arg]
    table.add_row(f"CPU of an idle rank, store open\n[dim]{cpu['seconds']:g} s window; per rank "
                  f"{cpu['idle_pct']} %[/dim]", f"{cpu['max_idle_pct']:.2f} %",
                  f"{max(cpu['blocking_recv_pct']):.0f} %\n[dim]a rank in a blocking MPI_Recv[/dim]", "",
                  f"< {idle.IDLE_TARGET_PCT:g} %", _VERDICT[cpu["passed"]])
    bare = trips["bare_mpi"]
    for state, say, target, ok in (
            ("hot", "service hot (calls back to back)", "", None),
            ("asleep", "service asleep in the kernel (woken by a ring)", f"< {idle.ASLEEP_TARGET_US:g} us median",
             trips["asleep"]["median_us"] < idle.ASLEEP_TARGET_US),
            ("busy", f"rank busy in Python, calls {trips['busy']['gap_ms']:.0f} ms apart",
             f"< {idle.BUSY_TARGET_P99_US / 1e3:g} ms p99", trips["busy"]["p99_us"] < idle.BUSY_TARGET_P99_US)):
        f = trips[state]
        ceiling = trips["kernel_wake"] if state == "asleep" else bare
        said = ("UDP ping-pong to a process asleep in recv, same gap" if state == "asleep"
                else "bare MPI ping-pong, peer in Recv")
        table.add_row(f"round trip to rank {_OWNER}: {say}\n[dim]{f['n']} calls, 24 B request, 56 B reply[/dim]",
                      _us(f), _us(ceiling) + f"\n[dim]{said}[/dim]",
                      f"{ceiling['median_us'] / f['median_us']:.2f}x", target, _VERDICT[ok])


def _us(s: dict) -> str:  # type: ignore[type-arg]
    return f"{s['median_us']:,.1f} us\n[dim]p99 {s['p99_us']:,.1f}[/dim]"


_VERDICT = {None: "-", True: "[green]pass[/green]", False: "[red]below[/red]"}


def render_cluster(report: ClusterReport, console: Console) -> None:
    """Print the experiments table and the notes."""
    e, n = report.experiments, report.ranks
    table = Table(title=f"cascade bench: {n} ranks (median; range or p99 below)", show_lines=True)
    for col, just in (("measurement", "left"), ("cascade-kv", "right"), ("ceiling (same run)", "right"),
                      ("ratio", "right"), ("target", "right"), ("verdict", "center")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    r = e["remote_get"]
    table.add_row(f"get from rank {_OWNER}'s memory, {format_size(r['block_size'])} blocks\n[dim]{r['blocks']} "
                  f"blocks, {r['reads_per_rep']} reads per rep, locality_aware=False[/dim]",
                  _gbps(r["store_GBps"]), _gbps(r["bare_get_GBps"]) + "\n[dim]bare mpi4py Get, same window[/dim]",
                  f"{r['ratio']:.2f}x", f">= {REMOTE_TARGET_RATIO:g}x", _VERDICT[r["passed"]])
    d = e["directory_lookup"]
    table.add_row(f"directory lookup, key homed on another rank\n[dim]{d['n']} lookups over {d['keys']} keys[/dim]",
                  _us(d), _us(d["echo"]) + "\n[dim]echo, same service thread[/dim]", f"{d['ratio']:.2f}x",
                  f"< {LOOKUP_TARGET_US:g} us\n[dim](2 ranks)[/dim]", _VERDICT[d["passed"]])
    p = e["dedup_put"]
    table.add_row(f"put of bytes rank {_OWNER} stored (dedup), {format_size(p['block_size'])} blocks\n[dim]"
                  f"{p['blocks']} puts; hash of one block {p['hash_us']:.1f} us; dedup hits {p['dedup_hits']} of "
                  f"{p['blocks']}; {format_size(p['bytes_received'])} received for "
                  f"{format_size(p['bulk_bytes'])} of blocks[/dim]",
                  _us(p), _us(p["ceiling"]) + "\n[dim]hash + echo to both homes[/dim]", f"{p['ratio']:.2f}x",
                  f"< {DEDUP_PUT_TARGET_US:g} us\n[dim]all hits, no bulk transfer[/dim]", _VERDICT[p["passed"]])
    h = e["hot_prefix"]
    table.add_row(f"hot prefix: {n} ranks each read {h['blocks']} blocks of {format_size(h['block_size'])} that "
                  f"start on disk (page cache dropped)\n[dim]aggregate over ranks; disk reads per pass "
                  f"{h['disk_reads']}[/dim]",
                  _gbps(h["aggregate_GBps"]), _gbps(h["cold_readinto_GBps"]) + f"\n[dim]cold open + readinto, "
                  f"{n} ranks at once, aggregate[/dim]", f"{h['ratio']:.2f}x", f"disk reads = {h['blocks']}\n[dim]whatever the ranks[/dim]",
                  _VERDICT[h["passed"]])
    if "idle_cpu" in e:
        _idle_rows(table, e["idle_cpu"], e["wake_round_trip"], n)
    if "small_remote_get" in e:
        for f in e["small_remote_get"]["sizes"]:
            table.add_row(f"get_many of {f['batch']} blocks of {format_size(f['block_size'])} from rank {_OWNER}'s "
                          f"memory\n[dim]{f['batches']} batches, locality_aware=False[/dim]",
                          _rate(f["store_blocks_per_s"], f["store_range"]),
                          _rate(f["bare_blocks_per_s"], f["bare_range"]) + "\n[dim]bare Get per block, one "
                          "Lock_all epoch[/dim]", f"{f['ratio']:.2f}x", f">= {small_remote.TARGET_RATIO:g}x",
                          _VERDICT[f["passed"]])
    console.print(table)
    s = report.settings
    console.print("Store open (arena allocated and touched), apart from every timed figure, slowest rank: " +
                  ", ".join(f"{name} {sec:.2f} s" for name, sec in report.open_seconds.items()))
    console.print(f"Host tier {format_size(s['host_capacity'])} per rank; {s['reps']} reps after warm-up; shared "
                  f"disk tier in {escape(str(s['dir']))} (removed). Ratios of latencies are ceiling / cascade-kv.")
    colour = "green" if report.reads_wrong == 0 else "red"
    console.print(f"[{colour}]Reads checked against the written bytes, all ranks: {report.reads_checked}, "
                  f"wrong: {report.reads_wrong}[/{colour}]. Wall time {report.wall_seconds:.1f} s.")
