"""Directory round trip: a lookup-sized request to another rank's service thread and back.

Rank 0 sends a 32-byte digest to rank 1, whose handler answers with a 16-byte
record (what a directory lookup returns), ``n`` times back to back, and times
each call. Three settings of rank 1:

* ``idle``: its main thread sleeps in ``Event.wait`` (holds no GIL);
* ``busy``: its main thread runs a pure-Python loop, with the switch interval the
  service sets (:data:`~cascade_kv.cluster.service.SERVICE_SWITCH_INTERVAL`);
* ``busy-5ms``: the same loop with CPython's default 5 ms switch interval, which
  shows what lowering it buys.

Run under MPI with two ranks (extra ranks stay idle)::

    mpiexec -n 2 python -m cascade_kv.bench.directory_rtt [--n 5000] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass

from mpi4py import MPI

from ..cluster.service import SERVICE_SWITCH_INTERVAL, Service

_LOOKUP = 1
_DONE = 2
_REPLY = bytes(16)  # (owner rank, tier, size): the size of a directory record
_MODES = {"idle": (False, SERVICE_SWITCH_INTERVAL),
          "busy": (True, SERVICE_SWITCH_INTERVAL),
          "busy-5ms": (True, 0.005)}


@dataclass(frozen=True, slots=True)
class Rtt:
    """Round trips of one setting, in microseconds."""

    mode: str
    median_us: float
    p99_us: float
    max_us: float
    n: int
    switch_interval_s: float
    peer_work: float
    """Speed of rank 1's busy loop against :func:`calibrate` (0 when idle). Rough (this VM's speed
    drifts by +-30%), but it shows the loop really ran: a starved loop would hold up nobody."""


def _percentile(sorted_samples: list[float], q: float) -> float:
    return sorted_samples[min(len(sorted_samples) - 1, int(q * len(sorted_samples)))]


def _busy_loop(seconds: float | None, done: threading.Event | None) -> float:
    """Pure Python (holds the GIL but at switch points) for ``seconds`` or until ``done``; loops per second."""
    loops, t0 = 0, time.perf_counter()
    while True:
        x = 0
        for i in range(1000):
            x += i
        loops += 1
        if (done is not None and done.is_set()) or (seconds is not None and time.perf_counter() - t0 >= seconds):
            return loops / (time.perf_counter() - t0)


def calibrate(comm: MPI.Comm, seconds: float = 0.5) -> float:
    """Speed of the busy loop on rank 1 while every other rank sleeps (no MPI polling): what "100%" means."""
    rate = 0.0
    if comm.Get_rank() == 1:
        _busy_loop(seconds, None)  # warm-up: the first tenths of a second run ~20% slower here
        rate = _busy_loop(seconds, None)
    else:
        time.sleep(2 * seconds + 0.1)  # not Barrier: Open MPI's blocking calls poll and would take a core
    comm.Barrier()
    return rate


def measure(comm: MPI.Comm, mode: str = "idle", *, n: int = 5000, warmup: int = 500,
            alone: float = 1.0) -> Rtt | None:
    """Time ``n`` lookups from rank 0 to rank 1 with rank 1 in ``mode``. Collective; rank 0 gets the result.

    ``alone`` is :func:`calibrate`'s figure on rank 1 (the busy loop's speed is reported relative to it).
    """
    if comm.Get_size() < 2:
        raise ValueError("directory_rtt needs at least 2 ranks (run it under mpiexec -n 2)")
    busy, interval = _MODES[mode]
    done = threading.Event()
    work = 0.0

    def lookup(source: int, digest: memoryview) -> bytes:
        return _REPLY

    def finish(source: int, payload: memoryview) -> bytes:
        done.set()
        return b""

    saved = sys.getswitchinterval()
    with Service(comm, handlers={_LOOKUP: lookup, _DONE: finish}) as svc:
        sys.setswitchinterval(interval)
        try:
            comm.Barrier()
            rank = comm.Get_rank()
            if rank == 0:
                digest = bytes(range(32))
                for _ in range(warmup):
                    svc.call(1, _LOOKUP, digest)
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    svc.call(1, _LOOKUP, digest)
                    samples.append(time.perf_counter() - t0)
                svc.call(1, _DONE, b"")
            elif rank == 1:
                if busy:
                    work = _busy_loop(None, done) / alone
                else:
                    done.wait()
            comm.Barrier()
        finally:
            sys.setswitchinterval(saved)
    work = comm.bcast(work if comm.Get_rank() == 1 else None, root=1)
    if comm.Get_rank() != 0:
        return None
    samples.sort()
    return Rtt(mode, statistics.median(samples) * 1e6, _percentile(samples, 0.99) * 1e6,
               samples[-1] * 1e6, n, interval, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cascade_kv.bench.directory_rtt",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="timed round trips per setting")
    parser.add_argument("--modes", nargs="+", default=list(_MODES), choices=list(_MODES))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    alone = calibrate(comm)
    results = [measure(comm, mode, n=args.n, alone=alone) for mode in args.modes]
    if comm.Get_rank() == 0:
        if args.json:
            print(json.dumps({"ranks": comm.Get_size(), "results": [asdict(r) for r in results if r]}))
        else:
            print(f"directory round trip, 32 B request / 16 B reply, rank 0 -> rank 1 ({comm.Get_size()} ranks)")
            print(f"{'peer':<10} {'switch':>8} {'median':>10} {'p99':>10} {'max':>10} {'n':>7} {'peer work':>10}")
            for r in results:
                assert r is not None
                print(f"{r.mode:<10} {r.switch_interval_s * 1e3:>6.1f}ms {r.median_us:>8.1f}us "
                      f"{r.p99_us:>8.1f}us {r.max_us:>8.0f}us {r.n:>7} {r.peer_work:>9.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
