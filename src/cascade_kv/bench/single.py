"""The single-node workload of ``cascade bench`` (the suite's ``store`` experiment on one rank): each
measurement beside its ceiling, recorded as one row of the suite's :class:`~.suite.core.Result`.

Every timed pass is preceded by an untimed warm-up and repeated ``reps`` times,
alternating with its ceiling pass so both see the same machine. Preparation
(filling sources, poisoning outputs, dropping the page cache) and the check of
every block read against what was written happen outside the timed region.
Stores are opened outside it too: their arena touch is reported on its own.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.markup import escape

from ..config import CascadeConfig, format_size
from ..store import Store
from .ceilings import (Spread, best_of, buffers, combined, copy_pass, copy_ways, drop_page_cache, hash_pass, put_ways,
                       read_ways, small_put_pass, timed, touch, write_pass)
from .mixed import mixed_table, run_mixed
from .suite.core import GB, POISON, BenchError, Result, Run, SystemResult

SYSTEM = "cascade-kv"
BATCH_BLOCKS = (4096, 64 << 10)
"""Block sizes of the small-ops figures (issue 12's targets: 500k gets/s and 100k puts/s per thread)."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much data each measurement moves."""

    block: int = 16 << 20
    host_capacity: int = 1 << 30
    reps: int = 5
    host_blocks: int = 8  # blocks per host get / put pass
    disk_blocks: int = 32  # blocks per disk read pass
    small_block: int = 4096
    small_count: int = 20_000
    batch: int = 64  # small ops: blocks per get_many / put_many
    batch_bytes: int = 64 << 20  # small ops: the blocks read and written per pass, at most (a quarter of the host tier)
    unique_per_request: int = 4  # mixed workload
    read_rounds: int = 3  # mixed: each unique block is read this often (promotion threshold is 3)

    @classmethod
    def for_run(cls, *, quick: bool, block: int | None, host_capacity: int | None) -> Sizes:
        base = cls(block=1 << 20, host_capacity=32 << 20, reps=3, host_blocks=4, disk_blocks=8,
                   small_count=2000, unique_per_request=2) if quick else cls()
        bs = block or base.block
        host = host_capacity or base.host_capacity
        return cls(block=bs, host_capacity=host, reps=base.reps,
                   host_blocks=max(1, min(base.host_blocks, host // bs // 4)),
                   disk_blocks=max(2, min(base.disk_blocks, (base.disk_blocks * base.block) // bs)),
                   small_count=base.small_count, unique_per_request=base.unique_per_request,
                   batch_bytes=min(base.batch_bytes, host // 4))

    @property
    def prefix_blocks(self) -> int:
        return max(1, min(8, self.host_capacity // (16 * self.block)))

    @property
    def requests(self) -> int:
        """Enough requests that the unique blocks alone are twice the host tier."""
        return max(2, math.ceil(2 * self.host_capacity / (self.unique_per_request * self.block)))


def run_single(r: Run) -> Result:
    """The store experiment on one rank: every measurement of :class:`Bench`, one row each."""
    sizes = Sizes.for_run(quick=r.quick, block=r.options.get("block"), host_capacity=r.options.get("host_capacity"))
    res = Result("store", "the store against this machine's ceilings, one node", 1,
                 settings={"block_size": sizes.block, "host_capacity": sizes.host_capacity, "reps": sizes.reps,
                           "dir": str(r.root), "sizes": _fields(sizes)})
    res.notes.append("Cold reads: before each measured pass the files were fsynced and dropped from the page cache "
                     "with posix_fadvise(POSIX_FADV_DONTNEED), for the store and for the raw ceiling alike.")
    if r.options.get("o_direct"):
        # the disk rows are page cache warm and page cache dropped by design, ceilings included
        res.notes.append("--o-direct does not apply to the single-node job: its disk figures read through the "
                         "page cache (warm, or dropped before each pass), the store and its ceilings alike.")
    Bench(sizes, r, res).run()
    return res


class Bench:
    """Runs every measurement in turn, recording each in ``res``; ``run.tick(description)`` once per pass."""

    def __init__(self, sizes: Sizes, run: Run, res: Result) -> None:
        self.s = sizes
        self.root = run.root
        self.tick = run.tick
        self.job = run
        self.res = res
        self.big = run.new_contents(sizes.block, seed=1)
        self.small = run.new_contents(sizes.small_block, seed=2)
        self.copy_ceiling = self.readinto_ceiling = Spread(0.0, 0.0, 0.0, 0)  # set by host_get(), disk()
        self.mine = res.systems.setdefault(SYSTEM, SystemResult(SYSTEM))
        self.open_seconds: dict[str, float] = res.settings.setdefault("open_seconds", {})
        """Seconds each store took to open (arena allocation and touch): never inside a timed pass (the
        distributed job keeps its stores' there too)."""

    def run(self) -> None:
        self.host_get()
        self.puts()
        self.small_blocks()
        self.small_ops()
        self.disk()
        os.sync()  # the disk phase's dirty pages must not be written back during the mixed workload
        self.mine.values["mixed"] = run_mixed(self)

    # ------------------------------------------------------------------ helpers
    def _store(self, name: str, **cfg: object) -> Store:
        cfg.setdefault("host_capacity", self.s.host_capacity)
        cfg.setdefault("disk_path", self.root / name)
        store = Store(CascadeConfig(**cfg))  # type: ignore[arg-type]
        self.open_seconds[name] = store.open_seconds
        self.mine.setup_seconds += store.open_seconds  # the suite's setup time of a system: all its stores'
        return store

    def _measure(self, what: str, amount: float, passes: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
        """Run the passes in turn (one warm-up round, then ``reps`` rounds); rates = amount / seconds."""
        rates: dict[str, list[float]] = {name: [] for name in passes}
        for rep in range(-1, self.s.reps):
            self.tick(f"{what} ({'warm-up' if rep < 0 else f'rep {rep + 1}/{self.s.reps}'})")
            for name, fn in passes.items():
                took = fn()
                if rep >= 0:
                    rates[name].append(amount / took)
        return rates

    def _gets(self, store: Store, keys: list[str], ids: range, outs: list[np.ndarray]) -> float:
        """Poison ``outs``, time one ``get`` per key into them, check each against its block."""
        for o in outs:
            o.fill(POISON)
        took = timed(lambda: [store.get(k, o) for k, o in zip(keys, outs)])
        for i, o in zip(ids, outs):
            self.big.check(i, o)
        return took

    def _poisoned(self, fn: Callable[[], float], outs: list[np.ndarray]) -> Callable[[], float]:
        def run() -> float:
            for o in outs:
                o.fill(POISON)  # the same cache state the store's pass starts from
            return fn()
        return run

    def _fresh_puts(self, store: Store, srcs: list[np.ndarray], outs: list[np.ndarray], tier: str) -> float:
        """Time the put of never-seen blocks (one ``put`` each); check, read back, delete (untimed)."""
        ids = self.big.new_ids(len(srcs))
        for i, b in zip(ids, srcs):
            self.big.fill(i, b)
        keys = [f"put-{i}" for i in ids]
        hits = store.stats().dedup_hits
        took = timed(lambda: [store.put(k, b) for k, b in zip(keys, srcs)])
        where = {store.info(k).tiers for k in keys}
        if where != {(tier,)} or store.stats().dedup_hits != hits:
            raise BenchError(f"new blocks meant for the {tier} tier landed in {where} "
                               f"(dedup hits {store.stats().dedup_hits - hits})")
        self._gets(store, keys, ids, outs[:len(keys)])
        store.delete_many(keys)
        return took

    # ------------------------------------------------------------------ measurements
    def host_get(self) -> None:
        n, bs = self.s.host_blocks, self.s.block
        ids, srcs, outs = self.big.new_ids(n), buffers(n, bs), buffers(n, bs)
        for i, b in zip(ids, srcs):
            self.big.fill(i, b)
        keys = [f"h{i}" for i in ids]
        ways = copy_ways(outs, srcs)
        with self._store("host") as st:
            st.put_many(keys, srcs)
            r = self._measure("host get", n * bs / GB, {
                "store": lambda: self._gets(st, keys, ids, outs),
                **{way: self._poisoned(fn, outs) for way, fn in ways.items()}})
        best, won = best_of(r, list(ways))
        self.res.figure("host_get", f"get, host tier, {format_size(bs)} blocks", "GB/s", r["store"], ceiling=best,
                        ceiling_what=f"best of {len(ways)} ways (mostly: {won})", target=0.8, note=_ways_note(r, ways))
        self.copy_ceiling = Spread.of(best)

    def puts(self) -> None:
        n, bs = self.s.host_blocks, self.s.block
        srcs, outs = buffers(n, bs), buffers(n, bs)
        for algo, target in (("blake3", 3.0), ("sha256", None)):
            ways = put_ways(algo, outs, srcs)
            with self._store(f"put-{algo}", hash_algorithm=algo) as st:
                r = self._measure(f"put {algo}", n * bs / GB, {
                    "store": lambda: self._fresh_puts(st, srcs, outs, "host"),
                    "hash": lambda algo=algo: hash_pass(algo, srcs), "copy": lambda: copy_pass(outs, srcs), **ways})
            best, won = best_of(r, list(ways))
            h, c = Spread.of(r["hash"]), Spread.of(r["copy"])
            self.res.figure(f"put_{algo}", f"put new {format_size(bs)} blocks, host tier, {algo.upper()}", "GB/s",
                            r["store"], ceiling=best, ceiling_what=f"hash and copy, best of {len(ways)} ways (mostly: "
                            f"{won})", target=target, of_ceiling=False,
                            note=f"{algo} alone {h.median:.2f} GB/s, np.copyto alone {c.median:.2f} GB/s; "
                            + _ways_note(r, ways))

    def small_blocks(self) -> None:
        n, sb = self.s.small_count, self.s.small_block
        src, out, scratch = (touch(np.empty((n, sb), np.uint8)) for _ in range(3))
        src_rows, out_rows = list(src), list(out)

        def puts() -> float:
            ids = self.small.new_ids(n)
            self.small.fill_rows(ids, src)
            keys = [f"s{i}" for i in ids]
            took = timed(lambda: [st.put(k, row) for k, row in zip(keys, src_rows)])
            st.get_many(keys, out_rows)
            self.small.check_rows(ids, out, scratch)
            st.delete_many(keys)
            return took

        def gets() -> float:
            out.fill(POISON)
            took = timed(lambda: [st.get(k, o) for k, o in zip(keys, out_rows)])
            self.small.check_rows(ids, out, scratch)
            return took

        with self._store("small") as st:
            rp = self._measure("small puts", n, {"store": puts, "ceiling": lambda: small_put_pass(out_rows, src_rows)})
            ids = self.small.new_ids(n)
            keys = [f"s{i}" for i in ids]
            st.put_many(keys, list(self.small.fill_rows(ids, src)))
            rg = self._measure("small gets", n, {"store": gets, "ceiling": lambda: copy_pass(out_rows, src_rows)})
        size = format_size(sb)
        self.res.figure("small_get", f"get, {size} blocks, host tier, one thread", "/s", rg["store"],
                        ceiling=rg["ceiling"], ceiling_what="np.copyto per call", target=50_000, of_ceiling=False)
        self.res.figure("small_put", f"put new {size} blocks, host tier, one thread", "/s", rp["store"],
                        ceiling=rp["ceiling"], ceiling_what="blake3 + np.copyto per call")

    def small_ops(self) -> None:
        """get_many and put_many of small blocks in batches (an engine's traffic), per thread, beside the same
        blocks copied one ``np.copyto`` call each (gets) and hashed and copied (puts) in a bare loop."""
        for bs in BATCH_BLOCKS:
            # a batch no larger than a pass may move (a quarter of the host tier): with a small --host-capacity
            # 64 blocks of 64 KiB would not fit the memory-only store at all
            b = max(1, min(self.s.batch, self.s.batch_bytes // bs))
            n = max(b, self.s.batch_bytes // bs // b * b)
            contents = self.job.new_contents(bs, seed=3 + bs)
            src, out, scratch = (touch(np.empty((n, bs), np.uint8)) for _ in range(3))
            src_rows, out_rows = list(src), list(out)
            cuts = range(0, n, b)

            def puts() -> float:
                ids = contents.new_ids(n)
                contents.fill_rows(ids, src)
                keys = [f"b{bs}-{i}" for i in ids]
                took = timed(lambda: [st.put_many(keys[i:i + b], src_rows[i:i + b]) for i in cuts])
                st.get_many(keys, out_rows)
                contents.check_rows(ids, out, scratch)
                st.delete_many(keys)
                return took

            def gets() -> float:
                out.fill(POISON)
                took = timed(lambda: [st.get_many(keys[i:i + b], out_rows[i:i + b]) for i in cuts])
                contents.check_rows(ids, out, scratch)
                return took

            size = format_size(bs)
            with self._store(f"batch-{bs}", disk_path=None) as st:
                rp = self._measure(f"put_many {size}", n, {
                    "store": puts, "ceiling": lambda: small_put_pass(out_rows, src_rows)})
                ids = contents.new_ids(n)
                keys = [f"b{bs}-{i}" for i in ids]
                st.put_many(keys, list(contents.fill_rows(ids, src)))
                rg = self._measure(f"get_many {size}", n, {
                    "store": gets, "ceiling": self._poisoned(lambda: copy_pass(out_rows, src_rows), [out])})
            what = f"{size} blocks, batches of {b}, host tier, one thread"
            self.res.figure(f"batch_get_{bs // 1024}k", f"get_many, {what}", "/s", rg["store"],
                            ceiling=rg["ceiling"], ceiling_what="np.copyto per block", target=500_000, of_ceiling=False,
                            note=f"{n} blocks ({format_size(n * bs)}) a pass")
            self.res.figure(f"batch_put_{bs // 1024}k", f"put_many new, {what}", "/s", rp["store"],
                            ceiling=rp["ceiling"], ceiling_what="blake3 + np.copyto per block", target=100_000,
                            of_ceiling=False, note=f"{n} blocks a pass")

    def disk(self) -> None:
        n, bs, m = self.s.disk_blocks, self.s.block, self.s.host_blocks
        srcs, outs = buffers(m, bs), buffers(n, bs)
        raw = self.root / "raw"
        raw.mkdir()
        with self._store("disk", host_capacity=0, locality_aware=False) as st:
            r = self._measure("disk put", m * bs / GB, {
                "store": lambda: self._fresh_puts(st, srcs, outs, "disk"),
                "hash": lambda: hash_pass("blake3", srcs), "write": lambda: write_pass(raw, srcs)})
            self.res.figure("disk_put", f"put new {format_size(bs)} blocks, disk tier (page cache)", "GB/s", r["store"],
                            ceiling=[combined(h, w) for h, w in zip(r["hash"], r["write"])],
                            ceiling_what="1/(1/blake3 + 1/raw write)",
                            note=f"raw write alone {Spread.of(r['write']).median:.2f} GB/s")
            ids = self.big.new_ids(n)
            self._read_disk(st, ids, outs, "auto")
        with self._store("disk-verify-always", host_capacity=0, locality_aware=False, verify_reads="always") as st:
            self._read_disk(st, ids, outs, "always")

    def _read_disk(self, st: Store, ids: range, outs: list[np.ndarray], verify: str) -> None:
        bs = self.s.block
        keys = [f"d{i}" for i in ids]
        for k, i in zip(keys, ids):
            st.put(k, self.big.fill(i, outs[0]))
        if any(st.info(k).tiers != ("disk",) for k in keys):
            raise BenchError("blocks meant for the disk tier are not on disk only")
        disk = st.tiers[1]
        paths = [disk.path(bytes.fromhex(st.info(k).digest)) for k in keys]  # type: ignore[attr-defined]
        # warm-up: verify='auto' hashes a file on its first read, and again while its ctime is too recent
        # to trust (a write in the same clock tick would not change it); steady state is what we time
        deadline = time.monotonic() + 3.0
        while True:
            before = disk.hashed_reads  # type: ignore[attr-defined]
            self._gets(st, keys, ids, outs)
            if disk.hashed_reads == before or time.monotonic() > deadline:  # type: ignore[attr-defined]
                break
            time.sleep(0.05)
        amount = len(keys) * bs / GB
        cases = [("hot", None), ("cold", lambda: drop_page_cache(paths))] if verify == "auto" else [("hot", None)]
        for cache, prepare in cases:
            def step(fn: Callable[[], float], prepare: Callable[[], None] | None = prepare) -> Callable[[], float]:
                def run() -> float:
                    if prepare is not None:
                        prepare()
                    return fn()
                return run
            ways = read_ways(paths, outs)
            hashed = disk.hashed_reads  # type: ignore[attr-defined]
            r = self._measure(f"disk get {cache} verify={verify}", amount, {
                "store": step(lambda: self._gets(st, keys, ids, outs)),
                **{way: step(self._poisoned(fn, outs)) for way, fn in ways.items()}})
            hashed = disk.hashed_reads - hashed  # type: ignore[attr-defined]
            best, won = best_of(r, list(ways))
            state = "page cache warm" if cache == "hot" else "page cache dropped before each pass"
            key = f"disk_get_{cache}" + ("" if verify == "auto" else "_verify_always")
            self.res.figure(key, f"get, disk tier, {format_size(bs)} blocks, {state}, verify_reads={verify}", "GB/s",
                            r["store"], ceiling=best,
                            ceiling_what=f"file reads, best of {len(ways)} ways (mostly: {won})",
                            target=0.9 if verify == "auto" else None,
                            note=f"{hashed} of {len(keys) * (self.s.reps + 1)} reads hashed; " + _ways_note(r, ways))
            if cache == "hot" and verify == "auto":
                self.readinto_ceiling = Spread.of(best)


def _ways_note(rates: dict[str, list[float]], ways: dict[str, object]) -> str:
    """Each way of a ceiling with its median, so a reader sees what the best one was chosen from."""
    unit = " GB/s" if max(Spread.of(rates[w]).median for w in ways) < 1e3 else "/s"
    return "ceiling's ways: " + ", ".join(f"{w} {Spread.of(rates[w]).median:.2f}{unit}" for w in ways)


def _fields(s: Sizes) -> dict[str, int]:
    return {name: getattr(s, name) for name in Sizes.__dataclass_fields__} | {
        "prefix_blocks": s.prefix_blocks, "requests": s.requests}


# ---------------------------------------------------------------------- beside the figures table
def render_more(res: Result, console: Console) -> None:
    """What the figures table leaves out: the mixed workload, the stores' open times, the sizes."""
    mine = res.systems.get(SYSTEM)
    values = {} if mine is None else mine.values
    if values.get("mixed"):
        console.print(mixed_table(values["mixed"]))
    s = res.settings
    if s.get("open_seconds"):
        console.print("Store open (arena allocated and touched), apart from every timed figure: " + ", ".join(
            f"{name} {sec:.2f} s" for name, sec in s["open_seconds"].items()))
    console.print(f"Sizes: block {format_size(s['block_size'])}, host tier {format_size(s['host_capacity'])}, "
                  f"{s['reps']} reps after warm-up; disk tier in {escape(str(s['dir']))} (removed).")

