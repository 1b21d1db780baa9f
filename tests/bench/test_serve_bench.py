"""``cascade bench serve --quick``, end to end through the CLI: a real daemon, its client figures beside their
ceilings, every target judged, every read right, and nothing left running or on disk. The numbers are the
machine's: only their shape is checked here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cascade_kv.bench.suite.core import Measure, SystemResult
from cascade_kv.bench.suite.serve import Below, ServeResult, _p99
from tests.procs import run_bounded

CLI = [sys.executable, "-m", "cascade_kv.cli", "bench", "serve", "--quick"]

ROWS = {"get 16 MiB", "get 2 MiB", "lookup 64 keys, idle daemon", "lookup 64 keys, 2 hammering client processes",
        "put 4 KiB, already stored", "put 2 MiB, already stored", "daemon idle CPU, no client",
        "daemon idle CPU, 1 idle client", "put_many 64 x 4 KiB", "get_many 64 x 4 KiB", "put_many 64 x 64 KiB",
        "get_many 64 x 64 KiB"}


def test_quick_run_reports_every_figure_beside_its_bound_and_target(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    done = run_bounded([*CLI, "--dir", str(tmp_path), "--json", str(out)], capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for text in ("cascade bench serve", "ceiling copy_bytes 16 MiB", "target: get 2 MiB", "Reads checked"):
        assert text in done.stdout
    got = json.loads(out.read_text())
    assert got["experiment"] == "serve" and got["reads_checked"] > 0 and got["reads_wrong"] == 0
    assert not got["failed"] and not got["skipped"]
    assert set(got["systems"]) == ROWS
    rows = got["systems"]
    for name in ("get 16 MiB", "get 2 MiB"):
        assert {"serve", "bound", "single"} <= set(rows[name]) and rows[name]["serve"]["unit"] == "GB/s"
        assert rows[name]["copy_threads"] >= 1 and rows[name]["serve"]["n"] == rows[name]["bound"]["n"]
    assert rows["get 2 MiB"]["copy_threads"] == 1  # below memcopy.PARALLEL_MIN both sides copy in one thread
    for name in ("lookup 64 keys, idle daemon", "lookup 64 keys, 2 hammering client processes",
                 "put 4 KiB, already stored", "put 2 MiB, already stored"):
        assert rows[name]["serve"]["unit"] == rows[name]["bound"]["unit"] == "us"
        assert rows[name]["serve"]["n"] == rows[name]["bound"]["n"] > 1
    assert rows["put 4 KiB, already stored"]["digest_only"] == "200 of 200"  # no bytes crossed
    assert len(rows["lookup 64 keys, 2 hammering client processes"]["hammer_calls_per_s"]) == 2
    for name in ("daemon idle CPU, no client", "daemon idle CPU, 1 idle client"):
        assert rows[name]["serve"]["unit"] == "%" and rows[name]["serve"]["n"] == 1
    for name in ("put_many 64 x 4 KiB", "get_many 64 x 64 KiB"):
        assert rows[name]["serve"]["unit"] == rows[name]["in_process"]["unit"] == "k blocks/s"
    assert set(got["ceilings"]) == {"copy_bytes 16 MiB", "np.copyto 1 thread 16 MiB", "copy_bytes 2 MiB",
                                    "np.copyto 1 thread 2 MiB"}
    targets = {(t["system"], t["key"]): t for t in got["targets"]}
    assert len(targets) == 8
    assert all(t["passed"] in (True, False) and t["got"] is not None for t in targets.values())
    assert targets["lookup 64 keys, 2 hammering client processes", "p99"]["factor"] == 1000


def test_a_ceiling_target_passes_only_below_its_bound() -> None:
    res = ServeResult("serve", "t", 1)
    row = res.systems.setdefault("x", SystemResult("x"))
    row.measures["serve"] = Measure("us", [50.0, 60.0, 70.0])
    res.targets = [Below("x", "serve", 100), Below("x", "serve", 55), Below("y", "serve", 1)]
    res.judge()
    assert [t.passed for t in res.targets] == [True, False, None]
    assert _p99(Measure("us", [float(i) for i in range(1, 101)])) == 100.0  # the table's rank: int(0.99 n)
