"""The mixed workload: requests that share prefix blocks, more data than the host tier holds.

Each request puts the shared prefix blocks (``is_prefix=True``) under keys of its
own, plus a few unique blocks: the first request stores the prefix, every later
one is a dedup hit. The unique blocks add up to twice the host tier, so the
oldest are demoted to disk. Then a reader goes over the requests in random order,
``read_rounds`` times, loading each request's blocks with one ``get_many``: each
prefix block is read once per request per round (many times), each unique block
once per round (a few times; enough for blocks read from disk to be promoted).
Every read is checked against what was put, after its request's clock stopped.

The clock sees what a caller sees: requests come one after the other, and nothing
waits for the store's background work between them (an untimed ``info()`` before
each get, which settles promotions, was rejected: it moved the promoter's work out
of the clock). What that work costs is reported beside the figure instead: the
promoter thread's CPU time over the read phase.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from .ceilings import buffers, timed

if TYPE_CHECKING:
    from .single import Bench

PROMOTER_THREAD = "cascade-kv-promoter"
"""The name the store gives its promotion thread (:mod:`cascade_kv.promoter`)."""


class ThreadCPU:
    """CPU seconds used by the threads of one name, sampled between requests (a thread that exits keeps what it
    had at its last sample: the promoter exits only after seconds idle, so it uses none after that)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._seen: dict[threading.Thread, float] = {}  # held: a dead thread's ident is not mistaken for a new one

    def sample(self) -> None:
        for t in threading.enumerate():
            if t.name == self.name and t.ident is not None:
                try:
                    self._seen[t] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
                except OSError:  # exited since enumerate(): its last sample stands
                    pass

    @property
    def seconds(self) -> float:
        return sum(self._seen.values())


def run_mixed(bench: Bench) -> None:
    s, c = bench.s, bench.big
    nprefix, nunique, nreq, bs = s.prefix_blocks, s.unique_per_request, s.requests, s.block
    prefix_ids = c.new_ids(nprefix)
    prefix = buffers(nprefix, bs)
    for i, b in zip(prefix_ids, prefix):
        c.fill(i, b)
    unique = [c.new_ids(nunique) for _ in range(nreq)]
    request = buffers(nunique, bs)
    # two requests' worth, used in turns: a get that copied nothing would leave the other request's bytes
    outs = [buffers(nprefix + nunique, bs) for _ in range(2)]
    keys = [[f"r{r}/prefix/{j}" for j in range(nprefix)] + [f"r{r}/unique/{j}" for j in range(nunique)]
            for r in range(nreq)]
    flags = [True] * nprefix + [False] * nunique
    latencies: list[float] = []
    promoter = ThreadCPU(PROMOTER_THREAD)
    with bench._store("mixed") as st:
        put_seconds = 0.0
        for r in range(nreq):
            bench.tick(f"mixed workload: put request {r + 1}/{nreq}")
            for i, b in zip(unique[r], request):
                c.fill(i, b)
            put_seconds += timed(st.put_many, keys[r], prefix + request, is_prefix=flags)
        before = st.stats()  # settles nothing: puts queue no promotion
        rng = np.random.default_rng(3)
        reader_cpu = 0.0
        for rnd in range(s.read_rounds):
            bench.tick(f"mixed workload: read round {rnd + 1}/{s.read_rounds}")
            for r in rng.permutation(nreq):
                out = outs[len(latencies) % 2]
                cpu0 = time.thread_time()
                latencies.append(timed(st.get_many, keys[r], out))
                reader_cpu += time.thread_time() - cpu0
                promoter.sample()
                for i, o in zip(list(prefix_ids) + list(unique[r]), out):
                    c.check(i, o)
        promoter.sample()
        stats = st.stats()  # after the clock: this one waits for the promotions still queued
        threshold = st.config.promotion_threshold
        hashed = st.tiers[1].hashed_reads  # type: ignore[attr-defined]
    logical = nreq * (nprefix + nunique) * bs
    reads = {t.name: t.hits - b.hits for t, b in zip(stats.tiers, before.tiers)}
    get_seconds = sum(latencies)
    ceilings = {"host": bench.copy_ceiling.median, "disk": bench.readinto_ceiling.median}
    # the same bytes at the ceilings: those served from memory copied, those from disk read from a warm page cache
    ceiling_seconds = sum(reads.get(t, 0) * bs / (gbps * 1e9) for t, gbps in ceilings.items() if gbps)
    bench.report.mixed = {
        "requests": nreq, "prefix_blocks": nprefix, "unique_per_request": nunique, "block_size": bs,
        "host_capacity": s.host_capacity, "read_rounds": s.read_rounds,
        "stored_bytes": stats.unique_bytes, "logical_bytes": stats.logical_bytes,
        "put_bytes": logical, "put_seconds": put_seconds, "put_gbps": logical / put_seconds / 1e9,
        "reads": sum(reads.values()), "read_bytes": sum(reads.values()) * bs, "get_seconds": get_seconds,
        "get_gbps": sum(reads.values()) * bs / get_seconds / 1e9,
        "request_ms": {"median": statistics.median(latencies) * 1e3, "min": min(latencies) * 1e3,
                       "max": max(latencies) * 1e3, "n": len(latencies)},
        "reader_cpu_seconds": reader_cpu, "promoter_cpu_seconds": promoter.seconds,
        "ceiling_seconds": ceiling_seconds, "ratio": ceiling_seconds / get_seconds,
        "reads_by_tier": reads, "disk_reads_hashed": hashed,
        "hits_by_tier": {t.name: t.hits for t in stats.tiers},
        "evictions_by_tier": {t.name: t.evictions for t in stats.tiers},
        "dedup_hits": stats.dedup_hits, "dedup_bytes_saved": stats.dedup_bytes_saved,
        "protected_blocks": stats.protected_blocks, "protected_in_memory": stats.protected_in_memory,
        "prefix_retention": stats.protected_in_memory / max(1, stats.protected_blocks),
        "promotions": stats.promotions, "promotion_threshold": threshold, "demotions": stats.demotions, "drops": stats.drops,
        "misses": stats.misses, "integrity_errors": stats.integrity_errors,
        "ceilings_gbps": ceilings,
    }
