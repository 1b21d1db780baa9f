"""``cascade bench contention | strong | weak | rma``, end to end through the CLI on two ranks: the JSON holds
each experiment's figures and every read came back right."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_kv.bench.suite.scaling import rank_counts
from cluster.conftest import require_mpiexec  # tests/ is on sys.path (rootdir-relative test packages)

CLI = [sys.executable, "-m", "cascade_kv.cli", "bench"]
SYSTEMS = "cascade-kv,posix"


@pytest.fixture(scope="module", autouse=True)
def _mpiexec() -> None:
    require_mpiexec()


def _run(experiment: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    done = subprocess.run([*CLI, experiment, "--quick", "--ranks", "2", "--systems", SYSTEMS, "--dir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(out.read_text())
    assert got["ranks"] == 2 and got["reads_checked"] > 0 and got["reads_wrong"] == 0
    assert not got["failed"], got["failed"]
    return got


def test_contention_serves_the_prefix_from_memory_and_every_read(tmp_path: Path) -> None:
    got = _run("contention", tmp_path)
    s = got["settings"]
    assert s["distinct_data_bytes"] > s["memory_all_ranks"]  # more data than memory
    for name in ("cascade-kv", "posix"):
        mine = got["systems"][name]
        assert mine["read_GBps"]["n"] == s["passes"] and mine["served_pct"]["median"] == 100
        assert mine["write_GBps"]["n"] == 1
    cascade = got["systems"]["cascade-kv"]
    assert cascade["prefix_memory_pct"]["median"] == 100  # semantic eviction keeps the prefix in memory
    hits = cascade["tier_hits"]
    reads = s["passes"] * 2 * (s["requests_per_pass"] * s["prefix_blocks"] + s["unique_blocks_per_rank"])
    assert sum(hits.values()) == reads and hits["disk"] > 0 and hits["host"] + hits["remote"] > 0
    assert got["systems"]["posix"]["prefix_memory_pct"] == "cannot tell (page cache)"
    assert [t["key"] for t in got["targets"]] == ["prefix_memory_pct", "read_GBps"]


@pytest.mark.parametrize("experiment", ["strong", "weak"])
def test_scaling_measures_every_power_of_two_rank_count(tmp_path: Path, experiment: str) -> None:
    got = _run(experiment, tmp_path)
    assert got["settings"]["rank_counts"] == [1, 2]
    for name in ("cascade-kv", "posix"):
        mine = got["systems"][name]
        for k in (1, 2):
            assert mine[f"read_GBps[{k}]"]["n"] == got["settings"]["reps"] and mine[f"write_GBps[{k}]"]["n"] == 1
    if experiment == "strong":
        assert got["settings"]["total_blocks"] % 2 == 0
    else:
        assert got["settings"]["blocks_per_rank"] > 0


def test_rma_measures_remote_and_local_reads_beside_bare_mpi(tmp_path: Path) -> None:
    got = _run("rma", tmp_path)
    cascade = got["systems"]["cascade-kv"]
    assert cascade["remote_GBps"]["n"] == cascade["local_GBps"]["n"] == got["settings"]["passes"]
    for label in ("4 KiB", "1 MiB", "16 MiB"):
        assert cascade[f"rma_GBps[{label}]"]["n"] > 0
        assert got["ceilings"][f"bare Get {label}"]["n"] > 0 and got["ceilings"][f"Send/Recv {label}"]["n"] > 0
    assert "posix" in got["skipped"]  # not a memory system: said so, not silently left out


def test_rank_counts_are_the_powers_of_two_up_to_the_job() -> None:
    assert rank_counts(1) == [1] and rank_counts(4) == [1, 2, 4] and rank_counts(6) == [1, 2, 4]
