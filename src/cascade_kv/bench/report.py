"""What ``cascade bench`` reports: figures beside their ceilings, as a rich table and as JSON.

A :class:`Figure` holds only measured numbers; the target is the one thing written
down in advance (it is the goal, not a result), and the verdict compares the two.

A verdict is taken from the spread of the repetitions, not from their median alone
(:func:`verdict`): on a shared machine one run decides nothing, so a target is passed
only when every repetition clears it, missed when none does, and "within noise" in
between. A store faster than its ceiling by more than :data:`BROKEN_CEILING` means
the ceiling is not the best this machine does: that is reported as a broken ceiling,
never as a pass. The suite's targets (:mod:`.suite.core`) use the same rule.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import format_size
from .ceilings import Spread

Verdict = Literal["pass", "within noise", "miss", "broken ceiling"]
"""What a figure's spread says of its target; the JSON's ``verdict`` field holds one of these (or null: no target)."""
BROKEN_CEILING = 1.05
"""A median ratio to a ceiling above this is a ceiling that is not one (5 %: more than the rep-to-rep noise of a
ceiling measured beside its figure, less than any gain a store could claim over the machine)."""
VERDICT_STYLE: dict[str | None, str] = {"pass": "[green]pass[/green]", "within noise": "[yellow]within noise[/yellow]",
                                        "miss": "[red]miss[/red]", "broken ceiling": "[red]broken ceiling[/red]",
                                        None: "-"}


def verdict(got: Spread, target: float | None, *, of_ceiling: bool, at_most: bool = False) -> Verdict | None:
    """The verdict of ``got`` (a figure, or its ratio to a baseline, over the reps) against ``target`` (at least
    this, or with ``at_most`` at most this, as a latency; ``None``: no target). ``of_ceiling``: ``got`` is a ratio
    to a ceiling, which it must not exceed by more than :data:`BROKEN_CEILING`, target or not. A figure of 0 (or
    one that is not a number) measured nothing: a miss, whatever its target."""
    if of_ceiling and not got.median <= BROKEN_CEILING:  # nan or inf too: a ceiling of 0 bounds nothing
        return "broken ceiling"
    if target is None:
        return None
    if not got.median > 0:
        return "miss"
    if at_most:
        if got.high <= target:
            return "pass"
        return "within noise" if got.low <= target else "miss"
    if got.low >= target:
        return "pass"
    return "within noise" if got.high >= target else "miss"


def ratio_spread(values: Sequence[float], bases: Sequence[float]) -> Spread:
    """``values / bases`` over the reps. Taken in turns (as every figure and its ceiling are), rep ``i`` of each met
    the same machine, so the ratios are taken pair by pair; with unequal counts, the widest the ranges allow.
    The median is the ratio of the medians (what the tables have always printed)."""
    median = _div(Spread.of(values).median, Spread.of(bases).median)
    if len(values) == len(bases):
        pairs = [_div(v, b) for v, b in zip(values, bases)]
        low, high = min(pairs), max(pairs)
    else:
        low, high = _div(min(values), max(bases)), _div(max(values), min(bases))
    return Spread(median, min(low, median), max(high, median), min(len(values), len(bases)))


@dataclass(frozen=True, slots=True)
class Target:
    """A figure's goal: at least ``value`` times its ceiling, or at least ``value`` in its own unit."""

    kind: Literal["ratio", "value"]
    value: float

    def text(self, unit: str) -> str:
        return f">= {self.value:g}x" if self.kind == "ratio" else f">= {_num(self.value, unit)}"


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured rate (median and range over reps), with the ceiling measured beside it."""

    key: str
    """Stable name in the JSON."""
    label: str
    unit: str
    """``GB/s`` or ``/s`` (operations per second)."""
    value: Spread
    ceiling: Spread | None = None
    ceiling_label: str = ""
    target: Target | None = None
    note: str = ""
    ratios: Spread | None = None
    """value / ceiling over the reps (:func:`ratio_spread`); without it, the widest the two ranges allow."""

    @property
    def ratio(self) -> float | None:
        return None if self.ceiling is None else self.ratio_range.median  # type: ignore[union-attr]

    @property
    def ratio_range(self) -> Spread | None:
        if self.ceiling is None:
            return None
        if self.ratios is not None:
            return self.ratios
        v, c = self.value, self.ceiling
        return Spread(_div(v.median, c.median), _div(v.low, c.high), _div(v.high, c.low), min(v.reps, c.reps))

    @property
    def verdict(self) -> Verdict | None:
        ratio = self.ratio_range
        if self.target is not None and self.target.kind == "ratio":
            return None if ratio is None else verdict(ratio, self.target.value, of_ceiling=True)
        broken = None if ratio is None else verdict(ratio, None, of_ceiling=True)
        if broken is not None or self.target is None:
            return broken
        return verdict(self.value, self.target.value, of_ceiling=False)

    @property
    def passed(self) -> bool | None:
        """The verdict as a yes or no (within noise is no pass); None with no verdict."""
        return None if self.verdict is None else self.verdict == "pass"

    def as_dict(self) -> dict[str, object]:
        r = self.ratio_range
        return {"label": self.label, "unit": self.unit, **self.value.as_dict(),
                "ceiling": None if self.ceiling is None else {"what": self.ceiling_label, **self.ceiling.as_dict()},
                "ratio": self.ratio, "ratio_min": None if r is None else r.low, "ratio_max": None if r is None else r.high,
                "target": None if self.target is None else {"kind": self.target.kind, "value": self.target.value},
                "verdict": self.verdict, "passed": self.passed, "note": self.note}


@dataclass(slots=True)
class Report:
    """Everything one run measured."""

    settings: dict[str, object]
    figures: list[Figure] = field(default_factory=list)
    mixed: dict[str, object] = field(default_factory=dict)
    open_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each store took to open (arena allocation and touch): never inside a timed pass."""
    reads_checked: int = 0
    reads_wrong: int = 0
    wall_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return run_header(self.settings) | {
            "settings": self.settings, "figures": {f.key: f.as_dict() for f in self.figures}, "mixed": self.mixed,
            "open_seconds": self.open_seconds, "reads_checked": self.reads_checked,
            "reads_wrong": self.reads_wrong, "wall_seconds": self.wall_seconds}

    def write_json(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.as_dict())


