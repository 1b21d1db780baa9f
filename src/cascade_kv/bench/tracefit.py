"""Fitting the store's reuse credit on one part of the data and judging it on another.

:class:`~cascade_kv.policy.ReuseCredit` has two constants (how much longer a block read once, and a block read
twice or more, stays in memory than one never read). Scoring them on the data they were chosen on flatters
them, so they are chosen here (:func:`fit`) on some traces and judged (:func:`judge`) on others, by the offline
simulator (:mod:`~cascade_kv.bench.tracesim`, which the one-rank store matches) at 1/8, 1/4 and 1/2 of each
trace's distinct blocks.

A trace part is named by a spec (:func:`load_part`):

- ``PATH`` (``shipped``: the shipped trace), ``PATH@first`` or ``PATH@second``: a file, or the first or second
  half of its requests in arrival order (:func:`halves`: disjoint, together the whole file);
- ``conversation:seed=N[,FIELD=VALUE...]``: a trace made by :mod:`~cascade_kv.bench.tracegen` with those
  :class:`~cascade_kv.bench.tracegen.ConversationShape` fields.

Each part is replayed on its own, from a cold cache. The fit's rule: of the credits in :data:`GRID`, those
never below LRU in any (part, capacity) of the fitting data; of these, the one closing the largest mean share
of the LRU-to-Belady gap (ties: the smaller credits). Below LRU is what a default must never be; the share of
the gap is the goal.

    python -m cascade_kv.bench.tracefit fit shipped@first conversation:seed=1,think_s=150
    python -m cascade_kv.bench.tracefit judge --credit 1,0.5 shipped@second
    python -m cascade_kv.bench.tracefit heldout            # FIT_PARTS, then JUDGE_PARTS: the store's default
    python -m cascade_kv.bench.tracefit heldout --fit shipped@second --judge shipped@first   # another split
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

from ..errors import InvalidArgument
from ..policy import ReuseCredit
from . import tracegen
from .trace import DEFAULT_TRACE, Request, Trace, load_trace
from .tracesim import LRU, Reads, belady, reads_of, simulate
from .tracesim import ReuseCredit as SimCredit

FRACTIONS = (1 / 8, 1 / 4, 1 / 2)
"""Capacities judged, as fractions of a part's distinct blocks (the issue's)."""
GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
"""Credits tried for each read class, in tier capacities of traffic (0 is plain LRU)."""
FIT_PARTS = ("shipped@first", "conversation:seed=1,think_s=150", "conversation:seed=3,think_s=400,turns=6")
"""What the store's default credit was fitted on: the first half of the shipped trace and two generated
conversation traces (:mod:`~cascade_kv.bench.tracegen`), so that a credit good for one shape and harmful to the
other is not chosen."""
JUDGE_PARTS = ("shipped@second", "conversation:seed=2,think_s=300,turns=5,sessions=800",
               "conversation:seed=4,think_s=60,turns=2.5,sessions=1500",
               "conversation:seed=6,system_prompts=1,first_tokens=8000,turns=1.5,sessions=2500")
"""What it is judged on: the other half of the shipped trace and conversation traces of other seeds and shapes
(longer or shorter pauses and sessions; one system prompt and long first messages)."""


def halves(trace: Trace) -> tuple[Trace, Trace]:
    """The first and second half of the requests in arrival order (the first has the odd one out)."""
    n = (len(trace.requests) + 1) // 2
    return (Trace(trace.requests[:n], f"{trace.source}@first"), Trace(trace.requests[n:], f"{trace.source}@second"))


def load_part(spec: str) -> Trace:
    """The trace part a spec names (module docstring); a bad spec raises :class:`InvalidArgument`."""
    if spec.startswith("conversation:"):
        return _generated(spec)
    path, _, half = spec.partition("@")
    if half not in ("", "first", "second"):
        raise InvalidArgument(f"{spec!r}: the part after '@' must be 'first' or 'second', got {half!r}")
    trace = load_trace(DEFAULT_TRACE if path == "shipped" else path)
    if half:
        trace = halves(trace)[half == "second"]
    return Trace(trace.requests, spec)


def _generated(spec: str) -> Trace:
    kinds = {f.name: type(getattr(tracegen.ConversationShape(), f.name)) for f in fields(tracegen.ConversationShape)}
    seed, shape = None, {}
    for item in filter(None, spec.removeprefix("conversation:").split(",")):
        name, _, value = item.partition("=")
        if name != "seed" and name not in kinds:
            raise InvalidArgument(f"{spec!r}: unknown field {name!r}; known: seed, {', '.join(kinds)}")
        try:
            if name == "seed":
                seed = int(value)
            else:
                shape[name] = kinds[name](value)
        except ValueError as e:
            raise InvalidArgument(f"{spec!r}: {name}={value!r}: {e}") from None
    if seed is None:
        raise InvalidArgument(f"{spec!r}: a generated trace needs seed=N")
    try:
        made = tracegen.conversations(tracegen.ConversationShape(**shape), seed)
    except ValueError as e:
        raise InvalidArgument(f"{spec!r}: {e}") from None
    return Trace(tuple(Request(r["timestamp"], r["input_length"], r["output_length"], tuple(r["hash_ids"]))
                       for r in made), spec)  # type: ignore[arg-type] - the generator's own fields


@dataclass(frozen=True, slots=True)
class Cell:
    """One part at one capacity: LRU, Belady and the credit's hit rates."""

    part: str
    fraction: float
    capacity: int  # blocks
    lru: float
    belady: float
    hit: float

    @property
    def closed(self) -> float:
        """Share of the LRU-to-Belady gap closed (NaN where there is no gap)."""
        return (self.hit - self.lru) / (self.belady - self.lru) if self.belady > self.lru else math.nan


