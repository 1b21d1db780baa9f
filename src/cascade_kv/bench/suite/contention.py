"""``cascade bench contention``: the seed's "Real-Data Tiered Contention": every rank reads one shared hot
prefix plus its own unique blocks, with more data than memory.

Rank 0 writes P prefix blocks once (``is_prefix=True``); then every rank writes U unique blocks of its own.
Each system holds the same number of blocks in memory per rank, M (cascade-kv's host tier, LMCache's CPU pool;
Redis's ``maxmemory`` and Mooncake's segment are sized by their adapters to hold M blocks by each one's own
accounting, Mooncake's prefix blocks soft-pinned as its docs advise for shared prompts), and U = 2 M, so the
unique data alone is twice the memory of all ranks together. A pass is R = 2 requests per rank; a request
reads the whole prefix, then the next half of the rank's unique blocks: between two reads of the prefix a rank
reads M unique blocks, as much as its memory holds. P = 2 M / 3 makes the prefix 40 % of a request's reads,
the seed's top-tier hit rate. Plain LRU then flushes the prefix every request; cascade-kv's semantic eviction
keeps it in memory. Part of the reads (the prefix, and what memory still holds) come from the top tier, the
rest from disk.

The systems are open together (:meth:`~.core.Run.systems_open`): every one writes its blocks (measured once),
then they take each pass in turns, the order rotated every pass (:func:`~.core.turns`), so a noisy spell of the
machine lands on all of them and each system's read figure has one sample per pass to judge its spread by.
cascade-kv's variants (no dedup, no semantic eviction, no promotion) are systems of their own here, each a
store of its own beside the others.

Before every pass the page cache of every file a system keeps is dropped (fsync + ``POSIX_FADV_DONTNEED``):
memory is what each system holds itself, not the page cache, which on this machine would hold the whole
data set. Within a pass the page cache fills again (file systems' second prefix read hits it), as it does.

Memory-only systems (Redis, Mooncake, LMCache's CPU pool) cannot keep what does not fit: a read of a block
they evicted or refused is a miss, counted (a server would recompute it) and not in the throughput, which
counts bytes served. Every batch is one timed call (:meth:`~..peers.base.Backend.get_hits`), which says per
key what hit, whatever missed. A system whose blocks stay private to one process (LMCache's local backends) is
skipped on several ranks: they share the prefix. Figures per system: aggregate read throughput (bytes served
by all ranks over the slowest rank's time), reads served, prefix reads served from memory and hits per tier
where the system can tell, and the aggregate write throughput of the unique blocks, and the bytes read from
the storage device (page-cache hits do not count).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ..ceilings import Contents, drop_page_cache
from ..peers.base import Backend
from ...config import CascadeConfig
from .core import (
    GB,
    POISON,
    MiB,
    Result,
    Run,
    SystemResult,
    Target,
    buffers_for,
    device_read_bytes,
    turns,
)

DEFAULT_SYSTEMS = ("cascade-kv", "cascade-kv (no dedup)", "cascade-kv (no semantic eviction)",
                   "cascade-kv (no promotion)", "cascade-kv (replica threshold 1)", "posix", "hdf5", "redis", "mooncake", "lmcache-cpu", "lmcache-disk")
REQUESTS_PER_PASS = 2
BATCH = 4
MEMORY_TIERS = ("host", "remote")  # cascade-kv's tiers that are memory (its own, another rank's)
INTERLEAVED = ("The systems were open together and took each pass in turns (the order rotated every pass), so a "
               "noisy spell of the machine lands on all of them; every system wrote its blocks before the first "
               "pass. Each read figure's range is its passes' spread, which the verdicts are judged on.")


class Reads:
    """One rank's reads of one pass: time, bytes served, misses, and tier hits of the prefix reads."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.served = 0
        self.asked = 0
        self.bytes = 0
        self.prefix_asked = 0
        self.prefix_served = 0
        self.prefix_hits: dict[str, int] = {}

    def read(self, backend: Backend, keys: Sequence[str], ids: Sequence[int], contents: Contents,
             outs: Sequence[np.ndarray], may_miss: bool) -> int:
        """Read ``keys`` in batches, one call each, whatever missed (only the reads timed); check every block
        served; how many were served. A miss is counted when ``may_miss``, else it fails the run."""
        served = 0
        for lo in range(0, len(keys), BATCH):
            chunk = range(lo, min(lo + BATCH, len(keys)))
            bufs = [outs[j % len(outs)] for j in chunk]
            for b in bufs:
                b.fill(POISON)
            t0 = time.perf_counter()
            hit = backend.get_hits([keys[j] for j in chunk], bufs)
            self.seconds += time.perf_counter() - t0
            if not may_miss and not all(hit):
                raise KeyError(f"{backend.name} lost {keys[chunk[hit.index(False)]]!r}, which it keeps on disk")
            for j, b, h in zip(chunk, bufs, hit):
                if h:
                    contents.check(ids[j], b)
            served += sum(hit)
        self.asked += len(keys)
        self.served += served
        self.bytes += served * contents.nbytes
        return served


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {t: after[t] - before.get(t, 0) for t in after}


