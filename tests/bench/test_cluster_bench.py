"""``cascade bench --ranks 2 --quick`` end to end: two local ranks through the project's own mpiexec."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cascade_kv.bench.cluster import ClusterSizes
from cluster.conftest import require_mpiexec  # tests/ is on sys.path (rootdir-relative test packages)
from tests.procs import run_bounded

EXPERIMENTS = ("remote_get", "directory_lookup", "dedup_put", "hot_prefix", "idle_cpu", "wake_round_trip",
               "small_remote_get")


def test_quick_sizes_fit_the_quick_host_tier() -> None:
    s = ClusterSizes.for_run(quick=True, block=None, host_capacity=None)
    assert 2 <= s.remote_blocks and s.remote_blocks * s.block <= s.host_capacity // 2
    assert 2 <= s.prefix_count and s.prefix_count * s.block <= s.host_capacity // 2
    full = ClusterSizes.for_run(quick=False, block=None, host_capacity=None)
    assert full.remote_blocks * full.block >= 64 << 20  # a working set twice the L3
    assert ClusterSizes.for_run(quick=False, block=16 << 20, host_capacity=64 << 20).prefix_count == 2


def test_bench_two_ranks_quick(tmp_path: Path) -> None:
    require_mpiexec()
    out = tmp_path / "cluster.json"
    p = run_bounded([sys.executable, "-m", "cascade_kv.cli", "bench", "--ranks", "2", "--quick", "--json", str(out),
                        "--dir", str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("cascade bench: 2 ranks") == 1, p.stdout  # rank 0 alone prints the table
    assert not list(tmp_path.glob("cascade-bench-*")), "the temporary disk tier was not removed"
    data = json.loads(out.read_text())
    assert data["ranks"] == 2 and "--quick" in data["argv"] and data["machine"]["cores"] > 0
    assert set(data["experiments"]) == set(EXPERIMENTS)
    assert data["reads_wrong"] == 0 and data["reads_checked"] > 0

    remote = data["experiments"]["remote_get"]
    for kind in ("store_GBps", "bare_get_GBps"):
        assert 0 < remote[kind]["min"] <= remote[kind]["median"] <= remote[kind]["max"], kind
    assert remote["ratio"] > 0 and remote["target"] == {"kind": "ratio", "value": 0.8}

    lookup = data["experiments"]["directory_lookup"]
    assert 0 < lookup["median_us"] <= lookup["p99_us"] and lookup["echo"]["median_us"] > 0

    dedup = data["experiments"]["dedup_put"]
    assert dedup["median_us"] > 0 and dedup["hash_us"] > 0 and dedup["ceiling"]["median_us"] > 0
    assert dedup["dedup_hits"] == dedup["blocks"]
    assert dedup["bytes_received"] < dedup["block_size"]  # no bulk transfer

    hot = data["experiments"]["hot_prefix"]
    assert hot["ranks"] == 2 and hot["aggregate_GBps"]["median"] > 0 and hot["cold_readinto_GBps"]["median"] > 0
    assert hot["disk_reads"] == [hot["blocks"]] * len(hot["passes"])  # one disk read per block, not per rank
    assert hot["passed"]

    idle = data["experiments"]["idle_cpu"]
    assert len(idle["idle_pct"]) == 2 and idle["max_idle_pct"] == max(idle["idle_pct"]) >= 0
    assert idle["blocking_recv_pct"][0] > 0  # a blocking receive polls: the figure beside the idle one
    wake = data["experiments"]["wake_round_trip"]
    for state in ("hot", "asleep", "busy", "bare_mpi", "kernel_wake"):
        assert 0 < wake[state]["median_us"] <= wake[state]["p99_us"], state
    assert wake["busy"]["peer_loops"] > 0  # the peer really ran Python while it was called
    small = data["experiments"]["small_remote_get"]["sizes"]
    assert [f["block_size"] for f in small] == [4 << 10, 64 << 10]
    assert all(f["store_blocks_per_s"] > 0 and f["bare_blocks_per_s"] > 0 and f["batch"] == 64 for f in small)
