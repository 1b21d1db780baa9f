"""How an experiment's :class:`~.core.Result` looks: a rich table per experiment, the targets, the skips,
and (``--plot``) PNGs made with matplotlib."""
from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..peers.base import BENCH_EXTRA
from ..report import VERDICT_STYLE
from .core import Measure, Result, SuiteError, Target


def _cell(m: Measure | None) -> str:
    if m is None or not m.samples:
        return "-"
    if m.unit == "GB/s":
        text = f"{m.median:.2f} GB/s"
        spread = f"{min(m.samples):.2f} - {max(m.samples):.2f}" if len(m.samples) > 1 else ""
    elif m.unit == "us":
        text = f"{m.median:,.1f} us"
        spread = f"p99 {sorted(m.samples)[min(len(m.samples) - 1, int(0.99 * len(m.samples)))]:,.1f}" \
            if len(m.samples) > 1 else ""
    elif m.unit == "/s":
        text = f"{m.median:,.0f}/s"
        spread = f"{min(m.samples):,.0f} - {max(m.samples):,.0f}" if len(m.samples) > 1 else ""
    else:
        text = f"{m.median:,.3g} {m.unit}".strip()
        spread = f"{min(m.samples):,.3g} - {max(m.samples):,.3g}" if len(m.samples) > 1 else ""
    return text + (f"\n[dim]{spread}[/dim]" if spread else "")


def _got(t: Target) -> str:
    """What a target got, with its spread over the repetitions (the verdict is taken from the spread)."""
    if t.got is None:
        return ""
    fmt = (lambda x: f"{x:.2f}x") if t.than else (lambda x: f"{x:,.3g}")
    spread = f" (range {fmt(t.low)} - {fmt(t.high)})" if t.low is not None and t.high is not None else ""
    return f" — got {fmt(t.got)}{spread}"


