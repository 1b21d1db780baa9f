"""``cascade bench serve``: the node daemon's figures, from client processes, beside ceilings measured in the
same run.

A real ``cascade serve`` runs as a child process (its own socket in a temp dir; stopped and its dir removed
however the run ends, and it ends itself if this process dies first). This process is its client, and two
more client processes hammer it during the loaded lookups. Each row of the table is one figure:

* get of 16 MiB and 2 MiB blocks (``get_many`` into preallocated buffers, a working set twice the last-level
  cache) against :func:`~cascade_kv.memcopy.copy_bytes` between two plain arrays — the very copy the client
  makes, with the same threads — and single-thread ``np.copyto``; target >= 0.8x;
* lookup of 64 token-prefix keys, idle and with two hammering clients, beside the round trip of an empty
  request (``len``); targets: median < 100 us, p99 < 1 ms;
* put of a block already stored (the digest crosses, not the bytes), beside hashing the block alone;
  target < 100 us;
* the daemon's CPU while idle (no client, then one idle client), from ``/proc/PID/stat``; target < 2 %;
* ``get_many``/``put_many`` of 64 blocks of 4 and 64 KiB, beside the in-process Store.

Every read and every lookup answer is checked; the exit status is 1 if any was wrong.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ... import memcopy
from ...arrays import byte_view
from ...config import CascadeConfig
from ...hashing import Hasher
from ..ceilings import Contents, touch
from .core import GB, POISON, MiB, Measure, Result, Run, SuiteError, SystemResult, Target

DEFAULT_SYSTEMS = ("cascade-kv",)
"""Not a choice of systems: the experiment measures the daemon and, beside it, the in-process Store."""

KiB = 1 << 10
BATCH = 64  # small-block calls: a batch of an engine's blocks
HAMMERS = 2


@dataclass(frozen=True, slots=True)
class Sizes:
    working: int  # bytes of blocks the large gets rotate over (and the ceilings' source)
    samples: int  # timed calls per large block size
    lookups: int  # timed lookups (and as many empty round trips) per condition
    puts: tuple[int, int]  # timed digest-only puts of 4 KiB, of 2 MiB
    batches: int  # small-block batches of 64 per size
    idle: float  # seconds of each idle CPU window

    @classmethod
    def for_run(cls, quick: bool) -> "Sizes":
        if quick:
            return cls(64 * MiB, 12, 200, (200, 20), 3, 0.5)
        return cls(min(max(2 * last_level_cache(), 256 * MiB), 1024 * MiB), 160, 3000, (3000, 300), 30, 3.0)


def last_level_cache() -> int:
    """The largest CPU cache's size in bytes (32 MiB where the kernel does not say)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": KiB, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            best = max(best, int(text.rstrip("KMG")) * scale)
    return best or 32 * MiB


class ServeResult(Result):
    def judge(self) -> None:
        super().judge()
        for t in self.targets:
            if isinstance(t, Below) and t.got is not None:
                t.passed = t.got < t.factor


@dataclass
class Below(Target):
    """A ceiling the figure must stay under (a latency, a CPU share): the suite's Target knows only 'at least'."""


@dataclass
class Tally:
    """Checks made outside a :class:`Contents` (lookup answers, the hammering clients' reads)."""

    checked: int = 0
    wrong: int = 0


def prefix_keys(tokens: np.ndarray, block_tokens: int) -> list[bytes]:
    """32-byte token-prefix keys, one per block of ``block_tokens`` tokens (an engine's lookup keys)."""
    from ...tokens import prefix_keys as keys_of

    return [bytes(k) for k in keys_of(tokens, block_tokens)]


def _us(seconds: Sequence[float]) -> Measure:
    return Measure("us", [s * 1e6 for s in seconds])


def _p99(m: Measure) -> float:
    """The 99th percentile as the table's cell computes it (the sample at rank 0.99 n), so the two agree."""
    ranked = sorted(m.samples)
    return ranked[min(len(ranked) - 1, int(0.99 * len(ranked)))]


