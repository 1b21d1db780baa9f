"""The shipped examples run as their docstrings say."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from cascade_kv.config import CascadeConfig

from .conftest import run_ranks

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_shared_prefix_example_on_four_ranks() -> None:
    out = run_ranks(4, [sys.executable, str(EXAMPLES / "shared_prefix.py")], timeout=90)
    # rank 0 wrote the prefix; every other rank read it remotely replica_threshold times (3 by default), then
    # from the replica the last of those reads made
    threshold = CascadeConfig().replica_threshold
    assert re.search(r"rank 0: reads from host 4, remote 0; replicas made 0", out), out
    expected = f"reads from host {4 - threshold}, remote {threshold}; replicas made 1"
    assert len(re.findall(rf"rank [123]: {expected}", out)) == 3, out
    # four ranks put the same request block: one copy, three dedup hits
    assert "cluster: 4 ranks, 2 distinct blocks for 5 keys, 3 dedup hits" in out, out


def test_the_slurm_scripts_parse_and_name_real_experiments() -> None:
    import subprocess

    from cascade_kv.bench.suite import EXPERIMENTS

    for script in sorted((EXAMPLES / "slurm").glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
        text = script.read_text()
        for loop in re.findall(r"for experiment in ([a-z -]+); do", text):
            assert set(loop.split()) <= set(EXPERIMENTS), (script, loop)


def test_shared_prefix_example_leaves_nothing_behind(leftovers_of) -> None:
    # on four ranks (the launcher cleans up Open MPI's segments) and alone, as `python shared_prefix.py` (a
    # singleton, which cascade_kv sets up to make none); the example's disk directory goes in both
    from cascade_kv.cluster.launch import local_mpi_env, mpiexec_path

    script = str(EXAMPLES / "shared_prefix.py")
    assert leftovers_of([str(mpiexec_path()), "-n", "4", sys.executable, script], env=local_mpi_env()) == []
    assert leftovers_of([sys.executable, script]) == []
