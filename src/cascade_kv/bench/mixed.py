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
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from ..config import format_size
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


def run_mixed(bench: Bench) -> dict[str, Any]:
    """Run the workload through a store of ``bench``'s; its figures (the store's counts, the reads' times)."""
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
    return {
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
        "promotions": stats.promotions, "promotion_threshold": threshold, "demotions": stats.demotions,
        "drops": stats.drops,
        "misses": stats.misses, "integrity_errors": stats.integrity_errors,
        "ceilings_gbps": ceilings,
    }


def mixed_table(m: dict[str, Any]) -> Table:
    """The figures of :func:`run_mixed`, one row each with what it counts."""
    bs = m["block_size"]
    t = Table(title=f"mixed workload: {m['requests']} requests x ({m['prefix_blocks']} shared prefix + "
                    f"{m['unique_per_request']} unique blocks of {format_size(bs)}); {format_size(m['stored_bytes'])} "
                    f"stored, host tier {format_size(m['host_capacity'])}, default config")
    for col, just in (("figure", "left"), ("value", "right"), ("detail", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    t.add_row("put throughput", f"{m['put_gbps']:.2f} GB/s",
              f"{format_size(m['put_bytes'])} put with put_many (dedup hits included), {m['put_seconds']:.2f} s")
    rq = m["request_ms"]
    t.add_row("get throughput", f"{m['get_gbps']:.2f} GB/s",
              f"{m['reads']} gets in {rq['n']} requests of one get_many each ({m['read_rounds']} rounds over the "
              f"requests), one after another, nothing settled between them; {m['get_seconds']:.2f} s in all")
    t.add_row("  time per request", f"{rq['median']:.1f} ms", f"median; range {rq['min']:.1f} - {rq['max']:.1f} ms")
    t.add_row("  against the ceilings", f"{m['ratio']:.2f}x",
              f"the same reads at the ceilings take {m['ceiling_seconds']:.2f} s: "
              + ", ".join(f"{m['reads_by_tier'].get(tier, 0)} served by {tier} at {gbps:.2f} GB/s"
                          for tier, gbps in m["ceilings_gbps"].items())
              + " (the copy ceiling, and the warm-page-cache read ceiling)")
    t.add_row("  CPU beside the clock", f"{m['promoter_cpu_seconds']:.2f} s",
              f"the promoter thread's CPU time over the read phase (the reader's own: "
              f"{m['reader_cpu_seconds']:.2f} s); {m['disk_reads_hashed']} disk reads hashed (verify=auto: first "
              "read of a file)")
    t.add_row("hits per tier", ", ".join(f"{k} {v}" for k, v in m["hits_by_tier"].items()),
              "evictions: " + ", ".join(f"{k} {v}" for k, v in m["evictions_by_tier"].items()))
    t.add_row("dedup hits", str(m["dedup_hits"]), f"{format_size(m['dedup_bytes_saved'])} not stored again")
    t.add_row("prefix retention", f"{m['prefix_retention']:.0%}",
              f"{m['protected_in_memory']} of {m['protected_blocks']} prefix blocks in memory at the end")
    t.add_row("promotions", str(m["promotions"]), f"disk -> host, after {m['promotion_threshold']} reads from disk")
    t.add_row("demotions", str(m["demotions"]), "host -> disk, to make room")
    t.add_row("drops", str(m["drops"]), "blocks lost because the last tier was full")
    return t
