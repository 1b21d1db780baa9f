"""How a figure is judged against its target, and what every benchmark's JSON says of the run and the machine.

The figures themselves live in the suite's :class:`~.suite.core.Result`, one report type for every
experiment, the main job included; this module holds the rule they are judged by.

A verdict is taken from the spread of the repetitions, not from their median alone
(:func:`verdict`): on a shared machine one run decides nothing, so a target is passed
only when every repetition clears it, missed when none does, and "within noise" in
between. A store faster than its ceiling by more than :data:`BROKEN_CEILING` means
the ceiling is not the best this machine does: that is reported as a broken ceiling,
never as a pass.
"""
from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Literal

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
