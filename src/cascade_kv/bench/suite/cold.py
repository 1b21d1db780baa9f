"""``cascade bench cold``: reads from disk with the page cache dropped, against POSIX files and HDF5, and the
same reads hot beside them.

Each system stores N blocks; every pass makes them cold (cascade-kv demotes them to its disk tier; files are
written back and dropped from the page cache with ``POSIX_FADV_DONTNEED``, or read with ``O_DIRECT`` when
``--o-direct`` is given: printed either way), reads them all (cold), then reads them all again (hot: from
the page cache for files, from memory for cascade-kv once it promoted them or kept them). The systems are open
together and take each pass in turns (:func:`~.core.turns`), so a noisy spell of the machine lands on all of
them. The target: cascade-kv's cold read within 10 % of POSIX's (one file per block, ``readinto`` a
preallocated buffer), judged on the spread of the passes.

A ceiling is measured in the same turns: the same number of raw files of a block each, and one file of all the
blocks, read cold the best way this machine knows (:func:`~cascade_kv.bench.ceilings.read_ways`: one file after
another, with read-ahead, several at once, or the one file through). No system should beat it; one that does by
more than 5 % is reported as a broken ceiling.
"""
from __future__ import annotations

import os

from ..ceilings import drop_page_cache, read_ways
from .core import GB, MiB, Result, Run, Target, buffers_for, turns

DEFAULT_SYSTEMS = ("cascade-kv", "posix", "hdf5", "lmcache-disk")
CEILING = "raw read, best way"
"""The name of the disk-read ceiling in :attr:`Result.ceilings`; the turn it takes among the systems."""


def run(r: Run) -> Result:
    block = r.options.get("block") or (1 * MiB if r.quick else 16 * MiB)
    count = r.options.get("blocks") or (16 if r.quick else 32)
    passes = 3 if r.quick else 5
    memory = max(4 * count * block, 64 * MiB)
    how = "O_DIRECT" if r.options.get("o_direct") else "fsync + POSIX_FADV_DONTNEED before each pass"
    res = Result("cold", f"cold reads: {count} blocks of {block // MiB} MiB, page cache dropped ({how}), "
                         f"then the same reads hot; the systems take each pass in turns", r.size,
                 settings={"block_size": block, "blocks": count, "passes": passes, "cold": how,
                           "order": "systems open together, each pass taken in turns, rotated every pass"})
    res.columns = [("cold_GBps", "cold read"), ("hot_GBps", "hot read (after the cold pass)")]
    nbytes = r.size * count * block
    ids = list(range(count))
    keys = [f"cold-{r.rank}-{i}" for i in ids]
    outs = buffers_for(min(count, 4), block)
    raw = _raw_files(r, count, block)
    ceiling_ways = read_ways(raw[:-1], buffers_for(count, block), packed=raw[-1])
    ways: dict[str, list[float]] = {way: [] for way in ceiling_ways}
    with r.systems_open(res, memory, block, o_direct=bool(r.options.get("o_direct"))) as open_:
        contents = {}
        for name, backend in list(open_.items()):
            contents[name] = r.new_contents(block, seed=51 + r.rank)
            r.step(res, open_, name, lambda: r.put_blocks(backend, keys, ids, contents[name]), "write")
        for p in range(passes):
            for name in turns([*open_, CEILING], p):
                if name == CEILING:
                    r.ceiling_turn(ceiling_ways, lambda: drop_page_cache(raw), nbytes, ways, f"pass {p + 1}")
                    continue
                if name not in open_:  # failed earlier in this pass
                    continue
                backend, mine = open_[name], res.systems[name]
                r.step(res, open_, name, lambda: backend.prepare_cold(keys), f"cold {p + 1}")
                cold = r.step(res, open_, name, lambda: r.get_blocks(backend, keys, ids, contents[name], outs),
                              f"cold read {p + 1}")
                hot = r.step(res, open_, name, lambda: r.get_blocks(backend, keys, ids, contents[name], outs),
                             f"hot read {p + 1}")
                if cold is None or hot is None:  # the system failed (recorded): out of the turns from now on
                    continue
                mine.measure("cold_GBps", "GB/s").samples.append(nbytes / max(r.allgather(cold)) / GB)
                mine.measure("hot_GBps", "GB/s").samples.append(nbytes / max(r.allgather(hot)) / GB)
        for name, backend in open_.items():
            hits = backend.tier_hits()
            if hits:
                res.systems[name].values["tier_hits"] = hits
    _remove(r, raw)
    won = res.ceiling_of(CEILING, ways)
    res.notes.append(f"Ceiling: {count} raw files of a block per rank (and one file of all of them), page cache "
                     f"dropped, read the fastest of {len(ways)} ways each pass (mostly: {won}); every way's median is "
                     f"in the JSON's settings.")
    res.targets = [Target("cascade-kv", "cold_GBps", 0.9, "posix", "cold read >= 0.9x POSIX readinto"),
                   Target("cascade-kv", "cold_GBps", 0.0, CEILING,
                          "cold read at most the raw-read ceiling (a check of the ceiling, not a goal)")]
    for name, s in res.systems.items():
        cold = s.measures.get("cold_GBps")
        if name != "cascade-kv" and cold is not None and cold.samples and res.ceilings[CEILING].median:
            ratio = cold.median / res.ceilings[CEILING].median
            res.notes.append(f"{name}: cold read {ratio:.2f}x the raw-read ceiling"
                             + (" - BROKEN CEILING (above 1.05x)" if ratio > 1.05 else ""))
    return res


def _raw_files(r: Run, count: int, block: int) -> list[str]:
    """``count`` files of ``block`` bytes for this rank's ceiling, and last one file of all ``count`` blocks (written
    once, outside every timed pass)."""
    directory = r.root / "ceiling-raw"
    directory.mkdir(parents=True, exist_ok=True)  # every rank at once: exist_ok settles the race
    data = memoryview(bytes(range(256)) * (block // 256) + bytes(block % 256))
    paths = []
    for i in range(count):
        path = str(directory / f"{r.rank}-{i}")
        with open(path, "wb", buffering=0) as f:
            f.write(data)
        paths.append(path)
    packed = str(directory / f"{r.rank}-packed")
    with open(packed, "wb", buffering=0) as f:
        for _ in range(count):
            f.write(data)
    return [*paths, packed]


def _remove(r: Run, paths: list[str], *, together: bool = True) -> None:
    """Remove a ceiling's files; ``together``: every rank removes its own, then rank 0 the directory."""
    for p in paths:
        os.unlink(p)
    if together:
        r.barrier()
    if r.rank == 0:
        os.rmdir(os.path.dirname(paths[0]))
