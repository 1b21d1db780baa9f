"""One-sided reads over arena windows, run as real MPI jobs (``mpiexec -n 2`` and ``-n 4``).

Each test starts :mod:`rma_worker` under ``mpiexec`` with a scenario; the ranks check their invariants,
agree on them with collectives, and rank 0 prints one ``RESULT {json}`` line that the test asserts on.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .conftest import run_ranks

WORKER = Path(__file__).with_name("rma_worker.py")
TIMEOUT_S = 60


def run_worker(n: int, *args: str, timeout: float = TIMEOUT_S) -> dict[str, object]:
    """Run the worker as ``n`` ranks; the result rank 0 printed."""
    out = run_ranks(n, [sys.executable, str(WORKER), *args], timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line\n{out}"
    return json.loads(lines[0].removeprefix("RESULT "))


def assert_nothing_left(result: dict[str, object]) -> None:
    """Closing the windows unmapped them and left no file in /dev/shm, and the job's own shared-memory
    segments went with it."""
    assert result["shm_left"] == [[]] * len(result["shm_left"])  # type: ignore[arg-type]
    assert result["osc_maps_left"] == [[]] * len(result["osc_maps_left"])  # type: ignore[arg-type]
    seen = {path for paths in result["shm_files"] for path in paths}  # type: ignore[union-attr]
    assert [path for path in seen if os.path.exists(path)] == []


def test_reads_blocks_and_refuses_stale_locations():
    result = run_worker(2, "basic")
    checks = {k: v for k, v in result.items() if k.startswith("rank ")}
    assert "rank 1: single_ok" in checks and "rank 1: race: reuse after bytes copied -> refused" in checks
    assert [k for k, v in checks.items() if v is not True] == []
    assert_nothing_left(result)


def test_churning_owner_never_yields_another_blocks_bytes():
    result = run_worker(2, "stress")
    assert result["torn"] == 0, result
    assert result["ok"] > 0 and result["stale"] > 0 and result["batches"] > 0, result
    assert result["owner_ops"] > 100, result
    assert_nothing_left(result)


def test_four_ranks_read_each_other_in_one_epoch():
    result = run_worker(4, "many")
    assert result["all_read_before"] is True
    assert result["after_matches_frees"] is True
    assert result["describe_ok"] is True
    assert result["reads_per_rank"] == 18
    assert_nothing_left(result)

