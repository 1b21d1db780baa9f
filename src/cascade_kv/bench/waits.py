"""Waits on MPI requests that sleep between polls, for the benchmarks' ranks that are not being measured.

Open MPI's blocking calls (``Barrier``, ``Recv``) poll: a rank waiting in one would take a core from the
ranks being measured (half this two-core machine), or keep its own CPU out of idle. Imports no MPI itself:
it only calls the request's ``Test``.
"""
from __future__ import annotations

import time
from typing import Any


def wait_sleeping(request: Any, poll_s: float = 1e-3, timeout: float | None = None) -> None:
    """Wait for an MPI request (``Ibarrier``, ``Irecv``, ...), sleeping ``poll_s`` between tests. With
    ``timeout`` (seconds; for a request that can be cancelled, a receive), ``TimeoutError`` past it, the request
    cancelled: a rank whose peer failed half-way through an exchange reports it instead of waiting forever."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            request.Cancel()
            request.Wait()  # a cancelled receive completes at once
            raise TimeoutError(f"no message after {timeout:g} s (the peer failed or is stuck)")
        time.sleep(poll_s)


def idle_barrier(comm: Any, poll_s: float = 1e-3) -> None:
    """A barrier over ``comm`` that sleeps between tests."""
    wait_sleeping(comm.Ibarrier(), poll_s)


__all__ = ["idle_barrier", "wait_sleeping"]
