"""What a figure's verdict means, in both report types: a target passes only when the whole spread of its
repetitions clears it, a figure above its ceiling is a broken ceiling (never a pass), a figure of 0 fails.
Constructed samples only: nothing is timed."""
from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from cascade_kv.bench.ceilings import Spread, best_of
from cascade_kv.bench.report import Figure, Report, Target, ratio_spread, render, verdict
from cascade_kv.bench.suite import render as suite_render
from cascade_kv.bench.suite.core import Measure, Result, SystemResult, turns
from cascade_kv.bench.suite.core import Target as SuiteTarget


@pytest.mark.parametrize(("samples", "expected"), [
    ([0.95, 1.0, 1.1], "pass"),  # every rep clears 0.9
    ([0.85, 0.95, 1.0], "within noise"),  # the range straddles 0.9
    ([0.7, 0.8, 0.89], "miss"),  # no rep reaches it
    ([0.0, 0.0, 0.0], "miss"),  # a figure of 0 measured nothing
])
def test_the_spread_decides_against_a_target(samples: list[float], expected: str) -> None:
    assert verdict(Spread.of(samples), 0.9, of_ceiling=False) == expected


def test_a_figure_of_0_fails_even_a_target_of_0() -> None:
    assert verdict(Spread.of([0.0, 0.0]), 0.0, of_ceiling=False) == "miss"
    assert verdict(Spread.of([0.5]), 0.0, of_ceiling=False) == "pass"


@pytest.mark.parametrize(("ratio", "expected"), [(1.06, "broken ceiling"), (1.6, "broken ceiling"),
                                                 (math.inf, "broken ceiling"), (math.nan, "broken ceiling"),
                                                 (1.05, "pass"), (0.95, "pass")])
def test_a_ratio_above_1_05_to_a_ceiling_is_a_broken_ceiling(ratio: float, expected: str) -> None:
    assert verdict(Spread(ratio, ratio, ratio, 3), 0.8, of_ceiling=True) == expected
    assert verdict(Spread(ratio, ratio, ratio, 3), None, of_ceiling=True) == (expected if expected != "pass" else None)


def test_ratios_are_taken_rep_by_rep() -> None:
    # the machine slowed down in rep 2 for both: pair by pair the store is always 0.95x; the ranges alone overlap
    got = ratio_spread([1.9, 0.95, 1.9], [2.0, 1.0, 2.0])
    assert (got.low, got.high) == pytest.approx((0.95, 0.95)) and got.median == pytest.approx(0.95)
    uneven = ratio_spread([1.0, 2.0], [1.0, 2.0, 4.0])  # counts differ: the widest the ranges allow
    assert (uneven.low, uneven.high) == pytest.approx((0.25, 2.0))


# ---------------------------------------------------------------------- cascade bench (single node)
def _figure(value: list[float], ceiling: list[float] | None, target: Target | None) -> Figure:
    return Figure("x", "x", "GB/s", Spread.of(value), None if ceiling is None else Spread.of(ceiling), "ceiling",
                  target, ratios=None if ceiling is None else ratio_spread(value, ceiling))


def test_a_figure_above_its_ceiling_is_a_broken_ceiling_not_a_pass() -> None:
    f = _figure([16.0, 16.0, 16.0], [10.0, 10.0, 10.0], Target("ratio", 0.8))  # the 1.60x host get of issue 13
    assert f.verdict == "broken ceiling" and f.passed is False
    # with a target in its own unit too: the ceiling is still not one
    assert _figure([16.0], [10.0], Target("value", 1.0)).verdict == "broken ceiling"
    assert _figure([16.0], [10.0], None).verdict == "broken ceiling"
    assert _figure([10.4], [10.0], Target("ratio", 0.8)).verdict == "pass"  # within 5 %: noise, not broken


def test_figure_verdicts_and_their_json() -> None:
    assert _figure([0.85, 0.95, 1.0], [1.0, 1.0, 1.0], Target("ratio", 0.9)).verdict == "within noise"
    assert _figure([0.5, 0.6, 0.7], [1.0, 1.0, 1.0], Target("ratio", 0.9)).verdict == "miss"
    assert _figure([0.0, 0.0], [1.0, 1.0], Target("ratio", 0.5)).verdict == "miss"  # a figure of 0
    assert _figure([0.0, 0.0], None, Target("value", 0.0)).verdict == "miss"
    assert _figure([3.0, 3.5], None, Target("value", 3.0)).verdict == "pass"
    assert _figure([2.0], None, None).verdict is None
    d = _figure([0.85, 0.95, 1.0], [1.0, 1.0, 1.0], Target("ratio", 0.9)).as_dict()
    assert d["verdict"] == "within noise" and d["passed"] is False  # within noise is no pass
    assert (d["ratio_min"], d["ratio"], d["ratio_max"]) == pytest.approx((0.85, 0.95, 1.0))
    json.dumps(d)


