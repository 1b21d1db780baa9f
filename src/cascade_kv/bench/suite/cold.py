"""``cascade bench cold``: reads from disk with the page cache dropped, against POSIX files and HDF5, and the
same reads hot beside them.

Each system stores N blocks; every pass makes them cold (cascade-kv demotes them to its disk tier; files are
written back and dropped from the page cache with ``POSIX_FADV_DONTNEED``, or read with ``O_DIRECT`` when
``--o-direct`` is given: printed either way), reads them all (cold), then reads them all again (hot: from
the page cache for files, from memory for cascade-kv once it promoted them or kept them). The target: cascade-kv's
cold read within 10 % of the POSIX ceiling (one file per block, ``readinto`` a preallocated buffer).
"""
from __future__ import annotations

from .core import GB, MiB, Result, Run, Target, buffers_for

DEFAULT_SYSTEMS = ("cascade-kv", "posix", "hdf5", "lmcache-disk")


def run(r: Run) -> Result:
    block = r.options.get("block") or (1 * MiB if r.quick else 16 * MiB)
    count = r.options.get("blocks") or (16 if r.quick else 32)
    passes = 3 if r.quick else 5
    memory = max(4 * count * block, 64 * MiB)
    how = "O_DIRECT" if r.options.get("o_direct") else "fsync + POSIX_FADV_DONTNEED before each pass"
    res = Result("cold", f"cold reads: {count} blocks of {block // MiB} MiB, page cache dropped ({how}), "
                         f"then the same reads hot", r.size,
                 settings={"block_size": block, "blocks": count, "passes": passes, "cold": how})
    res.columns = [("cold_GBps", "cold read"), ("hot_GBps", "hot read (after the cold pass)")]
    for name in r.systems:
        with r.system(name, res, memory, block, o_direct=bool(r.options.get("o_direct"))) as backend:
            if backend is None:
                continue
            mine = res.systems[name]
            contents = r.new_contents(block, seed=51 + r.rank)
            ids = list(range(count))
            keys = [f"cold-{r.rank}-{i}" for i in ids]
            r.together(lambda: r.put_blocks(backend, keys, ids, contents), f"{name}: write")
            outs = buffers_for(min(count, 4), block)
            for p in range(passes):
                r.together(lambda: backend.prepare_cold(keys), f"{name}: cold {p + 1}")
                cold = r.together(lambda: r.get_blocks(backend, keys, ids, contents, outs),
                                  f"{name}: cold read {p + 1}")
                hot = r.together(lambda: r.get_blocks(backend, keys, ids, contents, outs),
                                 f"{name}: hot read {p + 1}")
                nbytes = r.size * count * block
                mine.measure("cold_GBps", "GB/s").samples.append(nbytes / max(r.allgather(cold)) / GB)
                mine.measure("hot_GBps", "GB/s").samples.append(nbytes / max(r.allgather(hot)) / GB)
            hits = backend.tier_hits()
            if hits:
                mine.values["tier_hits"] = hits
    res.targets = [Target("cascade-kv", "cold_GBps", 0.9, "posix", "cold read >= 0.9x POSIX readinto")]
    return res