def _sum(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for t, n in d.items():
            out[t] = out.get(t, 0) + n
    return out


def run(r: Run) -> Result:
    block = r.options.get("block") or (1 * MiB if r.quick else 4 * MiB)
    memory_blocks = 16 if r.quick else 64
    prefix_count = 2 * memory_blocks // 3  # 40 % of a request's reads: the seed's top-tier hit rate
    unique_count = 2 * memory_blocks
    passes = 2 if r.quick else 3
    memory = memory_blocks * block
    unique_bytes = (prefix_count + r.size * unique_count) * block
    res = Result("contention", f"tiered contention: {r.size} rank(s) read a shared prefix of {prefix_count} blocks and "
                               f"{unique_count} unique blocks each ({block / MiB:g} MiB blocks); data "
                               f"{unique_bytes / MiB:.0f} MiB > memory {r.size * memory / MiB:.0f} MiB", r.size,
                 settings={"block_size": block, "prefix_blocks": prefix_count, "unique_blocks_per_rank": unique_count,
                           "memory_per_rank": memory, "memory_all_ranks": r.size * memory,
                           "distinct_data_bytes": unique_bytes, "passes": passes,
                           "requests_per_pass": REQUESTS_PER_PASS,
                           "request": f"the {prefix_count} prefix blocks, then the next {unique_count // 2} of the "
                                      f"rank's unique blocks",
                           "before_each_pass": "every system's files: fsync + POSIX_FADV_DONTNEED",
                           "order": "systems open together, writes first, each pass taken in turns, rotated every "
                                    "pass"})
    res.columns = [("read_GBps", "aggregate read"), ("served_pct", "reads served"),
                   ("prefix_memory_pct", "prefix reads from memory"), ("tier_hits", "hits per tier (all passes)"),
                   ("device_MiB", "MiB from the device / pass (all ranks)"),
                   ("write_GBps", "aggregate write (unique blocks)")]
    contents_seed = 71
    prefix_ids = list(range(prefix_count))
    prefix_keys = [f"prefix-{i}" for i in prefix_ids]
    mine_ids = [prefix_count + r.rank * unique_count + j for j in range(unique_count)]
    mine_keys = [f"unique-{r.rank}-{j}" for j in range(unique_count)]
    half = unique_count // REQUESTS_PER_PASS
    outs = buffers_for(BATCH, block)
    with r.systems_open(res, memory, block) as open_:
        contents = {name: r.new_contents(block, seed=contents_seed) for name in open_}
        may_miss = {name: backend.tier in ("memory", "remote memory") for name, backend in open_.items()}
        # the writes are measured once per system: every system writes before any system's first pass
        for name, backend in list(open_.items()):
            r.step(res, open_, name, lambda: r.put_blocks(backend, prefix_keys, prefix_ids, contents[name],
                                                          prefix=[True] * prefix_count) if r.rank == 0 else None,
                   "rank 0 writes the prefix")
            wrote = r.step(res, open_, name, lambda: r.put_blocks(backend, mine_keys, mine_ids, contents[name],
                                                                  batch=BATCH),
                           "every rank writes its unique blocks")
            if wrote is not None:
                res.systems[name].measure("write_GBps", "GB/s").samples.append(
                    r.size * unique_count * block / max(r.allgather(wrote)) / GB)
        hits_before = {name: backend.tier_hits() for name, backend in open_.items()}
        prefix_hits: dict[str, list[dict[str, int]]] = {name: [] for name in open_}
        misses = dict.fromkeys(open_, 0)
        for p in range(passes):
            for name in turns(list(open_), p):
                if name not in open_:  # failed earlier in this pass
                    continue
                backend, mine = open_[name], res.systems[name]
                r.step(res, open_, name, lambda: drop_page_cache(backend.files()), f"drop the page cache {p + 1}")

                def one_pass() -> Reads:
                    reads = Reads()
                    for q in range(REQUESTS_PER_PASS):
                        before = backend.tier_hits()
                        reads.prefix_served += reads.read(backend, prefix_keys, prefix_ids, contents[name], outs,
                                                          may_miss[name])
                        reads.prefix_asked += prefix_count
                        reads.prefix_hits = _sum([reads.prefix_hits, _delta(backend.tier_hits(), before)])
                        part = slice(q * half, (q + 1) * half)
                        reads.read(backend, mine_keys[part], mine_ids[part], contents[name], outs, may_miss[name])
                    return reads

                io_before = device_read_bytes()
                reads = r.step(res, open_, name, one_pass, f"pass {p + 1}/{passes}")
                if reads is None:  # the system failed (recorded): out of the turns from now on
                    continue
                io_after = device_read_bytes()
                if io_before is not None and io_after is not None:
                    mine.values.setdefault("device_MiB", []).append(round(sum(r.allgather(io_after - io_before)) / MiB))
                misses[name] += _record_pass(r, mine, reads, may_miss[name], prefix_hits[name])
        for name, backend in open_.items():
            mine = res.systems[name]
            _record_hits(r, backend, mine, hits_before[name], prefix_hits[name])
            mine.values["misses"] = misses[name]
            rejected = getattr(backend, "rejected_puts", None)  # Mooncake's: puts it had no room for
            if rejected is not None:  # the same on every rank (one system), so every rank gathers
                mine.values["rejected_puts"] = sum(r.allgather(rejected))
    res.notes.append(INTERLEAVED)
    res.targets = [Target("cascade-kv", "prefix_memory_pct", 100.0, "",
                          "prefix reads served from memory: all of them (semantic eviction)"),
                   Target("cascade-kv", "read_GBps", 1.0, "cascade-kv (no semantic eviction)",
                          ">= 1x itself with plain LRU eviction")]
    _notes(res)
    return res


def _record_pass(r: Run, mine: SystemResult, reads: Reads, may_miss: bool,
                 prefix_hits: list[dict[str, int]]) -> int:
    """One pass of one system, every rank's reads together: its samples (one per pass: the spread the verdicts
    are judged on), its prefix reads' tier hits appended to ``prefix_hits``; the reads it missed."""
    every = r.allgather((reads.seconds, reads.bytes, reads.asked, reads.served, reads.prefix_asked,
                         reads.prefix_served, reads.prefix_hits))
    asked, served = sum(e[2] for e in every), sum(e[3] for e in every)
    mine.measure("read_GBps", "GB/s").samples.append(sum(e[1] for e in every) / max(e[0] for e in every) / GB)
    mine.measure("served_pct", "%").samples.append(100.0 * served / asked)
    hits = _sum([e[6] for e in every])
    if hits:
        prefix_hits.append(hits)
        memory_hits = sum(n for t, n in hits.items() if t in MEMORY_TIERS)
        mine.measure("prefix_memory_pct", "%").samples.append(100.0 * memory_hits / sum(hits.values()))
    elif may_miss:  # a memory-only system serves every prefix read it does not miss from memory
        mine.measure("prefix_memory_pct", "%").samples.append(
            100.0 * sum(e[5] for e in every) / sum(e[4] for e in every))
    else:
        mine.values["prefix_memory_pct"] = "cannot tell (page cache)"
    return asked - served


def _record_hits(r: Run, backend: Backend, mine: SystemResult, before: dict[str, int],
                 prefix_hits: list[dict[str, int]]) -> None:
    """Every rank's tier hits over the passes, summed, where the system counts them."""
    after = backend.tier_hits()
    if not after:
        return
    mine.values["tier_hits"] = _sum(r.allgather(_delta(after, before)))
    mine.values["prefix_tier_hits"] = _sum(prefix_hits)


def _notes(res: Result) -> None:
    cascade = res.systems.get("cascade-kv")
    if cascade is None or "read_GBps" not in cascade.measures:
        return
    base = cascade.measures["read_GBps"].median
    ratios = [f"{n} {base / s.measures['read_GBps'].median:.2f}x" for n, s in res.systems.items()
              if n != "cascade-kv" and "read_GBps" in s.measures and s.measures["read_GBps"].median > 0]
    if ratios:
        res.notes.append("cascade-kv's aggregate read against each system's: " + ", ".join(ratios) +
                         " (the seed reports 5.4x HDF5 at 8 nodes, on Lustre).")
    plain = res.systems.get("cascade-kv (no promotion)")
    if plain is not None and "tier_hits" in cascade.values and cascade.values["tier_hits"] == plain.values.get("tier_hits"):
        res.notes.append("cascade-kv and cascade-kv (no promotion) served the same reads from the same tiers: no "
                         "local replica changed where a read was served from (a rank keeps one after "
                         f"replica_threshold = {CascadeConfig().replica_threshold} read(s) of a block from peers, "
                         "in memory no protected block holds).")
    res.notes.append("cascade-kv (no dedup) has nothing to merge here (the prefix is written once, unique blocks "
                     "differ): it is run to show dedup costs nothing on this workload. Misses are reads of blocks "
                     "a memory-only system evicted or refused; they count as reads asked, not served.")
