"""The Markdown of a run's JSON (``python -m cascade_kv.bench.suite.markdown``): every figure with its spread,
ceiling, ratio and verdict, as the run measured them. Constructed results only: nothing is timed."""
from __future__ import annotations

import json
from pathlib import Path

from cascade_kv.bench.suite import markdown
from cascade_kv.bench.suite.core import Measure, Result, SystemResult, Target


def _store_result() -> dict:
    res = Result("store", "the store against this machine's ceilings", 1)
    res.figure("host_get", "get, host tier", "GB/s", [8.0, 9.0, 10.0], ceiling=[10.0, 10.0, 10.0],
               ceiling_what="best of 3 copies", target=0.8)
    res.figure("above", "a figure above its ceiling", "GB/s", [16.0, 16.0], ceiling=[10.0, 10.0], ceiling_what="x")
    res.figure("batch_get", "get_many 4 KiB", "/s", [300_000.0, 350_000.0], ceiling=[900_000.0, 900_000.0],
               ceiling_what="np.copyto per block", target=500_000, of_ceiling=False)
    res.figure("lookup_us", "directory lookup", "us", [12.0, 14.0], target=100, of_ceiling=False, at_most=True)
    res.judge()
    return res.as_dict(["bench", "--json", "x.json"])


def test_a_figures_table_shows_spread_ceiling_ratio_and_verdict() -> None:
    text = markdown.document(_store_result())
    assert "| get, host tier | 9.00 (8.00-10.00) GB/s | 10.00 GB/s (best of 3 copies) | 0.90x (0.80x-1.00x) |" in text
    assert ">= 0.8x its ceiling | pass |" in text
    assert "**broken ceiling**" in text  # 1.6x its ceiling: never a pass
    assert "325,000 (300,000-350,000) /s" in text and "| >= 500,000 /s | **miss** |" in text
    assert "<= 100 us | pass |" in text
    assert text.startswith("Commit ")


def test_a_systems_table_and_its_targets(tmp_path: Path) -> None:
    res = Result("cold", "cold reads", 1, columns=[("read_GBps", "read")])
    for name, v in (("cascade-kv", [0.8, 1.0]), ("posix", [1.0, 1.0])):
        res.systems[name] = SystemResult(name, measures={"read_GBps": Measure("GB/s", v)})
    res.targets.append(Target("cascade-kv", "read_GBps", 0.9, "posix", "cold read >= 0.9x POSIX"))
    res.skipped["hdf5"] = "h5py is not installed"
    res.judge()
    path = tmp_path / "all.json"
    path.write_text(json.dumps({"cold": res.as_dict(["bench", "cold"]), "rma": {"exit_code": 2}}))
    assert markdown.main([str(path), "--only", "cold,rma"]) == 0
    text = markdown.document(json.loads(path.read_text()))
    assert "| posix | 1.00 GB/s |" in text and "| cascade-kv | 0.90 (0.80-1.00) GB/s |" in text
    assert "| cascade-kv | cold read >= 0.9x POSIX | 0.90x (0.80x-1.00x) | within noise |" in text
    assert "hdf5: skipped: h5py is not installed" in text and "Did not finish (exit status 2)" in text


def test_every_target_in_one_table() -> None:
    text = markdown.targets({"store": _store_result(), "rma": {"exit_code": 2}})
    assert "| store | cascade-kv | get, host tier: >= 0.8x its ceiling | 0.90x (0.80x-1.00x) | pass |" in text
    assert "**broken ceiling**" in text  # a ceiling check without a goal shows only when it fails
    assert "| rma |  | did not finish (exit status 2) |  | **failed** |" in text
