"""The main job on N ranks (``cascade bench --ranks N``, the suite's ``store`` experiment in a job of several
ranks): six experiments over the ranks of an MPI job, each figure recorded beside its ceiling measured in
the same run, as rows of one :class:`~.suite.core.Result` judged by the suite's rule (a target passes only
when the spread of its repetitions clears it; a figure beyond its ceiling is a broken ceiling).

1. **remote get**: rank 1 stores blocks, rank 0 gets them (``locality_aware=False``, so no replica is
   made), taking turns read by read with a bare mpi4py ``Get`` of the same bytes out of the same window
   (:mod:`.remote_get`). Target: 0.8x the bare ``Get``.
2. **directory round trip**: rank 0 looks up keys homed on other ranks, taking turns with an echo of about
   the same size through the same service thread: the transport with no directory behind it. Target (on 2
   ranks): at most 100 us median.
3. **dedup put**: rank 1 stores blocks, rank 0 puts the same bytes under new keys. Each put must be a dedup
   hit with no bulk transfer (else the run stops: the figure would measure other puts); its ceiling is what
   such a put cannot avoid: hashing the block and one echo each to the digest's home and the key's home.
   Target: at most 200 us median.
4. **hot prefix**: blocks start on the shared disk tier (demoted, page cache dropped) and every rank reads
   all of them. Load leases must make it one disk read per block however many ranks ask (a figure of its
   own, ``hot_prefix_disk_reads``, at most the blocks per pass). Ceiling: the same ranks reading the same
   files cold at once with open + readinto (aggregate, as the store's figure).
5. **idle ranks** (:mod:`.idle`): each rank's CPU while it holds an open store and does nothing (at most
   5 %), beside a rank waiting in a blocking ``MPI_Recv``; round trips to a service that is hot, asleep (at
   most 100 us median), or whose rank is busy in Python (at most 2 ms p99), beside a bare MPI ping-pong and
   the kernel's own wake-up.
6. **small remote gets** (:mod:`.small_remote`): ``get_many`` of 64 blocks of 4 KiB and 64 KiB from rank
   1's memory against a bare ``Get`` loop over the same blocks (target 0.5x).

A latency's samples are one median per pass (the single calls of a run split into ``reps`` passes, in call
order), so that the spread rule sees passes, not single calls; the single calls' p50 and p99 are kept in
the figures' details (``values["details"]``). Every read is checked against the bytes written. Each
experiment opens its own store (its disk tier in a folder of its own under the run's root, which every
rank must see) and closes it. A rank that fails raises on every rank at the next step (:meth:`~.suite.core.Run.together`), so
no rank is left waiting in a collective. Rank 0's result is the one rendered.

Imports ``mpi4py.MPI``, which initialises MPI: import this module only in a rank a launcher started.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cluster.directory import TIER_MEMORY, KeyRecord
from ..cluster.homes import home_of_digest, home_of_key
from ..cluster.store import DistributedStore
from ..config import format_size
from ..hashing import Hasher
from . import idle, small_remote
from .ceilings import Contents, Spread, buffers, drop_page_cache, readinto_pass, touch
from .remote_get import get_vs_bare, memory_offsets
from .suite.core import GB, POISON, BenchError, MiB, Result, Run

SYSTEM = "cascade-kv"
_READER, _OWNER = 0, 1
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
    """Passes of each experiment after its warm-up: the samples of each figure."""
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
    def remote_reads(self) -> int:
        """Remote get: reads per rep, both kinds together (even: both read every block as often)."""
        count = max(2 * self.remote_blocks, self.remote_bytes_per_rep // self.block)
        return count + count % 2

    @property
    def prefix_count(self) -> int:
        """``prefix_blocks``, at most half the host tier: a rank may end up holding every loaded block."""
        return max(2, min(self.prefix_blocks, self.host_capacity // (2 * self.block)))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {
            "remote_blocks": self.remote_blocks, "prefix_count": self.prefix_count}


def latency_us(samples: Sequence[float]) -> dict[str, float | int]:
    """Single calls (seconds): median, p99 and max in microseconds, and how many."""
    s = sorted(samples)
    return {"median_us": statistics.median(s) * 1e6, "p99_us": s[min(len(s) - 1, int(0.99 * len(s)))] * 1e6,
            "max_us": s[-1] * 1e6, "n": len(s)}


def per_pass(samples: Sequence[float], passes: int, scale: float = 1e6,
             stat: Callable[[Sequence[float]], float] = statistics.median) -> list[float]:
    """``stat`` (the median) of each of ``passes`` consecutive runs of ``samples`` (in the order taken), times
    ``scale``: one figure per pass, which the spread rule judges (single calls would spread far wider than any
    target, and a median's target is a median's)."""
    return [float(stat(list(chunk))) * scale for chunk in np.array_split(np.asarray(samples), passes) if len(chunk)]


def run_cluster(r: Run) -> Result:
    """Collective over ``r``'s ranks (2 or more); every rank gets a result, rank 0's holds the figures."""
    if r.size < 2:
        raise BenchError(f"the distributed main job needs 2 ranks or more, got {r.size}")
    s = ClusterSizes.for_run(quick=r.quick, block=r.options.get("block"), host_capacity=r.options.get("host_capacity"))
    res = Result("store", f"the distributed store on {r.size} ranks against this machine's ceilings", r.size,
                 settings={"dir": str(r.root), **s.as_dict()})
    job = _Job(r, s, res)
    for experiment in (job.remote_get, job.directory, job.dedup_put, job.hot_prefix, job.idle,
                       job.small_remote_gets):
        experiment()
    every = r.allgather(job.open_seconds)
    res.settings["open_seconds"] = {name: max(o[name] for o in every) for name in job.open_seconds}
    if r.rank == 0:
        res.systems[SYSTEM].values["details"] = job.values  # one key: the measures share the values' namespace
    res.notes.append(f"Host tier {format_size(s.host_capacity)} per rank; {s.reps} passes after warm-up; shared "
                     f"disk tier in {r.root} (removed). A latency's ratio is ceiling / cascade-kv; its samples are "
                     f"one median per pass (single calls' p50 and p99 in the JSON's details).")
    return res


class _Job:
    """The experiments of one run, in every rank; rank 0 records the figures."""

    def __init__(self, r: Run, s: ClusterSizes, res: Result) -> None:
        self.r, self.s, self.res = r, s, res
        self.rank, self.size = r.rank, r.size
        self.open_seconds: dict[str, float] = {}
        self.values: dict[str, Any] = {}
        """Rank 0's details of each experiment, by figure: ``res.systems["cascade-kv"].values["details"]``."""

    @contextmanager
    def _store(self, name: str, **cfg: object) -> Iterator[DistributedStore]:
        """A fresh store (collective) whose service also answers the ceilings' echo. Its close is a step of
        :meth:`~.suite.core.Run.together`: a close that raises on one rank once its own collectives are done
        then fails the run on every rank, where a plain ``with`` would leave that rank in ``MPI_Finalize`` and
        the others in the next collective, hung. (One that raises *between* its collectives still hangs: a
        store bug.)"""
        t0 = time.perf_counter()
        store = DistributedStore(comm=self.r.comm, host_capacity=self.s.host_capacity,
                                 disk_path=self.r.root / name, **cfg)
        self.open_seconds[name] = time.perf_counter() - t0
        try:
            self.r.together(lambda: store.directory.service.register(_OP_ECHO, _echo), f"{name}: store open")
            yield store
        finally:
            self.r.together(store.close, f"{name}: store close")

    def _put_blocks(self, st: DistributedStore, keys: Sequence[str], ids: range, contents: Contents) -> None:
        buf = touch(np.empty(contents.nbytes, np.uint8))
        for key, i in zip(keys, ids):
            st.put(key, contents.fill(i, buf))

    # ------------------------------------------------------------------ 1. remote get
    def remote_get(self) -> None:
        r, s = self.r, self.s
        contents = r.new_contents(s.block, seed=21)
        ids = contents.new_ids(s.remote_blocks)
        keys = [f"remote-{i}" for i in ids]
        with self._store("remote", locality_aware=False) as st:
            r.together(lambda: self._put_blocks(st, keys, ids, contents) if self.rank == _OWNER else None,
                       f"remote get: rank {_OWNER} puts")
            rates = r.together(lambda: self._remote_reads(st, keys, ids, contents) if self.rank == _READER
                               else None, f"remote get: rank {_READER} reads")
        if self.rank != _READER:
            return
        # the figure of a pass is the median of its single reads (as it has always been); the passes are the
        # samples the verdict judges
        store, bare = (per_pass(rates[kind], s.reps, scale=1) for kind in ("store", "bare_get"))
        self.res.figure("remote_get", f"get from rank {_OWNER}'s memory, {format_size(s.block)} blocks", "GB/s",
                        store, ceiling=bare, ceiling_what="bare mpi4py Get, same window",
                        target=REMOTE_TARGET_RATIO, note=f"{len(keys)} blocks, {s.remote_reads} reads per pass, "
                                                         f"locality_aware=False; median of each pass's reads")
        self.values["remote_get"] = {"block_size": s.block, "blocks": len(keys), "reads_per_rep": s.remote_reads,
                                     "single_reads_GBps": {k: Spread.of(v).as_dict() for k, v in rates.items()}}

    def _remote_reads(self, st: DistributedStore, keys: list[str], ids: range,
                      contents: Contents) -> dict[str, list[float]]:
        outs = buffers(len(keys), self.s.block)
        return get_vs_bare(st, lambda j: st.get(keys[j], out=outs[j]), keys, ids, outs, contents, owner=_OWNER,
                           count=self.s.remote_reads, reps=self.s.reps,
                           after_rep=lambda rep: self.r.tick(
                               f"remote get ({'warm-up' if rep == 0 else f'rep {rep}/{self.s.reps}'})"))

    # ------------------------------------------------------------------ 2. directory round trip
    def directory(self) -> None:
        with self._store("directory") as st:
            samples = self.r.together(lambda: self._lookups(st) if self.rank == _READER else None,
                                      f"directory: rank {_READER} looks keys up")
        if self.rank != _READER:
            return
        judged = self.size == 2  # the target is set for two ranks; more share this machine's cores
        self.res.figure("directory_lookup", "directory lookup, key homed on another rank", "us",
                        per_pass(samples["lookup"], self.s.reps), ceiling=per_pass(samples["echo"], self.s.reps),
                        ceiling_what="echo, same service thread", target=LOOKUP_TARGET_US if judged else None,
                        of_ceiling=False, at_most=True,
                        note=f"{len(samples['lookup'])} lookups over {self.s.lookup_keys} keys; median per pass"
                             + ("" if judged else "; the 100 us target is set for 2 ranks"))
        self.values["directory_lookup"] = {"keys": self.s.lookup_keys, "lookup": latency_us(samples["lookup"]),
                                           "echo": latency_us(samples["echo"])}

    def _lookups(self, st: DistributedStore) -> dict[str, list[float]]:
        """Bind small values under keys homed elsewhere, then time lookups and echoes to the same homes,
        taking turns call by call. Every answer is checked against the digest the value hashes to. Seconds
        per call, in call order."""
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
        return samples

    # ------------------------------------------------------------------ 3. dedup put
    def dedup_put(self) -> None:
        bs, n = self.s.dedup_block, self.s.dedup_blocks
        contents = self.r.new_contents(bs, seed=23)
        ids = contents.new_ids(n)
        rows = contents.fill_rows(ids, touch(np.empty((n, bs), np.uint8)))
        with self._store("dedup") as st:
            self.r.together(lambda: st.put_many([f"dedup-a-{i}" for i in ids], list(rows))
                            if self.rank == _OWNER else None, f"dedup put: rank {_OWNER} puts")
            got = self.r.together(lambda: self._dedup_puts(st, rows, ids, contents) if self.rank == _READER
                                  else None, f"dedup put: rank {_READER} puts the same bytes")
        if self.rank != _READER:
            return
        samples, counts = got
        self.res.figure("dedup_put", f"put of bytes rank {_OWNER} stored (dedup), {format_size(bs)} blocks", "us",
                        per_pass(samples["put"], self.s.reps), ceiling=per_pass(samples["ceiling"], self.s.reps),
                        ceiling_what="hash + echo to both homes", target=DEDUP_PUT_TARGET_US, of_ceiling=False,
                        at_most=True,
                        note=f"{n} puts, median per pass; hash of one block "
                             f"{statistics.median(samples['hash']) * 1e6:.1f} us; dedup hits {counts['dedup_hits']} "
                             f"of {n}; {format_size(counts['bytes_received'])} received for "
                             f"{format_size(rows.nbytes)} of blocks")
        self.values["dedup_put"] = {"block_size": bs, "blocks": n, "put": latency_us(samples["put"]),
                                    "ceiling": latency_us(samples["ceiling"]),
                                    "hash_us": statistics.median(samples["hash"]) * 1e6,
                                    "bulk_bytes": rows.nbytes, **counts}

    def _dedup_puts(self, st: DistributedStore, rows: np.ndarray, ids: range,
                    contents: Contents) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Time each put of bytes rank 1 stored, taking turns with its ceiling (hash + an echo to the digest's
        home + one to the key's home); then check the counters and read every key back. Seconds per call, in
        call order, and the counters: every put a dedup hit and no bulk transfer, or :class:`BenchError`."""
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
        out.fill(POISON)
        st.get_many(keys, list(out))
        contents.check_rows(ids, out, touch(np.empty_like(rows)))
        if hits != len(keys) or received >= rows.shape[1]:
            raise BenchError(f"dedup put: {len(keys)} puts of stored bytes, but {hits} dedup hits and {received} B "
                             f"received (a block is {rows.shape[1]} B): these were not dedup puts")
        return samples, {"dedup_hits": hits, "bytes_received": received}

    # ------------------------------------------------------------------ 4. hot prefix
    def hot_prefix(self) -> None:
        r, bs, p = self.r, self.s.block, self.s.prefix_count
        contents = r.new_contents(bs, seed=24)
        ids = contents.new_ids(p)
        keys = [f"prefix-{i}" for i in ids]
        outs = buffers(p, bs)
        disk = r.root / "prefix"
        passes: list[dict[str, float]] = []
        with self._store("prefix") as st:
            r.together(lambda: self._put_blocks(st, keys, ids, contents) if self.rank == 0 else None,
                       "hot prefix: rank 0 puts")
            for n in range(self.s.prefix_passes):
                what = f"hot prefix, pass {n + 1}/{self.s.prefix_passes}"
                r.together(lambda: self._demote(st, keys) if self.rank == 0 else None, f"{what}: demote")
                # every rank drops: on a cluster each node has its own page cache
                r.together(lambda: drop_page_cache(self._block_files(disk, p)), f"{what}: drop page cache")
                # the ceiling: the same ranks read the same files cold at once, with nothing to coordinate them
                # (one rank's read against the store's N-rank aggregate flattered the store N times)
                r.comm.Barrier()  # a tight start, as the store's reads below
                took = r.together(lambda: readinto_pass(self._block_files(disk, p), outs),
                                  f"{what}: cold readinto, every rank")
                cold = self.size * p * bs / max(r.allgather(took)) / GB
                r.together(lambda: drop_page_cache(self._block_files(disk, p)), f"{what}: drop page cache again")
                before = st.cluster_stats()
                r.comm.Barrier()  # a tight start (not idle_barrier): every rank reads at once
                took = r.together(lambda: self._read_all(st, keys, ids, outs, contents), f"{what}: reads")
                after = st.cluster_stats()
                slowest = max(r.allgather(took))
                passes.append({"cold_readinto_GBps": cold, "aggregate_GBps": self.size * p * bs / slowest / GB,
                               "seconds": slowest, **{f"{tier}_hits": after.tier(tier).hits - before.tier(tier).hits
                                                      for tier in ("disk", "host", "remote")}})
        if self.rank != 0:
            return
        self.res.figure("hot_prefix", f"hot prefix: {self.size} ranks each read {p} blocks of {format_size(bs)} "
                                      f"that start on disk (page cache dropped)", "GB/s",
                        [q["aggregate_GBps"] for q in passes], ceiling=[q["cold_readinto_GBps"] for q in passes],
                        ceiling_what=f"cold open + readinto, {self.size} ranks at once, aggregate",
                        note="aggregate over ranks, one figure per pass")
        self.res.figure("hot_prefix_disk_reads", "hot prefix: disk reads per pass", "reads",
                        [q["disk_hits"] for q in passes], target=p, of_ceiling=False, at_most=True,
                        text=f"<= {p} (one per block, whatever the ranks)",
                        note=f"{self.size} ranks read {p} blocks each pass")
        self.values["hot_prefix"] = {"block_size": bs, "blocks": p, "ranks": self.size, "passes": passes,
                                     "disk_reads": [q["disk_hits"] for q in passes]}

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
            o.fill(POISON)
        t0 = time.perf_counter()
        for key, o in zip(keys, outs):
            st.get(key, out=o)
        took = time.perf_counter() - t0
        for i, o in zip(ids, outs):
            contents.check(i, o)
        return took

    # ------------------------------------------------------------------ 5. idle ranks
    def idle(self) -> None:
        r = self.r
        with self._store("idle") as st:
            cpu = r.together(lambda: idle.idle_cpu(r.comm, self.s.idle_s), "idle: every rank sits idle")
            trips = r.together(lambda: idle.round_trips(r.comm, st.directory.service, _OP_ECHO, self.s.wake_calls,
                                                        2 * st.directory.service.hot_s, _OP_ECHO + 1),
                               "idle: round trips to a hot, sleeping and busy rank")
        if self.rank != 0:
            return
        res, reps = self.res, self.s.reps
        res.figure("idle_cpu", "CPU of an idle rank, store open", "%", cpu["idle_pct"], target=idle.IDLE_TARGET_PCT,
                   of_ceiling=False, at_most=True,
                   note=f"{cpu['seconds']:g} s window, one sample per rank; a rank in a blocking MPI_Recv: "
                        f"{max(cpu['blocking_recv_pct']):.0f} %")
        call = f"{len(trips['hot'])} calls, 24 B request, 56 B reply"
        res.figure("round_trip_hot", f"round trip to rank {_OWNER}: service hot (calls back to back)", "us",
                   per_pass(trips["hot"], reps), ceiling=per_pass(trips["bare_mpi"], reps),
                   ceiling_what="bare MPI ping-pong, peer in Recv", note=f"{call}; median per pass")
        res.figure("round_trip_asleep", f"round trip to rank {_OWNER}: service asleep in the kernel (woken by a "
                                        f"ring)", "us", per_pass(trips["asleep"], reps),
                   ceiling=per_pass(trips["kernel_wake"], reps),
                   ceiling_what="UDP ping-pong to a process asleep in recv, same gap", target=idle.ASLEEP_TARGET_US,
                   of_ceiling=False, at_most=True, note=f"{len(trips['asleep'])} calls; median per pass")
        p99 = idle.BUSY_TARGET_P99_US
        res.figure("round_trip_busy_p99", f"round trip to rank {_OWNER}: rank busy in Python, calls "
                                          f"{trips['gap_ms']:.0f} ms apart (p99)", "us",
                   [latency_us(trips["busy"])["p99_us"]], ceiling=[latency_us(trips["bare_mpi"])["p99_us"]],
                   ceiling_what="bare MPI ping-pong, peer in Recv (p99)", target=p99, of_ceiling=False,
                   at_most=True,
                   note=f"p99 of all {len(trips['busy'])} calls (one figure: a p99 needs many calls)")
        self.values["idle_cpu"] = cpu
        self.values["wake_round_trip"] = {
            **{state: latency_us(trips[state]) for state in ("hot", "asleep", "busy", "kernel_wake", "bare_mpi")},
            "gap_ms": trips["gap_ms"], "peer_loops": trips["peer_loops"], "sleeps_of_peer": trips["sleeps_of_peer"]}

    # ------------------------------------------------------------------ 6. small remote gets
    def small_remote_gets(self) -> None:
        r, sizes = self.r, []
        with self._store("small", locality_aware=False) as st:
            for nbytes in small_remote.SIZES:
                contents = r.new_contents(nbytes, seed=25 + nbytes)
                ids = contents.new_ids(64)
                keys = [f"small-{nbytes}-{i}" for i in ids]
                rows = list(contents.fill_rows(ids, np.empty((len(ids), nbytes), np.uint8)))
                r.together(lambda: st.put_many(keys, rows) if self.rank == _OWNER else None,
                           f"small remote gets: rank {_OWNER} puts {format_size(nbytes)} blocks")
                rates = r.together(
                    lambda: small_remote.reads(st, keys, memory_offsets(st, keys, _OWNER), rows,
                                               self.s.small_batches) if self.rank == _READER else None,
                    f"small remote gets: {format_size(nbytes)} blocks")
                if self.rank == _READER:
                    label = f"{nbytes >> 10} KiB"  # small_remote.SIZES are whole KiB
                    self.res.figure(f"small_remote_get[{label}]",
                                    f"get_many of {len(keys)} blocks of {label} from rank {_OWNER}'s memory", "/s", rates["store"], ceiling=rates["bare"],
                                    ceiling_what="bare Get per block, one Lock_all epoch",
                                    target=small_remote.TARGET_RATIO,
                                    note=f"blocks per second, one sample per batch of {len(keys)}; "
                                         f"{self.s.small_batches} batches, locality_aware=False")
                    sizes.append({"block_size": nbytes, "batch": len(keys), "batches": self.s.small_batches})
        self.values["small_remote_get"] = sizes


def render_more(res: Result, console: Console) -> None:
    """The details beside the figures table: each rank's idle CPU, each round trip's single calls (p50, p99,
    max), and each store's open time (apart from every timed figure)."""
    mine = res.systems.get(SYSTEM)
    details = {} if mine is None else mine.values.get("details", {})
    if "idle_cpu" not in details:
        return
    cpu, trips = details["idle_cpu"], details["wake_round_trip"]
    table = Table(title=f"idle ranks and round trips to rank {_OWNER} (single calls)", show_lines=False)
    for col, just in (("measurement", "left"), ("median", "right"), ("p99", "right"), ("max", "right"),
                      ("calls", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_row(f"CPU of an idle rank, store open ({cpu['seconds']:g} s), per rank",
                  ", ".join(f"{p:.2f} %" for p in cpu["idle_pct"]), "", "", "")
    table.add_row("CPU of a rank in a blocking MPI_Recv, ranks 1..", ", ".join(f"{p:.0f} %" for p in
                                                                              cpu["blocking_recv_pct"]), "", "", "")
    for state, say in (("hot", "service hot (back to back)"), ("asleep", "service asleep in the kernel"),
                       ("busy", f"rank busy in Python, calls {trips['gap_ms']:.0f} ms apart "
                                f"({trips['peer_loops']} busy loops ran)"),
                       ("kernel_wake", "UDP ping-pong to a process asleep in recv"),
                       ("bare_mpi", "bare MPI ping-pong, peer in Recv")):
        f = trips[state]
        table.add_row(escape(say), f"{f['median_us']:,.1f} us", f"{f['p99_us']:,.1f} us", f"{f['max_us']:,.0f} us",
                      str(f["n"]))
    console.print(table)
    opened = res.settings.get("open_seconds", {})
    console.print("Store open (arena allocated and touched), apart from every timed figure, slowest rank: " +
                  ", ".join(f"{name} {sec:.2f} s" for name, sec in opened.items()))


__all__ = ["ClusterSizes", "latency_us", "per_pass", "render_more", "run_cluster"]