def run_header(settings: dict[str, object]) -> dict[str, object]:
    """What every benchmark's JSON starts with: the version, the command as typed (``cascade bench``'s
    relaunch passes it on to its ranks), and the machine, with the disk of ``settings["dir"]`` (the run's
    temporary directory, gone by now: its parent is asked)."""
    run_dir = settings.get("dir")
    return {"cascade_kv": _version("cascade-kv"),
            "command": os.environ.get("CASCADE_COMMAND") or shlex.join(sys.argv), "argv": sys.argv,
            "machine": machine() | ({"disk": disk(os.path.dirname(str(run_dir)))} if run_dir else {})}


def write_json(path: str | os.PathLike[str], data: dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def machine() -> dict[str, object]:
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cores": os.cpu_count(), "memory_bytes": pages * os.sysconf("SC_PAGE_SIZE"),
            "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "numpy": _version("numpy"), "blake3": _version("blake3"),
            "rich": _version("rich")}


def disk(path: str | os.PathLike[str]) -> dict[str, object]:
    """The file system a run's files live on: mount point, type, device, size, free space, and whether the
    kernel calls the device rotational (Linux; fields it cannot tell are left out)."""
    real = os.path.realpath(path)
    info: dict[str, object] = {"path": real}
    try:
        st = os.statvfs(real)
        info |= {"total_bytes": st.f_blocks * st.f_frsize, "free_bytes": st.f_bavail * st.f_frsize}
    except OSError:
        pass
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[:3] for line in f]
    except OSError:
        return info
    best = max((m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    if best is not None:
        device, mount, fstype = best
        info |= {"mount": mount, "filesystem": fstype, "device": device}
        name = os.path.basename(device)
        for candidate in (name, name.rstrip("0123456789"), name.rstrip("0123456789").removesuffix("p")):
            rotational = Path("/sys/block") / candidate / "queue" / "rotational"
            if rotational.exists():
                info["rotational"] = rotational.read_text().strip() == "1"
                break
    return info


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _div(a: float, b: float) -> float:
    """``a / b``, infinite for ``b == 0``: a ceiling of 0 is exceeded by anything (and reported as broken)."""
    return a / b if b else math.inf


def _num(x: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{x:.2f} GB/s"
    return f"{x:,.0f}{unit}"


def _spread(s: Spread, unit: str) -> str:
    lo, hi = (f"{s.low:.2f}", f"{s.high:.2f}") if unit == "GB/s" else (f"{s.low:,.0f}", f"{s.high:,.0f}")
    return f"{_num(s.median, unit)}\n[dim]{lo} - {hi}[/dim]"


def render(report: Report, console: Console) -> None:
    """Print the figures table, the mixed-workload table and the notes."""
    table = Table(title="cascade bench: single node (median of reps; range below; a verdict passes only when the "
                        "whole range clears its target)", show_lines=True)
    for col, just in (("measurement", "left"), ("cascade-kv", "right"), ("ceiling (same run)", "right"),
                      ("ratio", "right"), ("target", "right"), ("verdict", "center")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for f in report.figures:
        ceiling = "-" if f.ceiling is None else f"{_spread(f.ceiling, f.unit)}\n[dim]{f.ceiling_label}[/dim]"
        label = f.label + (f"\n[dim]{f.note}[/dim]" if f.note else "")
        r = f.ratio_range
        ratio = "-" if r is None else f"{r.median:.2f}x\n[dim]{r.low:.2f} - {r.high:.2f}[/dim]"
        table.add_row(label, _spread(f.value, f.unit), ceiling, ratio,
                      "-" if f.target is None else f.target.text(f.unit), VERDICT_STYLE[f.verdict])
    console.print(table)
    if report.mixed:
        console.print(_mixed_table(report.mixed))
    s = report.settings
    console.print("Store open (arena allocated and touched), apart from every timed figure: " + ", ".join(
        f"{name} {sec:.2f} s" for name, sec in report.open_seconds.items()))
    console.print("Cold reads: before each measured pass the files were fsynced and dropped from the page "
                  "cache with posix_fadvise(POSIX_FADV_DONTNEED), for the store and for the raw ceiling alike.")
    console.print(f"Sizes: block {format_size(s['block_size'])}, host tier {format_size(s['host_capacity'])}, "
                  f"{s['reps']} reps after warm-up; disk tier in {escape(str(s['dir']))} (removed).")
    colour = "green" if report.reads_wrong == 0 else "red"
    console.print(f"[{colour}]Reads checked against the written bytes: {report.reads_checked}, "
                  f"wrong: {report.reads_wrong}[/{colour}]. Wall time {report.wall_seconds:.1f} s.")


def _mixed_table(m: dict) -> Table:  # type: ignore[type-arg]
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
              f"the promoter thread's CPU time over the read phase (the reader's own: {m['reader_cpu_seconds']:.2f} s); "
              f"{m['disk_reads_hashed']} disk reads hashed (verify=auto: first read of a file)")
    t.add_row("hits per tier", ", ".join(f"{k} {v}" for k, v in m["hits_by_tier"].items()),
              "evictions: " + ", ".join(f"{k} {v}" for k, v in m["evictions_by_tier"].items()))
    t.add_row("dedup hits", str(m["dedup_hits"]), f"{format_size(m['dedup_bytes_saved'])} not stored again")
    t.add_row("prefix retention", f"{m['prefix_retention']:.0%}",
              f"{m['protected_in_memory']} of {m['protected_blocks']} prefix blocks in memory at the end")
    t.add_row("promotions", str(m["promotions"]), f"disk -> host, after {m['promotion_threshold']} reads from disk")
    t.add_row("demotions", str(m["demotions"]), "host -> disk, to make room")
    t.add_row("drops", str(m["drops"]), "blocks lost because the last tier was full")
    return t