def _figures_table(res: Result) -> Table:
    """One row per figure of :attr:`Result.rows`: the figure, its ceiling, their ratio, the goal, the verdict
    (the goal's, which :meth:`Result.judge` makes a broken ceiling when the figure beats its ceiling; the
    ceiling check's where there is no goal)."""
    table = Table(title=f"cascade bench {res.experiment}: {escape(res.title)} (median of reps; range below; a "
                        f"verdict passes only when the whole range clears its target)", show_lines=True)
    for col, just in (("measurement", "left"), ("cascade-kv", "right"), ("ceiling (same run)", "right"),
                      ("ratio", "right"), ("target", "right"), ("verdict", "center")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in res.rows:
        system = res.systems.get(row.system)
        m = None if system is None else system.measures.get(row.key)
        ceiling = res.ceilings.get(row.ceiling) if row.ceiling else None
        targets = res.targets_of(row)
        bound = next((t for t in targets if t.than), None)
        goal = next((t for t in targets if t.factor is not None), None)
        ratio = ("-" if bound is None or bound.got is None
                 else f"{bound.got:.2f}x\n[dim]{bound.low:.2f} - {bound.high:.2f}[/dim]")
        shown = (goal or bound).verdict if goal or bound else None
        label = escape(row.label) + (f"\n[dim]{escape(row.note)}[/dim]" if row.note else "")
        table.add_row(label, _cell(m), "-" if ceiling is None else f"{_cell(ceiling)}\n[dim]{escape(ceiling.what)}[/dim]",
                      ratio, "-" if goal is None else escape(goal.text), VERDICT_STYLE[shown])
    return table


def render(res: Result, console: Console, more: Callable[[Result, Console], None] | None = None) -> None:
    """The experiment's tables, targets and notes; ``more``: an experiment's own tables, before the last line."""
    if res.rows:
        console.print(_figures_table(res))
    if res.columns or not res.rows:
        console.print(_systems_table(res))
    for name, why in res.skipped.items():
        console.print(f"[yellow]{escape(name)} skipped: {escape(why)}[/yellow]")
    if res.ceilings and not res.rows:
        for key, m in res.ceilings.items():
            console.print(f"ceiling {escape(key)}: {_cell(m).splitlines()[0]}", markup=True)
    for t in res.targets:
        if res.rows and any(r.key == t.key and r.system == t.system for r in res.rows):
            continue  # in the figures table
        verdict = (VERDICT_STYLE[t.verdict] if t.verdict is not None
                   else f"[yellow]not judged[/yellow] ({escape(t.why)})")
        console.print(f"target: {escape(t.system)} {escape(t.text or t.key)}{_got(t)}: {verdict}")
    for note in res.notes:
        console.print(f"[dim]{escape(note)}[/dim]")
    if more is not None:
        more(res, console)
    style = "green" if res.reads_wrong == 0 else "red"
    console.print(f"[{style}]Reads checked against the written bytes, all ranks: {res.reads_checked}, wrong: "
                  f"{res.reads_wrong}.[/{style}] Wall time {res.wall_seconds:.1f} s.")


def _systems_table(res: Result) -> Table:
    table = Table(title=f"cascade bench {res.experiment}: {escape(res.title)} (median; range below; a target "
                        f"passes only when its whole range clears it)", show_lines=True)
    table.add_column("system")
    for _, title in res.columns:
        table.add_column(escape(title), justify="right")
    table.add_column("setup (apart)", justify="right")
    for name, sysres in res.systems.items():
        cells = []
        for key, _ in res.columns:
            if key in sysres.measures:
                cells.append(_cell(sysres.measures[key]))
            elif key in sysres.values:
                cells.append(escape(str(sysres.values[key])))
            else:
                cells.append("-")
        table.add_row(escape(name), *cells, f"{sysres.setup_seconds:.2f} s")
    for name in res.skipped:  # the reason goes below the table: a narrow cell would cut the install command
        table.add_row(f"[dim]{escape(name)}[/dim]", "[yellow]skipped (below)[/yellow]", *[""] * len(res.columns))
    for name, why in res.failed.items():
        table.add_row(f"[red]{escape(name)}[/red]", f"[red]failed: {escape(why)}[/red]", *[""] * len(res.columns))
    return table


def plot_unavailable() -> str | None:
    """Why :func:`plot` cannot draw here (matplotlib comes with the ``[bench]`` extra), or ``None``. The CLI
    asks before an experiment runs, so a missing library costs no run."""
    try:
        import matplotlib  # noqa: F401 - imported, not just found: an import that fails is as missing
    except ImportError as e:
        return f"--plot needs matplotlib, which cannot be imported here ({e}): {BENCH_EXTRA}"
    return None


def plot(res: Result, directory: Path) -> list[Path]:
    """The charts of an experiment, as PNGs in ``directory``; the paths. One bar chart per table column
    (systems side by side, median with range as error bars), and where the data is there: throughput vs
    ranks (strong/weak), reads served per tier (stacked), and the CDF of prefix-load times (trace). Without
    matplotlib a :class:`SuiteError` naming the extra to install."""
    missing = plot_unavailable()
    if missing is not None:
        raise SuiteError(missing)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in res.columns:
        rows = [(n, s.measures[key]) for n, s in res.systems.items() if key in s.measures and s.measures[key].samples]
        if not rows:
            continue
        names = [n for n, _ in rows]
        med = [m.median for _, m in rows]
        lo = [m.median - min(m.samples) for _, m in rows]
        hi = [max(m.samples) - m.median for _, m in rows]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.6))
        ax.bar(names, med, yerr=[lo, hi], capsize=4, color="#4C72B0")
        ax.set_ylabel(rows[0][1].unit)
        ax.set_title(f"{res.experiment}: {title} ({res.ranks} rank{'s' if res.ranks > 1 else ''})", fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
        if all(math.isfinite(v) for v in med):
            ax.set_ylim(0, max(m + h for m, h in zip(med, hi)) * 1.15 or 1)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
        path = directory / f"{res.experiment}-{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    written += _scaling_plot(res, directory, plt) + _tier_plot(res, directory, plt) + _cdf_plot(res, directory, plt)
    return written


def _ranks_of(key: str, prefix: str) -> int | None:
    if key.startswith(prefix + "[") and key.endswith("]") and key[len(prefix) + 1:-1].isdigit():
        return int(key[len(prefix) + 1:-1])
    return None


def _scaling_plot(res: Result, directory: Path, plt: Any) -> list[Path]:
    """Aggregate throughput against ranks, one line per system (measures named ``read_GBps[k]``)."""
    out = []
    for prefix in ("read_GBps", "write_GBps"):
        lines = {}
        for name, s in res.systems.items():
            points = sorted((k, m.median) for key, m in s.measures.items()
                            if (k := _ranks_of(key, prefix)) is not None and m.samples)
            if len(points) > 1:
                lines[name] = points
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, points in lines.items():
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xlabel("ranks")
        ax.set_ylabel("GB/s (aggregate)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{res.experiment}: {prefix.split('_')[0]} throughput vs ranks", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / f"{res.experiment}-{prefix}-vs-ranks.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _tier_plot(res: Result, directory: Path, plt: Any) -> list[Path]:
    """Reads served per tier, stacked, for the systems that can tell (``values["tier_hits"]`` a dict)."""
    rows = {n: s.values["tier_hits"] for n, s in res.systems.items() if isinstance(s.values.get("tier_hits"), dict)}
    if not rows:
        return []
    tiers = list(dict.fromkeys(t for hits in rows.values() for t in hits))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.8))
    bottom = [0.0] * len(rows)
    for tier in tiers:
        values = [float(hits.get(tier, 0)) for hits in rows.values()]
        ax.bar(list(rows), values, bottom=bottom, label=tier)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("reads served")
    ax.set_title(f"{res.experiment}: reads served per tier", fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / f"{res.experiment}-tier-hits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _cdf_plot(res: Result, directory: Path, plt: Any) -> list[Path]:
    """The distribution of prefix-load times per system (``values["prefix_load_ms"]``: every request's)."""
    rows = {n: s.values["prefix_load_ms"] for n, s in res.systems.items() if s.values.get("prefix_load_ms")}
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, samples in rows.items():
        xs = sorted(samples)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("prefix load time per request (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{res.experiment}: prefix-load time CDF", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / f"{res.experiment}-prefix-load-cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
