"""The mixed workload: requests that share prefix blocks, more data than the host tier holds.

Each request puts the shared prefix blocks (``is_prefix=True``) under keys of its
own, plus a few unique blocks: the first request stores the prefix, every later
one is a dedup hit. The unique blocks add up to twice the host tier, so the
oldest are demoted to disk. Then readers go over the requests in random order,
``read_rounds`` times: each prefix block is read once per request per round
(many times), each unique block once per round (a few times; enough for blocks
read from disk to be promoted). Every read is checked against what was put.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .ceilings import buffers, timed

if TYPE_CHECKING:
    from .single import Bench


def run_mixed(bench: Bench) -> None:
    s, c = bench.s, bench.big
    nprefix, nunique, nreq, bs = s.prefix_blocks, s.unique_per_request, s.requests, s.block
    prefix_ids = c.new_ids(nprefix)
    prefix = buffers(nprefix, bs)
    for i, b in zip(prefix_ids, prefix):
        c.fill(i, b)
    unique = [c.new_ids(nunique) for _ in range(nreq)]
    request = buffers(nunique, bs)
    # a ring longer than one request: a get that copied nothing would leave another block's bytes
    outs = buffers(nprefix + nunique + 1, bs)
    keys = [[f"r{r}/prefix/{j}" for j in range(nprefix)] + [f"r{r}/unique/{j}" for j in range(nunique)]
            for r in range(nreq)]
    flags = [True] * nprefix + [False] * nunique
    seconds = {"host": 0.0, "disk": 0.0}
    reads = {"host": 0, "disk": 0}
    with bench._store("mixed") as st:
        put_seconds = 0.0
        for r in range(nreq):
            bench.tick(f"mixed workload: put request {r + 1}/{nreq}")
            for i, b in zip(unique[r], request):
                c.fill(i, b)
            put_seconds += timed(st.put_many, keys[r], prefix + request, is_prefix=flags)
        rng = np.random.default_rng(3)
        n = 0
        for rnd in range(s.read_rounds):
            bench.tick(f"mixed workload: read round {rnd + 1}/{s.read_rounds}")
            for r in rng.permutation(nreq):
                for key, i in zip(keys[r], list(prefix_ids) + list(unique[r])):
                    out = outs[n % len(outs)]
                    n += 1
                    tier = st.info(key).tiers[0]  # where this get will be served from (one reader)
                    seconds[tier] += timed(st.get, key, out)
                    reads[tier] += 1
                    c.check(i, out)
        stats = st.stats()
        threshold = st.config.promotion_threshold
        hashed = st.tiers[1].hashed_reads  # type: ignore[attr-defined]
    logical = nreq * (nprefix + nunique) * bs
    total_reads = sum(reads.values())
    bench.report.mixed = {
        "requests": nreq, "prefix_blocks": nprefix, "unique_per_request": nunique, "block_size": bs,
        "host_capacity": s.host_capacity, "read_rounds": s.read_rounds,
        "stored_bytes": stats.unique_bytes, "logical_bytes": stats.logical_bytes,
        "put_bytes": logical, "put_seconds": put_seconds, "put_gbps": logical / put_seconds / 1e9,
        "reads": total_reads, "read_bytes": total_reads * bs, "get_seconds": sum(seconds.values()),
        "get_gbps": total_reads * bs / sum(seconds.values()) / 1e9,
        "get_gbps_by_tier": {t: reads[t] * bs / seconds[t] / 1e9 for t in reads if reads[t]},
        "reads_by_tier": reads, "disk_reads_hashed": hashed,
        "hits_by_tier": {t.name: t.hits for t in stats.tiers},
        "evictions_by_tier": {t.name: t.evictions for t in stats.tiers},
        "dedup_hits": stats.dedup_hits, "dedup_bytes_saved": stats.dedup_bytes_saved,
        "protected_blocks": stats.protected_blocks, "protected_in_memory": stats.protected_in_memory,
        "prefix_retention": stats.protected_in_memory / max(1, stats.protected_blocks),
        "promotions": stats.promotions, "promotion_threshold": threshold, "demotions": stats.demotions, "drops": stats.drops,
        "misses": stats.misses, "integrity_errors": stats.integrity_errors,
        "ceilings_gbps": {"host": bench.copy_ceiling.median, "disk": bench.readinto_ceiling.median},
    }
