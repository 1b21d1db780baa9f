"""What a figure's verdict means, in the figures table (the store experiment) and the systems table (the others):
a target passes only when the whole spread of its repetitions clears it, a figure above its ceiling is a broken
ceiling (never a pass), a figure of 0 fails. Constructed samples only: nothing is timed."""
from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from cascade_kv.bench.ceilings import Spread, best_of
from cascade_kv.bench.report import ratio_spread, verdict
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


# ---------------------------------------------------------------------- cascade bench (the figures table)
def _figure(samples: list[float], ceiling: list[float] | None = None, target: float | None = None, *,
            of_ceiling: bool = True, at_most: bool = False) -> tuple[Result, list[str | None]]:
    """One row of the store experiment's figures table, judged: the result and its targets' verdicts (the
    check against its ceiling first, where it has one, then its goal)."""
    res = Result("store", "x", 1)
    row = res.figure("x", "x", "GB/s", samples, ceiling=ceiling, target=target, of_ceiling=of_ceiling,
                     at_most=at_most)
    res.judge()
    return res, [t.verdict for t in res.targets_of(row)]


def _table(res: Result) -> str:
    out = io.StringIO()
    suite_render.render(res, Console(file=out, width=250, color_system=None))
    return out.getvalue()


def test_a_figure_above_its_ceiling_is_a_broken_ceiling_not_a_pass() -> None:
    res, verdicts = _figure([16.0, 16.0, 16.0], [10.0, 10.0, 10.0], 0.8)  # the 1.60x host get of issue 13
    assert verdicts == ["broken ceiling"] and res.targets[0].passed is False
    assert _figure([16.0], [10.0])[1] == ["broken ceiling"]  # no goal: the ceiling is still checked
    assert _figure([10.4], [10.0], 0.8)[1] == ["pass"]  # within 5 %: noise, not broken
    # with a goal in its own unit, which it meets: the goal is judged broken too (JSON and table), not passed
    res, verdicts = _figure([16.0], [10.0], 1.0, of_ceiling=False)
    assert verdicts == ["broken ceiling", "broken ceiling"] and not any(t.passed for t in res.targets)
    row = next(line for line in _table(res).splitlines() if line.startswith("│ x "))
    assert "broken ceiling" in row and "pass" not in row


def test_figure_verdicts_and_their_json() -> None:
    assert _figure([0.85, 0.95, 1.0], [1.0, 1.0, 1.0], 0.9)[1] == ["within noise"]
    assert _figure([0.5, 0.6, 0.7], [1.0, 1.0, 1.0], 0.9)[1] == ["miss"]
    assert _figure([0.0, 0.0], [1.0, 1.0], 0.5)[1] == ["miss"]  # a figure of 0 measured nothing
    assert _figure([0.0, 0.0], None, 0.0, of_ceiling=False)[1] == ["miss"]
    assert _figure([3.0, 3.5], None, 3.0, of_ceiling=False)[1] == ["pass"]  # a goal in its own unit
    assert _figure([3.0, 3.5], [4.0, 4.0], 3.2, of_ceiling=False)[1] == [None, "within noise"]
    assert _figure([1.0, 2.0], None, 2.5, at_most=True)[1] == ["pass"]  # a latency: at most
    assert _figure([1.0, 2.0], None, 1.5, at_most=True)[1] == ["within noise"]
    assert _figure([2.0], None, None)[1] == []  # neither ceiling nor goal: nothing to judge
    res, _ = _figure([0.85, 0.95, 1.0], [1.0, 1.0, 1.0], 0.9)
    data = json.loads(json.dumps(res.as_dict([])))
    (t,) = data["targets"]
    assert t["verdict"] == "within noise" and t["passed"] is False  # within noise is no pass
    assert (t["min"], t["got"], t["max"]) == pytest.approx((0.85, 0.95, 1.0))
    assert (t["key"], t["than"], t["factor"]) == ("x", "x", 0.9)  # the figure, its ceiling, the goal
    assert data["systems"]["cascade-kv"]["x"]["median"] == pytest.approx(0.95)
    assert data["ceilings"]["x"]["median"] == pytest.approx(1.0)
    assert data["rows"] == [{"key": "x", "label": "x", "ceiling": "x", "note": "", "system": "cascade-kv"}]


def test_the_figures_table_shows_the_spread_and_the_verdicts() -> None:
    res = Result("store", "one node", 1)
    res.figure("host_get", "get, host tier", "GB/s", [16.0, 16.0], ceiling=[10.0, 10.0], ceiling_what="copy",
               target=0.8)
    res.figure("disk_get_hot", "get, disk tier", "GB/s", [0.85, 0.95], ceiling=[1.0, 1.0],
               ceiling_what="file reads", target=0.9, note="0 of 8 reads hashed")
    res.figure("batch_get_4k", "get_many", "/s", [400_000.0, 600_000.0], ceiling=[1e6, 1e6],
               ceiling_what="np.copyto per block", target=500_000, of_ceiling=False)
    res.judge()
    text = _table(res)
    assert "broken ceiling" in text and "within noise" in text and "0.85 - 0.95" in text
    assert ">= 0.9x its ceiling" in text and ">= 500,000 /s" in text and "0 of 8 reads hashed" in text
    assert "file reads" in text and "400,000 - 600,000" in text
    assert "target:" not in text  # each row's targets are in its row, not repeated below the table


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
    # a's rate is 2x its ceiling "raw": its goal in its own unit (0.9) is judged broken with it, not passed
    assert [t.verdict for t in res.targets] == ["pass", "within noise", "miss", "broken ceiling", "miss", "miss",
                                                "broken ceiling", None]
    assert [t.passed for t in res.targets] == [True, False, False, False, False, False, False, None]
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