def test_the_single_node_table_shows_the_spread_and_the_verdicts() -> None:
    report = Report(settings={"block_size": 1 << 20, "host_capacity": 1 << 25, "reps": 3, "dir": "/nonexistent"})
    report.figures = [_figure([16.0, 16.0], [10.0, 10.0], Target("ratio", 0.8)),
                      _figure([0.85, 0.95], [1.0, 1.0], Target("ratio", 0.9))]
    out = io.StringIO()
    render(report, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "broken ceiling" in text and "within noise" in text and "0.85 - 0.95" in text


# ---------------------------------------------------------------------- cascade bench <experiment>
def _result(**systems: list[float]) -> Result:
    res = Result("x", "x", 1)
    for name, samples in systems.items():
        res.systems[name] = SystemResult(name, measures={"rate": Measure("GB/s", samples)})
    return res


def test_suite_targets_take_their_verdict_from_the_spread() -> None:
    res = _result(a=[0.95, 1.0, 1.05], b=[1.0, 1.0, 1.0], zero=[0.0, 0.0, 0.0])
    res.ceilings["raw"] = Measure("GB/s", [0.5, 0.5, 0.5])
    res.targets = [SuiteTarget("a", "rate", 0.9, "b"), SuiteTarget("a", "rate", 1.0, "b"),
                   SuiteTarget("a", "rate", 1.2, "b"), SuiteTarget("a", "rate", 0.8, "raw"),
                   SuiteTarget("zero", "rate", 0.5, "b"), SuiteTarget("zero", "rate", 0.0),
                   SuiteTarget("a", "rate", 0.9), SuiteTarget("a", "rate", 1.0, "missing")]
    res.judge()
    assert [t.verdict for t in res.targets] == ["pass", "within noise", "miss", "broken ceiling", "miss", "miss",
                                                "pass", None]
    assert [t.passed for t in res.targets] == [True, False, False, False, False, False, True, None]
    assert (res.targets[1].low, res.targets[1].got, res.targets[1].high) == pytest.approx((0.95, 1.0, 1.05))
    assert res.targets[3].got == pytest.approx(2.0)  # a's 1.0 against a "ceiling" of 0.5
    listed = res.as_dict([])["targets"]
    assert [t["verdict"] for t in listed] == [t.verdict for t in res.targets]
    assert {"min", "max", "got", "passed", "why"} <= set(listed[0])
    json.dumps(listed)


def test_a_system_beating_another_system_is_no_broken_ceiling() -> None:
    res = _result(a=[2.0], b=[1.0])
    res.targets = [SuiteTarget("a", "rate", 0.9, "b")]
    res.judge()
    assert res.targets[0].verdict == "pass"


def test_an_experiment_with_its_own_rule_still_sets_a_verdict() -> None:
    t = SuiteTarget("a", "rate", 1.0)
    t.passed = False  # engine/serve judge latencies that must stay under a figure this way
    assert t.verdict == "miss" and t.passed is False
    t.passed = True
    assert t.verdict == "pass"


def test_the_suite_prints_each_verdict_with_its_range() -> None:
    res = _result(a=[0.95, 1.0, 1.05], b=[1.0, 1.0, 1.0])
    res.ceilings["raw"] = Measure("GB/s", [0.5, 0.5, 0.5])
    res.targets = [SuiteTarget("a", "rate", 1.0, "b", "a against b"), SuiteTarget("a", "rate", 0.8, "raw", "ceiling")]
    res.judge()
    out = io.StringIO()
    suite_render.render(res, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "got 1.00x (range 0.95x - 1.05x): within noise" in text
    assert "got 2.00x (range 1.90x - 2.10x): broken ceiling" in text


def test_systems_take_their_turns_in_rotation() -> None:
    names = ["a", "b", "c"]
    orders = [turns(names, rep) for rep in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert turns([], 2) == []


def test_a_ceiling_is_the_best_way_each_rep() -> None:
    rates = {"one thread": [10.0, 9.0, 10.0], "two threads": [14.0, 8.0, 15.0]}
    best, won = best_of(rates, list(rates))
    assert best == [14.0, 9.0, 15.0] and won == "two threads"
