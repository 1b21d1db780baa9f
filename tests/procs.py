"""Run a command the way the tests run ``cascade bench`` and other process trees: bounded, and nothing left behind.

``subprocess.run(timeout=...)`` kills only the process it started, with SIGKILL: a ``cascade bench --ranks N``
under it had started ``mpiexec`` and its ranks, which then ran on, re-parented to init (seen: a timed-out test
left two ranks polling for 47 minutes). Here the command gets a session of its own; past the timeout it gets
SIGTERM first, which ``cascade``'s launcher turns into stopping its ``mpiexec`` and ranks
(``cluster/launch.py``), then, after a grace period, SIGKILL for the whole session; and the test fails with what
the command printed.
"""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

import pytest

GRACE_S = 15.0


def run_bounded(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, cwd: object = None,
                **_: object) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)``, with the whole
    process tree stopped (and the test failed) past ``timeout``. Other ``subprocess.run`` keywords are the ones
    this always uses, and are ignored."""
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout:g} s; stopped it and its processes\n{out}\n{err}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def _stop(proc: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


__all__ = ["run_bounded"]
