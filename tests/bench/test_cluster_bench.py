"""``cascade bench --ranks 2 --quick`` end to end: two local ranks through the project's own mpiexec, the
suite's ``store`` experiment in a job of two ranks (:mod:`cascade_kv.bench.cluster`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cascade_kv.bench.cluster import ClusterSizes, per_pass
from cluster.conftest import require_mpiexec  # tests/ is on sys.path (rootdir-relative test packages)
from tests.procs import run_bounded

FIGURES = ("remote_get", "directory_lookup", "dedup_put", "hot_prefix", "hot_prefix_disk_reads", "idle_cpu",
           "round_trip_hot", "round_trip_asleep", "round_trip_busy_p99", "small_remote_get[4 KiB]",
           "small_remote_get[64 KiB]")
CEILINGS = ("remote_get", "directory_lookup", "dedup_put", "hot_prefix", "round_trip_hot", "round_trip_asleep",
            "round_trip_busy_p99", "small_remote_get[4 KiB]", "small_remote_get[64 KiB]")


def test_quick_sizes_fit_the_quick_host_tier() -> None:
    s = ClusterSizes.for_run(quick=True, block=None, host_capacity=None)
    assert 2 <= s.remote_blocks and s.remote_blocks * s.block <= s.host_capacity // 2
    assert 2 <= s.prefix_count and s.prefix_count * s.block <= s.host_capacity // 2
    assert s.remote_reads % 2 == 0 and s.remote_reads >= 2 * s.remote_blocks
    full = ClusterSizes.for_run(quick=False, block=None, host_capacity=None)
    assert full.remote_blocks * full.block >= 64 << 20  # a working set twice the L3
    assert ClusterSizes.for_run(quick=False, block=16 << 20, host_capacity=64 << 20).prefix_count == 2


def test_a_latency_is_judged_on_one_median_per_pass() -> None:
    calls = [1e-6] * 4 + [3e-6] * 4 + [2e-6, 2e-6, 9e-6, 2e-6]
    assert per_pass(calls, 3) == [1.0, 3.0, 2.0]  # microseconds, in the order the passes ran
    assert per_pass([0.5, 1.5, 1.0, 2.0], 2, scale=1, stat=max) == [1.5, 2.0]


def _target(data: dict, key: str, *, ceiling: bool) -> dict:
    found = [t for t in data["targets"] if t["key"] == key and bool(t["than"]) == ceiling]
    assert len(found) == 1, (key, ceiling, data["targets"])
    return found[0]


def test_bench_two_ranks_quick(tmp_path: Path) -> None:
    require_mpiexec()
    out = tmp_path / "cluster.json"
    p = run_bounded([sys.executable, "-m", "cascade_kv.cli", "bench", "--ranks", "2", "--quick", "--json", str(out),
                        "--dir", str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("cascade bench store:") == 1, p.stdout  # rank 0 alone prints the table
    assert not list(tmp_path.glob("cascade-store-*")), "the temporary disk tier was not removed"
    data = json.loads(out.read_text())
    assert data["experiment"] == "store" and data["ranks"] == 2
    assert "--quick" in data["command"] and data["machine"]["cores"] > 0
    assert [r["key"] for r in data["rows"]] == list(FIGURES)
    assert set(data["ceilings"]) == set(CEILINGS)
    assert data["reads_wrong"] == 0 and data["reads_checked"] > 0
    cascade = data["systems"]["cascade-kv"]
    passes = data["settings"]["reps"]

    remote = cascade["remote_get"]
    assert remote["n"] == passes and data["ceilings"]["remote_get"]["n"] == passes  # one median per pass
    for m in (remote, data["ceilings"]["remote_get"]):
        assert 0 < m["min"] <= m["median"] <= m["max"]
    assert _target(data, "remote_get", ceiling=True)["factor"] == 0.8
    assert _target(data, "remote_get", ceiling=True)["got"] > 0

    lookup = cascade["directory_lookup"]
    assert lookup["unit"] == "us" and lookup["n"] == passes and data["ceilings"]["directory_lookup"]["median"] > 0
    details = cascade["details"]  # rank 0's details of each figure, the single calls among them
    assert 0 < details["directory_lookup"]["lookup"]["median_us"] <= details["directory_lookup"]["lookup"]["p99_us"]
    assert details["directory_lookup"]["echo"]["median_us"] > 0
    goal = _target(data, "directory_lookup", ceiling=False)
    assert goal["factor"] == 100.0 and goal["at_most"]

    dedup = details["dedup_put"]
    assert cascade["dedup_put"]["median"] > 0 and dedup["hash_us"] > 0 and dedup["ceiling"]["median_us"] > 0
    assert dedup["dedup_hits"] == dedup["blocks"]
    assert dedup["bytes_received"] < dedup["block_size"]  # no bulk transfer
    assert _target(data, "dedup_put", ceiling=False)["factor"] == 200.0

    hot = details["hot_prefix"]
    assert hot["ranks"] == 2 and cascade["hot_prefix"]["median"] > 0 and data["ceilings"]["hot_prefix"]["median"] > 0
    assert hot["disk_reads"] == [hot["blocks"]] * len(hot["passes"])  # one disk read per block, not per rank
    reads = _target(data, "hot_prefix_disk_reads", ceiling=False)
    assert reads["factor"] == hot["blocks"] and reads["at_most"] and reads["verdict"] == "pass"

    idle = details["idle_cpu"]
    assert len(idle["idle_pct"]) == 2 and idle["max_idle_pct"] == max(idle["idle_pct"]) >= 0
    assert cascade["idle_cpu"]["n"] == 2 and _target(data, "idle_cpu", ceiling=False)["factor"] == 5.0
    assert idle["blocking_recv_pct"][0] > 0  # a blocking receive polls: the figure beside the idle one
    wake = details["wake_round_trip"]
    for state in ("hot", "asleep", "busy", "bare_mpi", "kernel_wake"):
        assert 0 < wake[state]["median_us"] <= wake[state]["p99_us"], state
    assert wake["peer_loops"] > 0  # the peer really ran Python while it was called
    assert _target(data, "round_trip_asleep", ceiling=False)["factor"] == 100.0
    assert _target(data, "round_trip_busy_p99", ceiling=False)["factor"] == 2000.0

    small = details["small_remote_get"]
    assert [f["block_size"] for f in small] == [4 << 10, 64 << 10] and all(f["batch"] == 64 for f in small)
    for label in ("4 KiB", "64 KiB"):
        key = f"small_remote_get[{label}]"
        assert cascade[key]["median"] > 0 and data["ceilings"][key]["median"] > 0
        assert _target(data, key, ceiling=True)["factor"] == 0.5
    for t in data["targets"]:  # every figure with a ceiling was judged against it
        assert t["got"] is not None, t
