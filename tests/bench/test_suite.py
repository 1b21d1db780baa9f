"""``cascade bench <experiment>``: the suite's frame and its first experiments, end to end through the CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cascade_kv.bench.suite.core import Measure, Result, SystemResult, Target
from cluster.conftest import require_mpiexec  # tests/ is on sys.path (rootdir-relative test packages)
from tests.procs import run_bounded

CLI = [sys.executable, "-m", "cascade_kv.cli", "bench"]
SYSTEMS = "cascade-kv,posix,hdf5,redis"
VERDICTS = ("pass", "within noise", "miss", "broken ceiling")


def _run(args: list[str], tmp_path: Path, timeout: float = 180) -> dict:
    out = tmp_path / "result.json"
    done = run_bounded([*CLI, *args, "--quick", "--dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("ranks", [1, 2])
def test_hot_prefix_reads_every_block_from_disk_once_whatever_the_ranks(tmp_path: Path, ranks: int) -> None:
    if ranks > 1:
        require_mpiexec()
    got = _run(["hot-prefix", "--systems", SYSTEMS, "--ranks", str(ranks), "--plot", str(tmp_path / "png")],
               tmp_path)
    assert got["ranks"] == ranks and got["reads_wrong"] == 0 and got["reads_checked"] > 0
    blocks = got["settings"]["blocks"]
    ran = set(got["systems"]) | set(got["skipped"])
    assert ran == set(SYSTEMS.split(","))
    cascade = got["systems"]["cascade-kv"]
    assert cascade["disk_reads"] == [blocks] * got["settings"]["passes"]  # one disk read per block per pass
    assert cascade["aggregate_GBps"]["n"] == got["settings"]["passes"]
    assert "machine" in got and "mpi4py" in got["machine"] and got["command"].startswith("cascade bench hot-prefix")
    assert got["machine"]["disk"]["path"] == str(tmp_path.resolve()) and got["machine"]["disk"]["total_bytes"] > 0
    assert list((tmp_path / "png").glob("hot-prefix-*.png"))


def test_cold_and_models_run_and_check_every_read(tmp_path: Path) -> None:
    cold = _run(["cold", "--systems", "cascade-kv,posix,hdf5"], tmp_path)
    assert cold["reads_wrong"] == 0 and {"cascade-kv", "posix", "hdf5"} <= set(cold["systems"])
    assert cold["targets"][0]["system"] == "cascade-kv" and cold["targets"][0]["verdict"] in VERDICTS
    assert cold["ceilings"]["raw read, best way"]["n"] == cold["settings"]["passes"]
    models = _run(["models", "--systems", "cascade-kv,redis", "--scale", "256"], tmp_path)
    assert models["reads_wrong"] == 0 and models["settings"]["scale"] == 256
    assert models["settings"]["models"]["Qwen2.5-7B"]["block_bytes"] == 2 * 28 * 4 * 128 * 512 * 2


def test_an_unknown_system_is_a_usage_error(tmp_path: Path) -> None:
    done = run_bounded([*CLI, "cold", "--systems", "cascade-kv,nosuch", "--quick", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown system" in done.stderr


def test_a_system_that_cannot_run_is_skipped_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_kv.bench.peers import registry
    from cascade_kv.bench.peers.base import Unavailable
    from cascade_kv.bench.suite import cold
    from cascade_kv.bench.suite.core import Run

    def missing() -> None:
        raise Unavailable("not installed here (test)")

    monkeypatch.setitem(registry.BACKENDS, "missing", missing)
    run = Run(None, quick=True, root=tmp_path, systems=["missing", "posix"], tick=lambda what: None,
              options={"blocks": 2})
    res = cold.run(run)
    assert res.skipped == {"missing": "not installed here (test)"} and list(res.systems) == ["posix"]
    assert run.counted_reads() == (2 * 2 * res.settings["passes"], 0)  # cold and hot reads of 2 blocks


def test_targets_are_judged_against_systems_or_ceilings() -> None:
    res = Result("x", "x", 1)
    for name, value in (("a", 6.0), ("b", 2.0)):
        res.systems[name] = SystemResult(name, measures={"rate": Measure("GB/s", [value])})
    res.ceilings["raw"] = Measure("GB/s", [5.0])
    res.skipped["c"] = "not installed"
    res.targets = [Target("a", "rate", 3.0, "b"), Target("a", "rate", 1.3, "raw"), Target("a", "rate", 2.0, "c"),
                   Target("a", "rate", 7.0)]
    res.judge()
    assert [t.passed for t in res.targets] == [True, False, None, False]
    assert res.targets[0].got == 3.0 and "not installed" in res.targets[2].why


def test_plots_scaling_lines_tier_hits_and_latency_cdf(tmp_path: Path) -> None:
    from cascade_kv.bench.suite.render import plot

    res = Result("strong", "x", 4)
    res.columns = [("read_GBps[1]", "1"), ("read_GBps[2]", "2"), ("read_GBps[4]", "4")]
    for name, base in (("cascade-kv", 3.0), ("posix", 2.0)):
        res.systems[name] = SystemResult(
            name, measures={f"read_GBps[{k}]": Measure("GB/s", [base * k]) for k in (1, 2, 4)},
            values={"tier_hits": {"host": 3, "remote": 2, "disk": 1}, "prefix_load_ms": [0.1, 0.5, 2.0]})
    names = sorted(p.name for p in plot(res, tmp_path / "png"))
    assert {"strong-read_GBps-vs-ranks.png", "strong-tier-hits.png", "strong-prefix-load-cdf.png"} <= set(names)
    assert all((tmp_path / "png" / n).stat().st_size > 1000 for n in names)


def test_a_zero_baseline_leaves_the_target_unjudged_instead_of_dividing_by_it() -> None:
    r = Result("x", "x", ranks=1)
    r.systems["a"] = SystemResult("a", measures={"hit": Measure("fraction", [0.5])})
    r.systems["b"] = SystemResult("b", measures={"hit": Measure("fraction", [0.0])})
    t = Target("a", "hit", 1.0, than="b")
    r.targets.append(t)
    r.judge()
    assert t.passed is None and "no ratio" in t.why


def test_o_direct_reaches_every_system_of_every_experiment(tmp_path: Path, monkeypatch) -> None:
    # --o-direct is a run option: Run.system hands it to each system it opens, whatever the experiment asked
    from cascade_kv.bench.peers import registry
    from cascade_kv.bench.peers.base import Backend
    from cascade_kv.bench.suite.core import Result, Run

    seen: list[object] = []

    class Probe(Backend):
        def _open(self, setup) -> None:
            seen.append(setup.options.get("o_direct"))

        def put_many(self, keys, blocks, *, prefix=None) -> None: ...

        def get_hits(self, keys, outs) -> list[bool]:
            return [False] * len(keys)

        def contains_many(self, keys) -> list[bool]:
            return [False] * len(keys)

        def close(self) -> None: ...

    monkeypatch.setitem(registry.BACKENDS, "probe", Probe)
    for asked in (True, False):
        run = Run(None, quick=True, root=tmp_path, systems=["probe"], tick=lambda what: None,
                  options={"o_direct": asked})
        with run.system("probe", Result("x", "x", 1), 1 << 20, 4096) as backend:
            assert backend is not None
    assert seen == [True, False]
