"""``cascade bench all``: each experiment in its own process at its rank count, one JSON, one table of targets."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cascade_kv.bench.suite import EXPERIMENTS, everything
from tests.procs import run_bounded


def test_every_experiment_is_run_at_the_issues_rank_count() -> None:
    runs = everything.RUNS
    assert {name for name, _ in runs} == set(EXPERIMENTS)
    assert runs[:2] == (("store", 1), ("store", 2))  # the main job, on one node and on two ranks
    assert ("hot-prefix", 4) in runs and ("rma", 2) in runs and ("trace", 1) in runs


def test_the_options_that_apply_to_every_experiment_are_handed_on(tmp_path: Path) -> None:
    options = {k: None for k in everything.PASSED_ON} | {"quick": True, "scale": 8.0, "dir": tmp_path,
                                                          "o_direct": False, "block_size": 1 << 20}
    cmd = everything.experiment_argv("cold", 2, options, tmp_path / "c.json", tmp_path / "png")
    assert cmd[:5] == [sys.executable, "-m", "cascade_kv.cli", "bench", "cold"]
    args = cmd[5:]
    assert "--quick" in args and "--o-direct" not in args
    assert args[args.index("--scale") + 1] == "8.0" and args[args.index("--dir") + 1] == str(tmp_path)
    assert args[args.index("--block-size") + 1] == str(1 << 20)
    assert args[args.index("--ranks") + 1] == "2" and args[args.index("--plot") + 1] == str(tmp_path / "png" / "cold")
    assert "--ranks" not in everything.experiment_argv("cold", 1, options, tmp_path / "c.json", None)


def test_the_summary_shows_failures_passes_and_misses() -> None:
    ok = everything.Outcome("cold", 1, 0, 1.0, {"targets": [
        {"system": "cascade-kv", "text": "cold read >= 0.9x POSIX", "got": 1.05, "passed": True},
        {"system": "cascade-kv", "text": "another", "got": 0.5, "passed": False},
        {"system": "cascade-kv", "text": "a third", "got": 0.95, "passed": False, "verdict": "within noise"},
        {"system": "cascade-kv", "text": "a fourth", "got": 1.3, "passed": False, "verdict": "broken ceiling"},
        {"system": "cascade-kv", "text": "not judged", "got": None, "passed": None, "verdict": None}]})
    figures_only = everything.Outcome("models", 1, 0, 1.0, {"targets": []})
    failed = everything.Outcome("rma", 2, 3, 1.0, None)
    out = io.StringIO()
    Console(file=out, width=200).print(everything.summary([ok, figures_only, failed]))
    text = out.getvalue()
    assert "pass" in text and "miss" in text and "exit status 3" in text and "failed" in text
    assert "within noise" in text and "broken ceiling" in text  # the experiments' verdicts, not a yes/no
    assert "figures only" in text


def test_all_runs_each_experiment_and_gathers_one_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(everything, "RUNS", (("cold", 1), ("models", 1)))
    options = {k: None for k in everything.PASSED_ON} | {"quick": True, "dir": tmp_path,
                                                          "systems": "cascade-kv,posix", "scale": 256.0}
    out = io.StringIO()
    code = everything.run_all(options, None, tmp_path / "all.json", None, Console(file=out, width=200))
    got = json.loads((tmp_path / "all.json").read_text())
    assert code == 0 and list(got) == ["cold", "models"], out.getvalue()
    assert got["cold"]["reads_wrong"] == 0 and set(got["cold"]["systems"]) == {"cascade-kv", "posix"}
    assert got["models"]["settings"]["scale"] == 256
    assert "every target" in out.getvalue()


def test_all_refuses_to_run_inside_an_mpi_job(tmp_path: Path) -> None:
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "PATH": "/usr/bin:/bin"}
    done = run_bounded([sys.executable, "-m", "cascade_kv.cli", "bench", "all", "--quick"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "outside mpiexec" in done.stderr
