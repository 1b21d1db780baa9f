"""``cascade bench all``: every experiment of the suite in turn, each at the rank count the issue states.

Each experiment runs as its own ``cascade bench <experiment>`` process (a fresh MPI job when it needs
ranks), so one failing or killed experiment does not take the others down, and each starts from a cold
process as it would when run alone. Their JSON results are gathered into one file, and one table at
the end lists every target with its verdict.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..report import VERDICT_STYLE

RUNS: tuple[tuple[str, int], ...] = (
    ("store", 1), ("store", 2), ("contention", 2), ("strong", 4), ("weak", 4), ("cold", 1), ("hot-prefix", 4),
    ("rma", 2), ("models", 1), ("trace", 1), ("serve", 1), ("engine", 1))
"""Each experiment at the rank count its figures are stated for: the main job first (``cascade bench`` and
``cascade bench --ranks 2``), then the seed's evaluation in the issues' order."""

PASSED_ON = ("systems", "scale", "model", "requests", "trace", "o_direct", "quick", "dir", "block_size",
             "host_capacity")
"""Options of ``cascade bench all`` handed on to every experiment (``--json``, ``--plot``, ``--ranks`` are its own)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    experiment: str
    ranks: int
    code: int  # the experiment's exit status
    seconds: float
    result: dict | None  # its JSON, when it wrote one


def experiment_argv(name: str, ranks: int, options: dict[str, object], json_path: Path,
                    plot: Path | None) -> list[str]:
    """The command line of one experiment: the options of :data:`PASSED_ON` that were given, plus its own."""
    passed: list[str] = []
    for key in PASSED_ON:
        value = options.get(key)
        if value is None or value is False:
            continue
        passed.append("--" + key.replace("_", "-"))
        if value is not True:
            passed.append(str(value))
    cmd = [sys.executable, "-m", "cascade_kv.cli", "bench", name, *passed, "--json", str(json_path)]
    if ranks > 1:
        cmd += ["--ranks", str(ranks)]
    if plot is not None:
        cmd += ["--plot", str(plot / name)]
    return cmd


def run_all(options: dict[str, object], ranks: int | None, json_path: Path | None, plot: Path | None,
            console: Console) -> int:
    """Run every experiment; 1 if any failed or read a wrong byte, else 0."""
    outcomes: list[Outcome] = []
    runs = list(dict.fromkeys((name, max(2, ranks) if name == "rma" else ranks) for name, _ in RUNS)
                if ranks is not None else RUNS)  # rma's subject is another process's memory: 2 ranks at least
    with tempfile.TemporaryDirectory(prefix="cascade-bench-all-") as tmp:
        for name, n in runs:
            out = Path(tmp) / f"{name}-{n}.json"
            cmd = experiment_argv(name, n, options, out, plot)
            console.rule(f"cascade bench {name}" + (f" --ranks {n}" if n > 1 else ""))
            t0 = time.perf_counter()
            code = subprocess.call(cmd)
            result = json.loads(out.read_text()) if out.exists() else None
            outcomes.append(Outcome(name, n, code, time.perf_counter() - t0, result))
    console.print(summary(outcomes))
    if json_path is not None:
        twice = {o.experiment for o in outcomes if sum(p.experiment == o.experiment for p in outcomes) > 1}
        json_path.write_text(json.dumps({result_key(o, twice): o.result or {"exit_code": o.code} for o in outcomes},
                                        indent=2, default=str) + "\n")
        console.print(f"Figures of every experiment written to {json_path}")
    return 1 if any(o.code != 0 for o in outcomes) else 0


def result_key(o: Outcome, twice: set[str]) -> str:
    """An experiment's key in the gathered JSON: its name, with its rank count where it ran at several
    (``store`` and ``store --ranks 2``)."""
    return f"{o.experiment} --ranks {o.ranks}" if o.experiment in twice and o.ranks > 1 else o.experiment


def summary(outcomes: Sequence[Outcome]) -> Table:
    """One row per target of every experiment (or per experiment that failed)."""
    t = Table(title="cascade bench all: every target, every experiment")
    for col in ("experiment", "ranks", "system", "target", "got", "verdict"):
        t.add_column(col)
    for o in outcomes:
        targets = (o.result or {}).get("targets", [])
        if o.code != 0 or o.result is None:
            t.add_row(o.experiment, str(o.ranks), "", f"exit status {o.code}", "", "[red]failed[/red]")
        for tg in targets:
            # the verdict the experiment reached from its spread (report.verdict); a result written before
            # verdicts existed has only its yes/no
            verdict = (VERDICT_STYLE.get(tg["verdict"], str(tg["verdict"])) if tg.get("verdict") is not None
                       else "-" if tg.get("passed") is None and "verdict" in tg
                       else "[green]pass[/green]" if tg.get("passed") else "[red]miss[/red]")
            got = tg.get("got")
            t.add_row(o.experiment, str(o.ranks), tg.get("system", ""), tg.get("text", ""),
                      f"{got:.3g}" if isinstance(got, float) else str(got), verdict)
        if not targets and o.result is not None:
            t.add_row(o.experiment, str(o.ranks), "", "(no target: figures only)", "", "")
    return t
