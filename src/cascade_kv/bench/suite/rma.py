"""``cascade bench rma``: reads from another process's memory, and the remote tier against bare MPI.

(a) The remote-tier micro-benchmark (2 ranks or more). Rank 1 stores blocks of 4 KiB, 1 MiB and 16 MiB in
cascade-kv; rank 0 reads them with a ``get`` (the distributed store with promotion off, so no local replica
is made and every get reads rank 1's memory one-sidedly), taking turns read by read with a bare mpi4py
``Get`` of the same bytes out of the same window into the same buffers (:mod:`cascade_kv.bench.remote_get`,
which the main job's remote get uses too): a burst of load from a neighbour then lands on both alike. A
second ceiling streams the same sizes with ``Send``/``Recv`` from rank 1 to rank 0 (rates per pass of
back-to-back messages). Both are measured in
the same run, and cascade-kv's figures are printed as ratios to them.

(b) Reads from another process's memory, every system holding the same blocks, every read checked:
cascade-kv's remote tier (rank 1 puts, rank 0 gets; 2 ranks or more), Mooncake with its memory in a second
process, LMCache through ``lmcache_server``, and Redis (each of those three is another process already, so
rank 0 puts and reads). And local reads, the data in the reading process's own memory: cascade-kv (rank 0
puts and reads its own blocks), Mooncake's ``get_into`` from its own segment, LMCache's CPU tier. The issue's
targets: cascade-kv's remote reads at least 3x the best of the others', its local reads at least equal to
each local peer's.

Transports differ: on one node Open MPI moves cascade-kv's one-sided reads through shared memory, while
Mooncake and LMCache reach their other process over loopback TCP (Redis over a Unix socket). So cascade-kv
is measured twice: ``cascade-kv`` (Open MPI's default) and its twin ``cascade-kv (TCP)``, the same
measurements in a second job with Open MPI forced onto TCP (:mod:`.rma_tcp`), each row naming its
transport; every cascade-kv target is stated for both, and the notes put each figure beside its twin's.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..ceilings import Contents
from ..remote_get import get_vs_bare
from . import rma_tcp
from .core import (
    GB,
    POISON,
    Measure,
    MiB,
    Result,
    Run,
    SystemResult,
    Target,
    buffers_for,
)

DEFAULT_SYSTEMS = ("cascade-kv", rma_tcp.TWIN, "mooncake-remote", "lmcache-remote", "redis", "mooncake",
                   "lmcache-cpu")
VARIANTS = {rma_tcp.TWIN: "cascade-kv's rows measured again with Open MPI forced onto TCP (a second job)"}
"""Rows of this experiment that are not registry systems."""
REMOTE_PEERS = ("mooncake-remote", "lmcache-remote", "redis")
"""Systems that hold the data in another process: rank 0 puts and reads."""
LOCAL_PEERS = ("mooncake", "lmcache-cpu")
"""Systems that hold the data in the reading process."""
CASCADE_REMOTE = "cascade-kv (no promotion)"
"""The registry entry opened for cascade-kv here: with promotion on, a block read three times from rank 1
would get a replica on rank 0, and the figure would no longer be a remote read."""
SIZES = ((4 << 10, "4 KiB"), (1 * MiB, "1 MiB"), (16 * MiB, "16 MiB"))
READER, OWNER = 0, 1
BATCH = 4
_TAG = 0x5E


class Sizes:
    """How much each part moves (``quick``: a few seconds in all)."""

    def __init__(self, quick: bool, block: int | None) -> None:
        self.block = block or (1 * MiB if quick else 16 * MiB)
        """(b): the block size of every system's reads."""
        self.blocks = 8
        """(b): blocks per system (16 MiB: 128 MiB, four times this machine's 32 MiB L3)."""
        self.passes = 3 if quick else 5
        self.working_set = 4 * MiB if quick else 64 * MiB
        """(a): bytes of distinct blocks per size (the full run: twice the L3, so no read comes from cache)."""
        self.bytes_per_rep = 16 * MiB if quick else 256 * MiB
        self.max_reads = 200 if quick else 2000
        """(a): reads per rep and kind at most (4 KiB reads are latency-bound: 2000 tell the median)."""
        self.reps = 2 if quick else 5

    def micro_blocks(self, n: int) -> int:
        return max(2, min(64, self.working_set // n))

    def micro_reads(self, n: int) -> int:
        count = min(self.max_reads, max(2 * self.micro_blocks(n), self.bytes_per_rep // n))
        return count + count % 2  # even: both kinds read every block as often

    def cascade_memory(self) -> int:
        """Per rank: rank 1 holds every micro size's blocks and (b)'s remote blocks; rank 0 (b)'s local ones."""
        micro = sum(self.micro_blocks(n) * n for n, _ in SIZES)
        return int(1.25 * (micro + self.blocks * self.block)) + 32 * MiB


def run(r: Run) -> Result:
    s = Sizes(r.quick, r.options.get("block"))
    res = Result("rma", f"reads from another process's memory ({s.block / MiB:g} MiB blocks), and cascade-kv's "
                        f"remote tier against bare MPI Get and Send/Recv", r.size,
                 settings={"block_size": s.block, "blocks": s.blocks, "passes": s.passes,
                           "micro_sizes": [n for n, _ in SIZES], "micro_working_set": s.working_set,
                           "micro_reps": s.reps, "reader_rank": READER, "owner_rank": OWNER,
                           "cascade_kv": "promotion off (locality_aware=False): remote reads stay remote"})
    res.columns = [("remote_GBps", "read from another process's memory"), ("local_GBps", "read from own memory"),
                   *[(f"rma_GBps[{label}]", f"remote get {label}") for _, label in SIZES]]
    for name in r.systems:
        if name == "cascade-kv":
            cascade_rows(r, res, s)
        elif name == rma_tcp.TWIN:
            rma_tcp.measure(r, res, r.options.get("block"))
        elif name in REMOTE_PEERS or name in LOCAL_PEERS:
            _peer(r, res, s, name, "remote_GBps" if name in REMOTE_PEERS else "local_GBps")
        elif name.startswith("cascade-kv"):
            res.skipped[name] = ("a variant: rma reads stored blocks, which dedup and eviction do not touch, and "
                                 "runs cascade-kv with promotion off already")
        else:
            res.skipped[name] = ("not in this experiment: it compares reads from memory (cascade-kv, "
                                 f"{', '.join(REMOTE_PEERS + LOCAL_PEERS)})")
    _targets(r, res)
    return res


# ---------------------------------------------------------------------- (b) every system
def _peer(r: Run, res: Result, s: Sizes, name: str, key: str) -> None:
    """Rank 0 puts the blocks and reads them back, ``passes`` times after a warm-up; the other ranks wait."""
    # shared=False: only rank 0 reads, and only what it wrote (LMCache's CPU tier keeps blocks per process)
    with r.system(name, res, 2 * s.blocks * s.block + 64 * MiB, s.block, shared=False) as backend:
        if backend is None:
            return
        contents = r.new_contents(s.block, seed=91)
        ids = list(range(s.blocks))
        keys = [f"rma-{name}-{i}" for i in ids]
        r.together(lambda: r.put_blocks(backend, keys, ids, contents) if r.rank == READER else None,
                   f"{name}: rank {READER} puts")
        rates = r.together(lambda: _passes(r, backend, keys, ids, contents, s) if r.rank == READER else None,
                           f"{name}: rank {READER} reads")
        res.systems[name].measure(key, "GB/s").samples.extend(r.allgather(rates)[READER])


def _passes(r: Run, backend: Any, keys: list[str], ids: list[int], contents: Contents, s: Sizes) -> list[float]:
    """GB/s of each pass over every block after one warm-up pass (which registers Mooncake's buffers)."""
    outs = buffers_for(BATCH, s.block)
    rates = []
    for p in range(s.passes + 1):
        took = r.get_blocks(backend, keys, ids, contents, outs, batch=BATCH)
        if p:
            rates.append(len(keys) * s.block / took / GB)
    return rates


# ---------------------------------------------------------------------- cascade-kv
def cascade_rows(r: Run, res: Result, s: Sizes) -> None:
    """cascade-kv's figures, (a) and (b), under the row ``cascade-kv`` of ``res``."""
    scratch = Result("rma", res.title, r.size)  # opened under its registry name, reported as "cascade-kv"
    with r.system(CASCADE_REMOTE, scratch, s.cascade_memory(), s.block) as backend:
        if backend is not None:
            mine = scratch.systems[CASCADE_REMOTE]
            if r.size >= 2:
                for seed, (n, label) in enumerate(SIZES):
                    _micro(r, res, mine, backend, n, label, seed, s)
                mine.measure("remote_GBps", "GB/s").samples.extend(_cascade_reads(r, backend, s, OWNER, seed=92))
            else:
                res.notes.append("cascade-kv's remote tier needs 2 ranks (rank 1 holds, rank 0 reads): run with "
                                 "--ranks 2 for (a) and for its remote reads in (b).")
            mine.measure("local_GBps", "GB/s").samples.extend(_cascade_reads(r, backend, s, READER, seed=93))
    for part in ("systems", "skipped", "failed"):
        got = getattr(scratch, part)
        if CASCADE_REMOTE in got:
            getattr(res, part)["cascade-kv"] = got.pop(CASCADE_REMOTE)
    if "cascade-kv" in res.systems:
        res.systems["cascade-kv"].name = "cascade-kv"
        res.systems["cascade-kv"].values["promotion"] = "off"
        res.systems["cascade-kv"].values["transport"] = rma_tcp.transport()


def _cascade_reads(r: Run, backend: Any, s: Sizes, owner: int, seed: int) -> list[float]:
    """``owner`` puts the blocks, rank 0 reads them; GB/s per pass. The tier counters must show every read
    where it should come from (``remote`` when another rank holds the blocks, ``host`` when rank 0 does)."""
    where = "remote" if owner != READER else "host"
    contents = r.new_contents(s.block, seed=seed)
    ids = list(range(s.blocks))
    keys = [f"rma-{where}-{i}" for i in ids]
    r.together(lambda: r.put_blocks(backend, keys, ids, contents) if r.rank == owner else None,
               f"cascade-kv: rank {owner} puts")

    def reads() -> list[float]:
        before = backend.tier_hits().get(where, 0)
        rates = _passes(r, backend, keys, ids, contents, s)
        hits = backend.tier_hits().get(where, 0) - before
        if hits != (s.passes + 1) * len(keys):
            raise RuntimeError(f"cascade-kv: {(s.passes + 1) * len(keys)} reads, but its counters show {hits} "
                               f"{where} hits: the blocks were not where this part measures them")
        return rates

    rates = r.together(lambda: reads() if r.rank == READER else None, f"cascade-kv: rank {READER} reads ({where})")
    return r.allgather(rates)[READER]


# ---------------------------------------------------------------------- (a) the micro-benchmark
def _micro(r: Run, res: Result, mine: SystemResult, backend: Any, n: int, label: str, seed: int, s: Sizes) -> None:
    """One size: rank 1 puts the blocks; rank 0 reads them with get and bare Get in turn; then rank 1 sends
    the same sizes to rank 0 with Send/Recv."""
    store = backend.store
    contents = r.new_contents(n, seed=101 + seed)
    ids = list(range(s.micro_blocks(n)))
    keys = [f"micro-{n}-{i}" for i in ids]
    r.together(lambda: r.put_blocks(backend, keys, ids, contents) if r.rank == OWNER else None,
               f"rma {label}: rank {OWNER} puts")
    rates = r.together(lambda: _get_vs_bare(store, backend, keys, ids, contents, n, s) if r.rank == READER else None,
                       f"rma {label}: get and bare Get")
    rates = r.allgather(rates)[READER]
    stream = r.together(lambda: _send_recv(r, contents, ids, n, s), f"rma {label}: Send/Recv")
    mine.measure(f"rma_GBps[{label}]", "GB/s").samples.extend(rates["store"])
    res.ceilings[f"bare Get {label}"] = Measure("GB/s", rates["bare_get"])
    res.ceilings[f"Send/Recv {label}"] = Measure("GB/s", r.allgather(stream)[READER])


def _get_vs_bare(store: Any, backend: Any, keys: list[str], ids: list[int], contents: Contents, n: int,
                 s: Sizes) -> dict[str, list[float]]:
    """Rank 0's side: a get and a bare Get in turns (:func:`~..remote_get.get_vs_bare`); one rate per read."""
    outs = buffers_for(len(keys), n)

    def get(j: int) -> None:
        backend.get_many([keys[j]], [outs[j]])

    return get_vs_bare(store, get, keys, ids, outs, contents, owner=OWNER, count=s.micro_reads(n), reps=s.reps)


def _send_recv(r: Run, contents: Contents, ids: list[int], n: int, s: Sizes) -> list[float] | None:
    """Rank 1 streams ``micro_reads`` messages of ``n`` bytes (the blocks in turn) to rank 0, which receives
    them into as many buffers; GB/s per rep from rank 0's go message to its last Recv. Every buffer's last
    message is checked after each rep. Other ranks do nothing."""
    if r.rank not in (READER, OWNER):
        return None
    from mpi4py import MPI

    comm = r.comm
    count = s.micro_reads(n)
    bufs = buffers_for(len(ids), n)
    if r.rank == OWNER:
        for j, b in zip(ids, bufs):
            contents.fill(j, b)
    go = np.zeros(1, np.uint8)
    rates = []
    for rep in range(s.reps + 1):
        if r.rank == OWNER:
            comm.Recv([go, MPI.BYTE], source=READER, tag=_TAG)
            for k in range(count):
                comm.Send([bufs[k % len(bufs)], MPI.BYTE], dest=READER, tag=_TAG)
            continue
        for b in bufs:
            b.fill(POISON)
        t0 = time.perf_counter()
        comm.Send([go, MPI.BYTE], dest=OWNER, tag=_TAG)
        for k in range(count):
            comm.Recv([bufs[k % len(bufs)], MPI.BYTE], source=OWNER, tag=_TAG)
        dt = time.perf_counter() - t0
        for j, b in zip(ids, bufs):
            contents.check(j, b)
        if rep:
            rates.append(count * n / dt / GB)
    return rates if r.rank == READER else None


# ---------------------------------------------------------------------- targets
def _targets(r: Run, res: Result) -> None:
    """Every cascade-kv target, for ``cascade-kv`` and for its twin over TCP (each against the ceilings of its
    own transport), and a note per figure beside its twin's."""
    others = {n: res.systems[n].measures["remote_GBps"].median for n in REMOTE_PEERS
              if n in res.systems and "remote_GBps" in res.systems[n].measures}
    best = max(others, key=others.__getitem__) if others else REMOTE_PEERS[0]
    res.targets = []
    for row, suffix in (("cascade-kv", ""), (rma_tcp.TWIN, rma_tcp.SUFFIX)):
        over = suffix  # " (TCP)" in the twin's target texts
        res.targets += [
            Target(row, "remote_GBps", 3.0, best,
                   f"reads from another process's memory{over} >= 3x the best of the others ({best})"),
            Target(row, "local_GBps", 1.0, "mooncake", f"local reads{over} >= Mooncake's get_into"),
            Target(row, "local_GBps", 1.0, "lmcache-cpu", f"local reads{over} >= LMCache's CPU tier"),
        ]
        cascade = res.systems.get(row)
        if cascade is None:
            continue
        for _, label in SIZES:
            key = f"rma_GBps[{label}]"
            if key not in cascade.measures or f"bare Get {label}{suffix}" not in res.ceilings:
                continue
            if label == SIZES[-1][1]:  # small reads are a directory round trip more than a bare Get: no target there
                res.targets.append(Target(row, key, 0.8, f"bare Get {label}{suffix}",
                                          f"remote get {label}{over} >= 0.8x a bare MPI Get over the same "
                                          f"transport (the main job's target)"))
            value = cascade.measures[key].median
            get = res.ceilings[f"bare Get {label}{suffix}"].median
            stream = res.ceilings[f"Send/Recv {label}{suffix}"].median
            res.notes.append(f"{row}: remote get {label}: {value:.2f} GB/s ({_us(value, label)}), "
                             f"{value / get:.2f}x bare Get ({get:.2f} GB/s), {value / stream:.2f}x Send/Recv "
                             f"({stream:.2f} GB/s)")
        if "remote_GBps" in cascade.measures and others:
            value = cascade.measures["remote_GBps"].median
            res.notes.append(f"{row} remote reads against each: " +
                             ", ".join(f"{n} {value / v:.2f}x" for n, v in others.items()))
    res.notes.extend(_twin_notes(res))


def _twin_notes(res: Result) -> list[str]:
    """Each cascade-kv figure beside its twin's over TCP."""
    shm, tcp = res.systems.get("cascade-kv"), res.systems.get(rma_tcp.TWIN)
    if shm is None or tcp is None:
        return []
    pairs = [f"{key} {shm.measures[key].median:.2f} vs {tcp.measures[key].median:.2f} GB/s"
             for key in shm.measures if key in tcp.measures]
    return [f"cascade-kv over {shm.values.get('transport', '?')} against its twin over "
            f"{tcp.values.get('transport', '?')}: " + ", ".join(pairs)] if pairs else []


def _us(rate_gbps: float, label: str) -> str:
    n = {lbl: size for size, lbl in SIZES}[label]
    return f"{n / (rate_gbps * GB) * 1e6:,.1f} us per read"
