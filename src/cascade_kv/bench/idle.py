"""What an idle rank costs, and what waking it costs: part of ``cascade bench --ranks N``.

* **idle CPU**: every rank holds an open store and does nothing for ``idle_s``; each rank's process CPU
  time over the window (all its threads, from ``time.process_time``) as % of one core. Beside it, the
  same window spent in a blocking ``MPI_Recv``: what a rank waiting in MPI costs (Open MPI polls).
  Target: < 5 % on every rank.
* **round trips to rank 1's service**, rank 0 calling (a 24-byte request, a 56-byte reply, like a
  lookup), with rank 1's service in three states: *hot* (calls back to back), *asleep* (rank 0 waits
  until rank 1's service thread sleeps in the kernel before each call: a ring must wake it) and *busy*
  (rank 1's main thread runs pure Python while rank 0 calls at gaps longer than the hot window, so each
  call wakes a sleeping thread that then needs the GIL). Beside them, a bare MPI ping-pong between the
  same ranks (rank 1 in a blocking ``Recv``), and the floor for waking a process asleep in the kernel: a
  UDP ping-pong to a process blocked in ``recv``, after the same gap. Targets: asleep < 100 us median,
  busy < 2 ms p99.

This module measures; :mod:`.cluster` records the figures beside their ceilings and judges them.

Imports ``mpi4py.MPI``: import this module only in a rank a launcher started.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from ..cluster.service import Service
from .waits import idle_barrier, wait_sleeping

IDLE_TARGET_PCT = 5.0
ASLEEP_TARGET_US = 100.0
BUSY_TARGET_P99_US = 2000.0
_READER, _PEER = 0, 1
_TAG = 77
_WAIT_S = 30.0  # a safety bound on event waits: only a broken service reaches it
_REQUEST = bytes(24)
_REPLY = bytes(56)


def idle_cpu(comm: MPI.Comm, seconds: float) -> dict[str, object] | None:
    """Collective, with a store (and so a service) open on every rank. Rank 0 gets the figure."""
    comm.Barrier()
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)  # the rank does nothing; its service and idle timer may do what they like
    idle = 100 * (time.process_time() - c0) / (time.perf_counter() - t0)
    # The bare-MPI figure: the same window in a blocking receive, released by a message sent after it
    req = np.zeros(1, np.int8)
    comm.Barrier()
    if comm.Get_rank() == 0:
        # rank 0 sleeps the window, then frees the others; its own figure is the plain sleep
        c0, t0 = time.process_time(), time.perf_counter()
        time.sleep(seconds)
        waiting = 100 * (time.process_time() - c0) / (time.perf_counter() - t0)
        for r in range(1, comm.Get_size()):
            comm.Send(req, dest=r, tag=_TAG)
    else:
        c0, t0 = time.process_time(), time.perf_counter()
        comm.Recv(req, source=0, tag=_TAG)
        waiting = 100 * (time.process_time() - c0) / (time.perf_counter() - t0)
    every = comm.gather((idle, waiting), root=0)
    if comm.Get_rank() != 0:
        return None
    per_rank = [round(i, 2) for i, _ in every]
    in_recv = [round(w, 1) for _, w in every[1:]]
    return {"seconds": seconds, "idle_pct": per_rank, "max_idle_pct": max(per_rank), "blocking_recv_pct": in_recv}


def _sleeping_recv(comm: MPI.Comm, buf: np.ndarray, source: int, tag: int, poll_s: float = 50e-6) -> None:
    # bounded: if the other rank fails half-way through the exchange (its service never slept), this one
    # raises too, and both reach the benchmark's step barrier with their errors (a hang otherwise)
    wait_sleeping(comm.Irecv(buf, source=source, tag=tag), poll_s, timeout=2 * _WAIT_S)


def round_trips(comm: MPI.Comm, service: Service, op: int, n: int, gap_s: float,
                done_op: int) -> dict[str, Any] | None:
    """Collective: rank 0 calls rank 1's ``op`` (an echo registered on ``service``) in the three states,
    and times a bare MPI ping-pong. Ranks above 1 wait idle. ``done_op`` (unused on ``service``) is
    registered here: rank 0 calls it to end rank 1's busy loop. Rank 0 gets the seconds of each call, in
    call order, per state (``hot``, ``asleep``, ``busy``, ``kernel_wake``, ``bare_mpi``), and ``gap_ms``,
    ``peer_loops`` (the busy loops rank 1 ran while called) and ``sleeps_of_peer``."""
    rank = comm.Get_rank()
    out: dict[str, Any] = {}
    call: Callable[[], object] = lambda: service.call(_PEER, op, _REQUEST)  # noqa: E731
    done = threading.Event()
    service.register(done_op, lambda source, payload: (done.set(), b"")[1])
    # hot: back to back
    idle_barrier(comm)
    if rank == _READER:
        for _ in range(max(10, n // 10)):
            call()
        out["hot"] = [_timed(call) for _ in range(n)]
    # asleep: before each call, rank 1 says its service thread is asleep
    idle_barrier(comm)
    asleep = min(n, 200)
    token = np.zeros(1, np.int8)
    samples = []
    for _ in range(asleep):
        if rank == _PEER:
            if not service.asleep.wait(_WAIT_S):
                raise RuntimeError("the service thread never went to sleep")
            comm.Send(token, dest=_READER, tag=_TAG)
            # the call is over: the next sleep is a new one. Polled rarely: a rank that wakes every few tens
            # of microseconds keeps its CPU out of deep idle, and the call would be timed against a warm CPU
            _sleeping_recv(comm, token, _READER, _TAG, poll_s=5e-3)
        elif rank == _READER:
            _sleeping_recv(comm, token, _PEER, _TAG)
            samples.append(_timed(call))
            comm.Send(token, dest=_PEER, tag=_TAG)
    if rank == _READER:
        out["asleep"], out["sleeps_of_peer"] = samples, asleep
    # busy: rank 1's main thread in pure Python (no MPI call); rank 0 calls at gaps longer than the hot window
    idle_barrier(comm)
    if rank == _PEER:
        loops = _busy(done)
        comm.send(loops, dest=_READER, tag=_TAG)
    elif rank == _READER:
        samples = []
        for _ in range(asleep):
            time.sleep(gap_s)
            samples.append(_timed(call))
        service.call(_PEER, done_op, b"")
        out["busy"], out["gap_ms"], out["peer_loops"] = samples, gap_s * 1e3, comm.recv(source=_PEER, tag=_TAG)
    # the kernel's own floor for waking a sleeping process: a UDP ping-pong after the same gap
    idle_barrier(comm)
    out_wake = _udp_ping_pong(comm, asleep, gap_s)
    if rank == _READER:
        out["kernel_wake"] = out_wake
    # bare MPI ping-pong, rank 1 in a blocking Recv
    idle_barrier(comm)
    buf = bytearray(56)
    if rank == _PEER:
        for _ in range(n + max(10, n // 10)):
            comm.Recv([buf, 24, MPI.BYTE], source=_READER, tag=_TAG)
            comm.Send([_REPLY, MPI.BYTE], dest=_READER, tag=_TAG)
    elif rank == _READER:
        def ping() -> None:
            comm.Send([_REQUEST, MPI.BYTE], dest=_PEER, tag=_TAG)
            comm.Recv([buf, MPI.BYTE], source=_PEER, tag=_TAG)
        for _ in range(max(10, n // 10)):
            ping()
        out["bare_mpi"] = [_timed(ping) for _ in range(n)]
    comm.Barrier()
    return out if rank == _READER else None


def _udp_ping_pong(comm: MPI.Comm, n: int, gap_s: float) -> list[float] | None:
    """Rank 1 blocks in ``recv`` on a UDP socket and answers; rank 0 pings it every ``gap_s``: what waking a
    process asleep in the kernel costs on this machine, whatever the service does (rank 0 gets each call's seconds)."""
    rank = comm.Get_rank()
    if rank == _PEER:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            comm.send(sock.getsockname(), dest=_READER, tag=_TAG)
            for _ in range(n):
                data, peer = sock.recvfrom(64)
                sock.sendto(_REPLY, peer)
        return None
    if rank != _READER:
        return None
    address = comm.recv(source=_PEER, tag=_TAG)
    samples = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for _ in range(n):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            sock.sendto(_REQUEST, address)
            sock.recv(64)
            samples.append(time.perf_counter() - t0)
    return samples


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _busy(done: threading.Event) -> int:
    """Pure Python until rank 0 calls the done op (which sets ``done``); the loops run. No MPI call in the
    loop: one would contend with the service thread for MPI's progress as well as for the GIL."""
    loops = 0
    while not done.is_set():
        x = 0
        for i in range(2000):
            x += i
        loops += 1
    return loops


__all__ = ["ASLEEP_TARGET_US", "BUSY_TARGET_P99_US", "IDLE_TARGET_PCT", "idle_cpu", "round_trips"]