# ---------------------------------------------------------------------------------------------- the daemon
# Started through this snippet rather than `cascade serve` directly: it first asks the kernel to SIGTERM it
# when this process goes, so a bench killed with SIGKILL leaves no daemon behind.
_DAEMON = ("import ctypes, os, signal, sys\n"
           "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
           "if os.getppid() != int(sys.argv[1]): sys.exit(0)  # the parent went before prctl\n"
           "from cascade_kv.cli import main\n"
           "sys.exit(main(['serve', *sys.argv[2:]]))\n")


@dataclass(frozen=True, slots=True)
class Daemon:
    pid: int
    socket: Path


@contextmanager
def daemon(capacity: int) -> Iterator[Daemon]:
    """A ``cascade serve`` child on a socket of its own with ``capacity`` bytes of host tier."""
    workdir = Path(tempfile.mkdtemp(prefix="ckv-serve-"))
    sock = workdir / "d.sock"
    log = open(workdir / "daemon.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", _DAEMON, str(os.getpid()), "--socket", str(sock),
                             "--host-capacity", f"{capacity // MiB}MiB"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the daemon prints this line once it listens, or exits
        if "listening on" not in line:
            proc.wait(30)
            log.seek(0)
            raise SuiteError(f"cascade serve did not start (exit {proc.returncode}): {line.strip()} "
                             f"{log.read()[-2000:].strip()}")
        yield Daemon(proc.pid, sock)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_pct(pid: int, seconds: float) -> float:
    before, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)  # the measurement itself: a window in which nobody asks the daemon anything
    return 100 * (cpu_seconds(pid) - before) / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- hammering clients
