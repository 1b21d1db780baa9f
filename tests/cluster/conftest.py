"""The MPI test harness: ``mpirun(n, script)`` runs a Python script as ``n`` ranks of the project's own mpiexec.

A script checks a global invariant itself (``assert comm.allreduce(...) == ...``) and fails its rank; the
harness asserts that every rank exited 0 and puts the ranks' output in the failure message. Each start of
mpiexec costs a second or more, so a test does as much as it can in one run.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from cascade_kv.cluster.launch import LaunchError, mpiexec_path, run_mpi

MpiRun = Callable[..., subprocess.CompletedProcess[str]]


def require_mpiexec() -> None:
    """Skip the calling test where there is no mpiexec to start ranks with."""
    try:
        mpiexec_path()
    except LaunchError as e:
        pytest.skip(f"cannot start MPI ranks: {e}")


@pytest.fixture
def mpirun(tmp_path: Path) -> MpiRun:
    """``mpirun(n, script_text, timeout=60)``: write the script to ``tmp_path``, run it as ``n`` ranks,
    assert that every rank exited 0 and return the completed process (``stdout``, ``stderr``: text)."""
    require_mpiexec()
    count = 0

    def run(n: int, script_text: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        nonlocal count
        count += 1
        script = tmp_path / f"mpi_script_{count}.py"
        script.write_text(textwrap.dedent(script_text))
        done = run_mpi(n, [sys.executable, str(script)], timeout=timeout)
        assert done.returncode == 0, (f"mpiexec -n {n} {script.name} exited {done.returncode}\n"
                                      f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}")
        return done

    return run
