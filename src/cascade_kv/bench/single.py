"""The single-node workload of ``cascade bench``: each measurement beside its ceiling.

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
from pathlib import Path

import numpy as np

from ..config import CascadeConfig, format_size
from ..store import Store
from .ceilings import (Contents, Spread, best_of, buffers, combined, copy_pass, copy_ways, drop_page_cache, hash_pass,
                       put_ways, read_ways, small_put_pass, timed, touch, write_pass)
from .mixed import run_mixed
from .report import Figure, Report, Target, ratio_spread

GB = 1e9


class BenchError(RuntimeError):
    """The store did not do what a measurement relies on (e.g. a block landed in another tier)."""

BATCH_BLOCKS = (4096, 64 << 10)
"""Block sizes of the small-ops figures (issue 12's targets: 500k gets/s and 100k puts/s per thread)."""
_POISON = 0xA5  # outputs are overwritten before each checked pass: a get that copies nothing fails its check


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

    @property
    def ticks(self) -> int:
        return (9 + 2 * len(BATCH_BLOCKS)) * (self.reps + 1) + self.requests + self.read_rounds


class Bench:
    """Runs every measurement in turn; ``tick(description)`` is called once per pass (progress)."""

    def __init__(self, sizes: Sizes, root: Path, tick: Callable[[str], None]) -> None:
        self.s = sizes
        self.root = root
        self.tick = tick
        self.big = Contents(sizes.block, seed=1)
        self.small = Contents(sizes.small_block, seed=2)
        self.copy_ceiling = self.readinto_ceiling = Spread(0.0, 0.0, 0.0, 0)  # set by host_get(), disk()
        self.report = Report(settings={"block_size": sizes.block, "host_capacity": sizes.host_capacity,
                                       "reps": sizes.reps, "dir": str(root), "sizes": _fields(sizes)})

    def run(self) -> Report:
        self.host_get()
        self.puts()
        self.small_blocks()
        self.small_ops()
        self.disk()
        os.sync()  # the disk phase's dirty pages must not be written back during the mixed workload
        self.mixed()
        self.report.reads_checked = self.big.checked + self.small.checked
        self.report.reads_wrong = self.big.wrong + self.small.wrong
        return self.report

    # ------------------------------------------------------------------ helpers
    def _store(self, name: str, **cfg: object) -> Store:
        cfg.setdefault("host_capacity", self.s.host_capacity)
        cfg.setdefault("disk_path", self.root / name)
        store = Store(CascadeConfig(**cfg))  # type: ignore[arg-type]
        self.report.open_seconds[name] = store.open_seconds
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
            o.fill(_POISON)
        took = timed(lambda: [store.get(k, o) for k, o in zip(keys, outs)])
        for i, o in zip(ids, outs):
            self.big.check(i, o)
        return took

    def _poisoned(self, fn: Callable[[], float], outs: list[np.ndarray]) -> Callable[[], float]:
        def run() -> float:
            for o in outs:
                o.fill(_POISON)  # the same cache state the store's pass starts from
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

    def _add(self, key: str, label: str, unit: str, value: list[float], ceiling: list[float] | None = None,
             ceiling_label: str = "", target: Target | None = None, note: str = "") -> None:
        self.report.figures.append(Figure(key, label, unit, Spread.of(value),
                                          None if ceiling is None else Spread.of(ceiling), ceiling_label,
                                          target, note, None if ceiling is None else ratio_spread(value, ceiling)))

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
        self._add("host_get", f"get, host tier, {format_size(bs)} blocks", "GB/s", r["store"], best,
                  f"best of {len(ways)} ways (mostly: {won})", Target("ratio", 0.8), _ways_note(r, ways))
        self.copy_ceiling = Spread.of(best)

    def puts(self) -> None:
        n, bs = self.s.host_blocks, self.s.block
        srcs, outs = buffers(n, bs), buffers(n, bs)
        for algo, target in (("blake3", Target("value", 3.0)), ("sha256", None)):
            ways = put_ways(algo, outs, srcs)
            with self._store(f"put-{algo}", hash_algorithm=algo) as st:
                r = self._measure(f"put {algo}", n * bs / GB, {
                    "store": lambda: self._fresh_puts(st, srcs, outs, "host"),
                    "hash": lambda algo=algo: hash_pass(algo, srcs), "copy": lambda: copy_pass(outs, srcs), **ways})
            best, won = best_of(r, list(ways))
            h, c = Spread.of(r["hash"]), Spread.of(r["copy"])
            self._add(f"put_{algo}", f"put new {format_size(bs)} blocks, host tier, {algo.upper()}", "GB/s",
                      r["store"], best, f"hash and copy, best of {len(ways)} ways (mostly: {won})", target,
                      f"{algo} alone {h.median:.2f} GB/s, np.copyto alone {c.median:.2f} GB/s; "
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
            out.fill(_POISON)
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
        self._add("small_get", f"get, {size} blocks, host tier, one thread", "/s", rg["store"], rg["ceiling"],
                  "np.copyto per call", Target("value", 50_000))
        self._add("small_put", f"put new {size} blocks, host tier, one thread", "/s", rp["store"], rp["ceiling"],
                  "blake3 + np.copyto per call")

    def small_ops(self) -> None:
        """get_many and put_many of small blocks in batches (an engine's traffic), per thread, beside the same
        blocks copied one ``np.copyto`` call each (gets) and hashed and copied (puts) in a bare loop."""
        for bs in BATCH_BLOCKS:
            # a batch no larger than a pass may move (a quarter of the host tier): with a small --host-capacity
            # 64 blocks of 64 KiB would not fit the memory-only store at all
            b = max(1, min(self.s.batch, self.s.batch_bytes // bs))
            n = max(b, self.s.batch_bytes // bs // b * b)
            contents = Contents(bs, seed=3 + bs)
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
                out.fill(_POISON)
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
            self.small.checked += contents.checked
            self.small.wrong += contents.wrong
            what = f"{size} blocks, batches of {b}, host tier, one thread"
            self._add(f"batch_get_{bs // 1024}k", f"get_many, {what}", "/s", rg["store"], rg["ceiling"],
                      "np.copyto per block", Target("value", 500_000), f"{n} blocks ({format_size(n * bs)}) a pass")
            self._add(f"batch_put_{bs // 1024}k", f"put_many new, {what}", "/s", rp["store"], rp["ceiling"],
                      "blake3 + np.copyto per block", Target("value", 100_000), f"{n} blocks a pass")

    def disk(self) -> None:
        n, bs, m = self.s.disk_blocks, self.s.block, self.s.host_blocks
        srcs, outs = buffers(m, bs), buffers(n, bs)
        raw = self.root / "raw"
        raw.mkdir()
        with self._store("disk", host_capacity=0, locality_aware=False) as st:
            r = self._measure("disk put", m * bs / GB, {
                "store": lambda: self._fresh_puts(st, srcs, outs, "disk"),
                "hash": lambda: hash_pass("blake3", srcs), "write": lambda: write_pass(raw, srcs)})
            self._add("disk_put", f"put new {format_size(bs)} blocks, disk tier (page cache)", "GB/s", r["store"],
                      [combined(h, w) for h, w in zip(r["hash"], r["write"])], "1/(1/blake3 + 1/raw write)",
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
            self._add(key, f"get, disk tier, {format_size(bs)} blocks, {state}, verify_reads={verify}", "GB/s",
                      r["store"], best, f"file reads, best of {len(ways)} ways (mostly: {won})",
                      Target("ratio", 0.9) if verify == "auto" else None,
                      f"{hashed} of {len(keys) * (self.s.reps + 1)} reads hashed; " + _ways_note(r, ways))
            if cache == "hot" and verify == "auto":
                self.readinto_ceiling = Spread.of(best)

    def mixed(self) -> None:
        run_mixed(self)


def _ways_note(rates: dict[str, list[float]], ways: dict[str, object]) -> str:
    """Each way of a ceiling with its median, so a reader sees what the best one was chosen from."""
    unit = " GB/s" if max(Spread.of(rates[w]).median for w in ways) < 1e3 else "/s"
    return "ceiling's ways: " + ", ".join(f"{w} {Spread.of(rates[w]).median:.2f}{unit}" for w in ways)


def _fields(s: Sizes) -> dict[str, int]:
    return {name: getattr(s, name) for name in Sizes.__dataclass_fields__} | {
        "prefix_blocks": s.prefix_blocks, "requests": s.requests}