@contextmanager
def hammers(sock: Path, n: int, tally: Tally) -> Iterator[list[dict[str, Any]]]:
    """``n`` client processes looping over lookups, gets and puts until the block ends; their checks go to
    ``tally``, and what each did (rounds, calls per second) into the list yielded, once the block ended."""
    procs = [subprocess.Popen([sys.executable, "-m", __name__, "hammer", str(sock), str(100 + i)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    reports: list[dict[str, Any]] = []
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                p.kill()
                raise SuiteError(f"a hammering client did not start: {p.communicate(timeout=30)[1][-2000:]}")
        yield reports
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            if p.returncode == 0 and out.strip():
                reports.append(json.loads(out.strip().splitlines()[-1]))
            elif not sys.exc_info()[0]:
                raise SuiteError(f"a hammering client failed (exit {p.returncode}): {err[-2000:]}")
        for rep in reports:
            tally.checked += rep["checked"]
            tally.wrong += rep["wrong"]


def _hammer(sock: str, seed: int) -> int:
    """One hammering client: lookups of 64 keys, gets of 8 blocks of 64 KiB checked, digest-only puts of them,
    and every 16th round a put with new bytes; until SIGTERM or the parent closes stdin."""
    from ... import connect

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    contents = Contents(64 * KiB, seed=seed)
    look = prefix_keys(np.arange(64 * 16) + seed * 100_000, 16)
    keys = [f"hammer-{seed}-{i}" for i in range(8)]
    ids = list(contents.new_ids(8))
    blocks = [contents.fill(i, touch(np.empty(64 * KiB, np.uint8))) for i in ids]
    outs = [touch(np.empty(64 * KiB, np.uint8)) for _ in keys]
    done = {"rounds": 0, "calls": 0, "checked": 0, "wrong": 0}
    t0 = time.perf_counter()
    with connect(sock) as c:
        c.put_many(look[:32], [blocks[0]] * 32, is_prefix=True)
        c.put_many(keys, blocks)
        print("ready", flush=True)
        while not stop.is_set():
            if done["rounds"] % 16 == 15:  # new bytes under one key: the put that carries data
                ids[0] = contents.new_ids(1)[0]
                contents.fill(ids[0], blocks[0])
            done["wrong"] += c.lookup(look) != 32
            c.put_many(keys, blocks)
            c.get_many(keys, outs)
            for i, out in zip(ids, outs):
                done["wrong"] += not contents.check(i, out)
            done["rounds"] += 1
            done["calls"] += 3
            done["checked"] += 1 + len(keys)
    done["calls_per_s"] = done["calls"] / (time.perf_counter() - t0)
    print(json.dumps(done), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- the figures
def _row(res: Result, name: str, how: str) -> SystemResult:
    row = res.systems.setdefault(name, SystemResult(name))
    row.values["how"] = how
    return row


def large_gets(r: Run, res: Result, client: Any, block: int, label: str, sizes: Sizes) -> None:
    """get_many of ``block``-byte blocks into preallocated buffers, beside the same copies between plain arrays."""
    count = max(8, sizes.working // block)
    batch = 4 if block >= 8 * MiB else 8
    contents = r.new_contents(block, seed=7 + block // MiB)
    keys = [f"big-{label}-{i}" for i in range(count)]
    source = touch(np.empty((count, block), np.uint8))  # the ceiling's source: the daemon's blocks, again
    for i in range(0, count, batch):
        client.put_many(keys[i:i + batch], [contents.fill(j, source[j]) for j in range(i, min(i + batch, count))])
    outs = [touch(np.empty(block, np.uint8)) for _ in range(max(batch, count // 2))]
    threads = memcopy._threads() if block >= memcopy.PARALLEL_MIN else 1
    # one untimed, checked read of every block first: a long-lived client has the arena's pages mapped; the
    # first touch of each page (a minor fault, about 0.25 us per 4 KiB) is the set-up, not the copy
    for i in range(0, count, batch):
        chunk = list(range(i, min(i + batch, count)))
        client.get_many([keys[j] for j in chunk], outs[:len(chunk)])
        for j, d in zip(chunk, outs):
            contents.check(j, d)
    mine = _row(res, f"get {label}", f"get_many of {batch} x {label}, {count} blocks rotating; copy threads: "
                                     f"{threads} on both sides")
    served, parallel, single = (Measure("GB/s") for _ in range(3))
    for s in range(sizes.samples):
        first = s * batch
        chunk = [(first + k) % count for k in range(batch)]
        dst = [outs[(first + k) % len(outs)] for k in range(batch)]
        for d in dst:
            d.fill(POISON)
        t0 = time.perf_counter()
        client.get_many([keys[j] for j in chunk], dst)
        served.samples.append(batch * block / (time.perf_counter() - t0) / GB)
        for j, d in zip(chunk, dst):
            contents.check(j, d)
        for copy, m in ((lambda d, j: memcopy.copy_bytes(memoryview(d), memoryview(source[j])), parallel),
                        (lambda d, j: np.copyto(d, source[j]), single)):
            for d in dst:
                d.fill(POISON)
            t0 = time.perf_counter()
            for j, d in zip(chunk, dst):
                copy(d, j)
            m.samples.append(batch * block / (time.perf_counter() - t0) / GB)
    mine.measures.update(serve=served, bound=parallel, single=single)
    mine.values.update(vs=f"{served.median / parallel.median:.2f}x", copy_threads=threads, blocks=count, batch=batch)
    res.ceilings[f"copy_bytes {label}"] = parallel
    res.ceilings[f"np.copyto 1 thread {label}"] = single
    res.targets.append(Target(mine.name, "serve", 0.8, f"copy_bytes {label}", f">= 0.8x copy_bytes ({threads} "
                                                                               f"thread(s) both sides)"))
    client.delete_many(keys)


def lookups(client: Any, res: Result, keys: list, tally: Tally, n: int, label: str) -> SystemResult:
    """``n`` lookups of ``keys`` (all stored), each followed by an empty round trip (``len``), the floor."""
    look, trip = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        got = client.lookup(keys)
        t1 = time.perf_counter()
        len(client)
        trip.append(time.perf_counter() - t1)
        look.append(t1 - t0)
        tally.checked += 1
        tally.wrong += got != len(keys)
    mine = _row(res, f"lookup 64 keys, {label}", "median (p99 below); floor: the round trip of an empty request "
                                                 "(len)")
    mine.measures.update(serve=_us(look), bound=_us(trip))
    mine.measures["p99"] = Measure("us", [_p99(mine.measures["serve"])])
    mine.values["vs"] = f"+{mine.measures['serve'].median - mine.measures['bound'].median:,.1f} us"
    return mine


def dedup_puts(client: Any, res: Result, contents: Contents, n: int, label: str) -> None:
    """Puts of a block the daemon holds, under new keys: the client hashes, only the digest crosses."""
    hasher = Hasher(CascadeConfig.from_env().hash_algorithm)  # the daemon's: same environment, same default
    block = contents.fill(0, touch(np.empty(contents.nbytes, np.uint8)))
    client.put(f"dedup-{label}-first", block)
    before = client.service_stats()["put_digest_only_blocks"]
    took, hashing = [], []
    for i in range(n):
        t0 = time.perf_counter()
        client.put(f"dedup-{label}-{i}", block)
        t1 = time.perf_counter()
        hasher.digest(byte_view(block))
        hashing.append(time.perf_counter() - t1)
        took.append(t1 - t0)
    digest_only = client.service_stats()["put_digest_only_blocks"] - before
    out = np.empty_like(block)
    for key in (f"dedup-{label}-0", f"dedup-{label}-{n - 1}"):
        out.fill(POISON)
        client.get(key, out)
        contents.check(0, out)
    mine = _row(res, f"put {label}, already stored", "median (p99 below), new key each; floor: hashing the block "
                                                     "alone in the client")
    mine.measures.update(serve=_us(took), bound=_us(hashing))
    mine.values.update(vs=f"+{mine.measures['serve'].median - mine.measures['bound'].median:,.1f} us",
                       digest_only=f"{digest_only} of {n}")
    floor = mine.measures["bound"].median
    if floor < 50:  # the figure: a block whose hash is negligible
        res.targets.append(Below(mine.name, "serve", 100, text="median < 100 us"))
    else:  # hashing alone takes longer than 100 us: what the protocol adds to the hash is what can be judged
        res.targets.append(Below(mine.name, "serve", floor + 100,
                                 text=f"median < hashing ({floor:,.0f} us) + 100 us"))
    client.delete_many([f"dedup-{label}-{i}" for i in range(n)] + [f"dedup-{label}-first"])


def small_blocks(r: Run, store: Any, row: str, block: int, label: str, batches: int) -> tuple[Measure, Measure]:
    """put_many then get_many of ``batches`` batches of 64 new ``block``-byte blocks: thousands of blocks/s."""
    contents = r.new_contents(block, seed=3 + block // KiB)
    rows = np.empty((BATCH, block), np.uint8)
    outs = touch(np.empty((BATCH, block), np.uint8))
    scratch = np.empty_like(outs)
    puts, gets = Measure("k blocks/s"), Measure("k blocks/s")
    written = []
    for b in range(batches):
        ids = contents.new_ids(BATCH)
        keys = [f"small-{row}-{label}-{i}" for i in ids]
        contents.fill_rows(ids, rows)
        t0 = time.perf_counter()
        store.put_many(keys, list(rows))
        puts.samples.append(BATCH / (time.perf_counter() - t0) / 1e3)
        written.append((ids, keys))
    for ids, keys in written:
        outs.fill(POISON)
        t0 = time.perf_counter()
        store.get_many(keys, list(outs))
        gets.samples.append(BATCH / (time.perf_counter() - t0) / 1e3)
        contents.check_rows(ids, outs, scratch)
    store.delete_many([k for _, keys in written for k in keys])
    return puts, gets


def compare_small(res: Result, served: dict, local: dict) -> None:
    for (label, op), m in served.items():
        mine = _row(res, f"{op} 64 x {label}", "blocks per second in batches of 64 (new blocks for puts); beside "
                                               "it the in-process Store")
        other = local[label, op]
        mine.measures.update(serve=m, in_process=other)
        mine.values["vs"] = f"{m.median / other.median:.2f}x of in-process"


# ---------------------------------------------------------------------------------------------- the experiment
def run(r: Run) -> Result:
    if r.size > 1:
        raise SuiteError("cascade bench serve measures one node's daemon: run it without --ranks")
    from ... import Store, connect

    sizes = Sizes.for_run(r.quick)
    small_bytes = 2 * sizes.batches * BATCH * 64 * KiB
    capacity = 2 * sizes.working + small_bytes + 256 * MiB
    res = ServeResult("serve", "cascade serve: a client process's figures against ceilings measured in the same "
                               "run", 1,
                      settings={"working_set_bytes": sizes.working, "last_level_cache_bytes": last_level_cache(),
                                "host_capacity": capacity, "hammering_clients": HAMMERS, "batch": BATCH,
                                "lookups_per_condition": sizes.lookups, "idle_window_s": sizes.idle,
                                "copy_threads": memcopy._threads(), "cpus": len(os.sched_getaffinity(0))})
    res.columns = [("serve", "cascade serve client"), ("bound", "ceiling / floor (same run)"), ("vs", "vs"),
                   ("single", "np.copyto, 1 thread"), ("in_process", "in-process Store"), ("copy_threads", "copy threads")]
    tally = Tally()
    r.contents.append(tally)  # type: ignore[arg-type]  # counted with the Contents' checks
    served_small: dict[tuple[str, str], Measure] = {}
    with daemon(capacity) as d:
        r.tick("daemon started")
        with connect(d.socket) as c:
            for block, label in ((16 * MiB, "16 MiB"), (2 * MiB, "2 MiB")):
                large_gets(r, res, c, block, label, sizes)
                r.tick(f"get {label}")
            keys = prefix_keys(np.arange(64 * 16), 16)
            look = r.new_contents(4 * KiB, seed=5)
            c.put_many(keys, [look.fill(i, np.empty(4 * KiB, np.uint8)) for i in range(64)], is_prefix=True)
            lookups(c, res, keys, tally, sizes.lookups, "idle daemon")
            with hammers(d.socket, HAMMERS, tally) as reports:
                r.tick("lookups, hammered")
                loaded = lookups(c, res, keys, tally, sizes.lookups, f"{HAMMERS} hammering client processes")
            loaded.values["hammer_calls_per_s"] = [round(h["calls_per_s"]) for h in reports]
            res.targets += [Below(loaded.name, "serve", 100, text="median < 100 us"),
                            Below(loaded.name, "p99", 1000, text="p99 < 1 ms (1000 us)")]
            outs = [np.empty(4 * KiB, np.uint8) for _ in keys]
            c.get_many(keys, outs)
            for i, out in enumerate(outs):
                look.check(i, out)
            for nbytes, label, n in ((4 * KiB, "4 KiB", sizes.puts[0]), (2 * MiB, "2 MiB", sizes.puts[1])):
                dedup_puts(c, res, r.new_contents(nbytes, seed=9), n, label)
                r.tick(f"put {label}")
            for block, label in ((4 * KiB, "4 KiB"), (64 * KiB, "64 KiB")):
                served_small[label, "put_many"], served_small[label, "get_many"] = \
                    small_blocks(r, c, "served", block, label, sizes.batches)
        r.tick("idle CPU")
        idle = _row(res, "daemon idle CPU, no client", f"% of one core over {sizes.idle:g} s after every client "
                                                       f"disconnected")
        idle.measures["serve"] = Measure("%", [idle_cpu_pct(d.pid, sizes.idle)])
        with connect(d.socket) as c:
            len(c)
            held = _row(res, "daemon idle CPU, 1 idle client", f"% of one core over {sizes.idle:g} s, one client "
                                                               f"connected and silent")
            held.measures["serve"] = Measure("%", [idle_cpu_pct(d.pid, sizes.idle)])
        res.targets += [Below(idle.name, "serve", 2, text="< 2 % of a core"),
                        Below(held.name, "serve", 2, text="< 2 % of a core")]
    local_small: dict[tuple[str, str], Measure] = {}
    with Store(host_capacity=small_bytes + 64 * MiB) as store:
        for block, label in ((4 * KiB, "4 KiB"), (64 * KiB, "64 KiB")):
            local_small[label, "put_many"], local_small[label, "get_many"] = \
                small_blocks(r, store, "local", block, label, sizes.batches)
    compare_small(res, served_small, local_small)
    res.notes += [f"{name}: {row.values['how']}" for name, row in res.systems.items()]
    res.notes.append(f"Client and daemon share {len(os.sched_getaffinity(0))} CPU(s); the hammering clients, the "
                     f"daemon's threads and the measuring client compete for them.")
    return res


if __name__ == "__main__" and sys.argv[1:2] == ["hammer"]:
    sys.exit(_hammer(sys.argv[2], int(sys.argv[3])))
