"""``cascade bench hot-prefix``: every rank reads the same blocks, which start cold (the seed's "Contention
Paradox").

Rank 0 writes P blocks through each system; before every pass they are made cold (cascade-kv demotes them to
its shared disk tier; every disk-backed system's files are written back and dropped from the page cache with
``POSIX_FADV_DONTNEED``; memory-only systems have nothing colder), then every rank reads all P blocks at once.
Figures per system: aggregate read throughput (all ranks' bytes over the slowest rank's time) and, where the
system can tell, its disk reads. cascade-kv's load leases should make disk reads = P whatever the number of
ranks; file-based systems read every block from disk once per rank (the page cache, shared on one node,
absorbs part of that, which the table shows as it is).
"""
from __future__ import annotations

from ..ceilings import drop_page_cache, read_ways
from .cold import _raw_files, _remove
from .core import GB, MiB, Result, Run, Target, buffers_for, device_read_bytes, turns

DEFAULT_SYSTEMS = ("cascade-kv", "posix", "hdf5", "redis", "lmcache-disk", "lmcache-remote", "mooncake")
CEILING = "raw read, best way, every rank"
"""The ceiling: the same number of ranks reading the same cold set of raw files, the fastest way this machine
knows (:func:`~cascade_kv.bench.ceilings.read_ways`). One rank's cold read set against the N-rank aggregate was
rejected: it let the aggregate of N ranks, which share one page cache, look N times better than the machine."""


def run(r: Run) -> Result:
    quick = r.quick
    block = r.options.get("block") or (1 * MiB if quick else 16 * MiB)
    count = r.options.get("blocks") or (8 if quick else 16)
    passes = 2 if quick else 3
    memory = max(4 * count * block, 64 * MiB)
    res = Result("hot-prefix", f"hot prefix: {r.size} rank(s) read the same {count} blocks of "
                               f"{block // MiB} MiB that start cold; the systems take each pass in turns", r.size,
                 settings={"block_size": block, "blocks": count, "passes": passes, "memory_per_rank": memory,
                           "cold": "cascade-kv: demoted to its disk tier; files: fsync + POSIX_FADV_DONTNEED",
                           "order": "systems open together, each pass taken in turns, rotated every pass"})
    res.columns = [("aggregate_GBps", "aggregate read"), ("disk_reads", "disk reads / pass"),
                   ("device_MiB", "MiB from the device / pass (all ranks)")]
    ids = list(range(count))
    keys = [f"hot-{i}" for i in ids]
    outs = buffers_for(min(count, 4), block)
    nbytes = r.size * count * block
    raw = r.together(lambda: _raw_files(r, count, block) if r.rank == 0 else None, "ceiling: rank 0 writes")
    raw = r.comm.bcast(raw, root=0) if r.comm is not None else raw
    ceiling_ways = read_ways(raw[:-1], buffers_for(count, block), packed=raw[-1])
    ways: dict[str, list[float]] = {way: [] for way in ceiling_ways}
    disk_reads: dict[str, list[int]] = {}
    with r.systems_open(res, memory, block) as open_:
        contents = {name: r.new_contents(block, seed=41) for name in open_}
        for name, backend in list(open_.items()):
            r.step(res, open_, name, lambda: r.put_blocks(backend, keys, ids, contents[name], prefix=[False] * count)
                   if r.rank == 0 else None, "rank 0 writes")
        for p in range(passes):
            for name in turns([*open_, CEILING], p):
                if name == CEILING:
                    r.ceiling_turn(ceiling_ways, lambda: drop_page_cache(raw) if r.rank == 0 else None, nbytes,
                                   ways, f"every rank reads, pass {p + 1}")
                    continue
                if name not in open_:  # failed earlier in this pass
                    continue
                backend, mine = open_[name], res.systems[name]
                r.step(res, open_, name, lambda: backend.prepare_cold(keys) if r.rank == 0 else None,
                       f"cold {p + 1}")
                before = backend.tier_hits().get("disk")
                io_before = device_read_bytes()
                took = r.step(res, open_, name, lambda: r.get_blocks(backend, keys, ids, contents[name], outs),
                              f"every rank reads, pass {p + 1}")
                if took is None:  # the system failed (recorded): out of the turns from now on
                    continue
                io_after = device_read_bytes()
                if io_before is not None and io_after is not None:
                    mine.values.setdefault("device_MiB", []).append(
                        round(sum(r.allgather(io_after - io_before)) / MiB))
                mine.measure("aggregate_GBps", "GB/s").samples.append(nbytes / max(r.allgather(took)) / GB)
                after = backend.tier_hits().get("disk")
                if before is not None and after is not None:
                    disk_reads.setdefault(name, []).append(sum(r.allgather(after - before)))
    for name, counts in disk_reads.items():
        res.systems[name].values["disk_reads"] = counts
    r.barrier()
    if r.rank == 0:
        _remove(r, raw, together=False)
    won = res.ceiling_of(CEILING, ways)
    res.notes.append(f"Ceiling: {r.size} rank(s), as many as read through the systems, each read the same {count} "
                     f"raw files (or one file of them all) cold (dropped from the page cache before each pass), the fastest of {len(ways)} ways "
                     f"each pass (mostly: {won}).")
    res.targets = [Target("cascade-kv", "aggregate_GBps", 0.0, CEILING,
                          "aggregate read at most the raw-read ceiling at the same ranks (a check, not a goal)")]
    if r.size >= 4:
        res.targets += [Target("cascade-kv", "aggregate_GBps", 3.0, "hdf5", ">= 3x HDF5 (4 ranks)"),
                       Target("cascade-kv", "aggregate_GBps", 2.0, "redis", ">= 2x Redis (4 ranks)")]
    else:
        res.notes.append("The issue's targets (>= 3x HDF5, >= 2x Redis) are stated for 4 ranks: run with "
                         "--ranks 4 to judge them.")
    res.notes.append(
        "On one node the kernel's page cache is shared by every rank: once one rank has read a file from the "
        "device, the others read it from memory, so file-based systems (posix, hdf5) also read each block "
        "from the device about once per pass here (the device column). Across nodes each node has its own page "
        "cache and every node reads every block from the parallel file system; that case, the seed's, is not "
        "measured on this machine. Memory systems' servers (redis, mooncake, lmcache) are other processes: "
        "their device reads are not in the column (they hold the blocks in memory).")
    cascade = res.systems.get("cascade-kv")
    if cascade is not None and "disk_reads" in cascade.values:
        ok = all(d == count for d in cascade.values["disk_reads"])
        res.notes.append(f"cascade-kv disk reads per pass: {cascade.values['disk_reads']} for {count} distinct "
                         f"blocks and {r.size} rank(s): {'one read per block' if ok else 'MORE THAN ONE PER BLOCK'}")
    return res