class _Bench:
    """Parts flattened once, with LRU and Belady at each capacity, for scoring many credits."""

    def __init__(self, parts: Sequence[Trace], fractions: Sequence[float]) -> None:
        self.cases: list[tuple[str, float, int, Reads, float, float]] = []
        for part in parts:
            reads = reads_of(part)
            for f in fractions:
                cap = int(reads.distinct * f)
                self.cases.append((part.source, f, cap, reads, simulate(reads, LRU(cap)).hit_rate,
                                   belady(reads, cap).hit_rate))

    def score(self, credit: ReuseCredit) -> list[Cell]:
        return [Cell(name, f, cap, lru, opt,
                     simulate(reads, SimCredit(cap, first=credit.never_read, second=credit.read_once,
                                               later=credit.read_twice_or_more)).hit_rate)
                for name, f, cap, reads, lru, opt in self.cases]


def judge(parts: Sequence[Trace], credit: ReuseCredit, fractions: Sequence[float] = FRACTIONS) -> list[Cell]:
    """``credit`` against LRU and Belady on every part at every capacity."""
    return _Bench(parts, fractions).score(credit)


@dataclass(frozen=True, slots=True)
class Fit:
    credit: ReuseCredit
    cells: list[Cell]  # the chosen credit on the fitting data
    never_below_lru: bool  # some credit of the grid stayed at or above LRU everywhere (else: the best worst case)


def fit(parts: Sequence[Trace], fractions: Sequence[float] = FRACTIONS, grid: Sequence[float] = GRID) -> Fit:
    """The credit the fit's rule (module docstring) picks on ``parts``."""
    if not parts:
        raise InvalidArgument("fit needs at least one trace part")
    bench = _Bench(parts, fractions)
    scored = [(c, bench.score(c)) for c in (ReuseCredit(0.0, a, b) for a, b in itertools.product(grid, grid))]

    def worst(cells: list[Cell]) -> float:
        return min(c.hit - c.lru for c in cells)

    def mean_closed(cells: list[Cell]) -> float:
        return statistics.fmean(0.0 if math.isnan(c.closed) else c.closed for c in cells)

    safe = [s for s in scored if worst(s[1]) >= 0]
    if safe:  # max() keeps the first of equals: the grid runs from small credits up
        credit, cells = max(safe, key=lambda s: mean_closed(s[1]))
    else:
        credit, cells = max(scored, key=lambda s: worst(s[1]))
    return Fit(credit, cells, bool(safe))


def _fraction(f: float) -> str:
    return f"1/{round(1 / f)}" if abs(1 / f - round(1 / f)) < 1e-9 else f"{f:g}"


def format_cells(cells: Sequence[Cell]) -> str:
    lines = [f"{'part':<52}{'memory':>8}{'LRU':>8}{'Belady':>8}{'credit':>8}{'gap':>9}"]
    for c in cells:
        closed = "-" if math.isnan(c.closed) else f"{c.closed:+.0%}"
        lines.append(f"{c.part[-52:]:<52}{_fraction(c.fraction):>8}{c.lru:>8.4f}{c.belady:>8.4f}"
                     f"{c.hit:>8.4f}{closed:>9}")
    return "\n".join(lines)


def _credit(text: str) -> ReuseCredit:
    try:
        once, more = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected READ_ONCE,READ_TWICE_OR_MORE, got {text!r}") from None
    return ReuseCredit(0.0, once, more)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cascade_kv.bench.tracefit", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("fit", help="choose the credit on these parts").add_argument("parts", nargs="+")
    j = sub.add_parser("judge", help="score a credit (default: the store's) on these parts")
    j.add_argument("parts", nargs="+")
    j.add_argument("--credit", type=_credit, default=ReuseCredit(), metavar="ONCE,MORE")
    h = sub.add_parser("heldout", help="fit on some parts, judge on others (default: how the store's default was "
                                       "chosen, FIT_PARTS and JUDGE_PARTS)")
    h.add_argument("--fit", nargs="+", default=list(FIT_PARTS), dest="fit_parts")
    h.add_argument("--judge", nargs="+", default=list(JUDGE_PARTS), dest="judge_parts")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.command in ("fit", "heldout"):
        fitted = fit([load_part(s) for s in (args.parts if args.command == "fit" else args.fit_parts)])
        c = fitted.credit
        print(f"fitted: ReuseCredit(never_read={c.never_read:g}, read_once={c.read_once:g}, "
              f"read_twice_or_more={c.read_twice_or_more:g})"
              + ("" if fitted.never_below_lru else "  (no credit of the grid stays at or above LRU everywhere)"))
        print(format_cells(fitted.cells))
        if args.command == "heldout":
            print("held out:")
            print(format_cells(judge([load_part(s) for s in args.judge_parts], c)))
    else:
        print(f"credit: {args.credit}")
        print(format_cells(judge([load_part(s) for s in args.parts], args.credit)))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
