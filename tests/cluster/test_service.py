"""The rank service and the home rules.

The home rules are plain functions, tested here. The service is tested under a
real ``mpiexec``: this file is also the MPI program (``python -m mpi4py
test_service.py <scenario>``), so each scenario is ordinary code next to the
test that runs it. MPI is imported only inside the scenarios: importing it here
would initialise MPI in the pytest process.
"""
from __future__ import annotations

import collections
import os
import struct
import subprocess
import sys
import threading

import pytest

from cascade_kv.cluster.homes import home_of_digest, home_of_key

# ------------------------------------------------------------------- home rules


def test_homes_are_stable_across_processes_and_runs():
    # Fixed expectations: a change of the rule (or a salted hash) would move every key.
    assert [home_of_key(k, 4) for k in ("a", b"a", "kv/0", b"\x00\xff")] == [3, 1, 1, 1]
    assert home_of_digest(bytes(range(32)), 4) == 0
    assert home_of_digest(bytes(range(1, 33)), 7) == int.from_bytes(bytes(range(1, 9)), "little") % 7
    code = "from cascade_kv.cluster.homes import home_of_key; print(home_of_key('stable', 1000))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {f"{home_of_key('stable', 1000)}\n"}


def test_str_and_bytes_keys_hash_apart():
    assert sum(home_of_key(f"k{i}", 1 << 30) != home_of_key(f"k{i}".encode(), 1 << 30) for i in range(100)) >= 99
    assert home_of_key("é", 1 << 30) != home_of_key("é".encode(), 1 << 30)


def test_homes_are_uniform_over_four_ranks():
    n = 40_000
    keys = collections.Counter(home_of_key(f"layer{i % 32}/block{i}", 4) for i in range(n))
    digests = collections.Counter(home_of_digest(os.urandom(32), 4) for _ in range(n))
    for counts in (keys, digests):
        assert sorted(counts) == [0, 1, 2, 3]
        assert all(abs(c - n / 4) < 0.05 * n / 4 for c in counts.values()), counts  # ~10 sigma


def test_homes_with_one_rank_and_bad_input():
    assert home_of_key("anything", 1) == 0 and home_of_digest(bytes(32), 1) == 0
    with pytest.raises(ValueError, match="size"):
        home_of_key("a", 0)
    with pytest.raises(ValueError, match="size"):
        home_of_digest(bytes(32), True)
    with pytest.raises(TypeError, match="str or bytes"):
        home_of_key(1, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        home_of_digest(b"short", 4)


# ---------------------------------------------------------------- MPI harness
def _mpirun(n: int, scenario: str, timeout: float = 60.0) -> str:
    # imported here: this file is also run as a plain MPI program, outside the test package
    from .conftest import run_scenario

    return run_scenario(__file__, n, scenario, timeout)


@pytest.mark.parametrize("n", [2, 4])
def test_service_api(n):
    _mpirun(n, "api")


def test_unresponsive_peer_times_out_naming_it():
    out = _mpirun(2, "timeout")
    assert "rank 1" in out


# ------------------------------------------------------------------ scenarios
ECHO, ADD, WHO, WHERE, FAIL, SLOW = range(1, 7)


def _echo(source: int, payload: memoryview) -> bytes:
    return bytes(payload)


def _scenario_api() -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    from mpi4py import MPI

    from cascade_kv.cluster.service import (
        SERVICE_SWITCH_INTERVAL,
        RemoteError,
        Service,
        ServiceClosed,
    )

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    peer = (rank + 1) % size

    def add(source: int, payload: memoryview) -> bytes:
        a, b = struct.unpack("<qq", payload)
        return struct.pack("<q", a + b)

    def who(source: int, payload: memoryview) -> bytes:
        return struct.pack("<ii", rank, source)

    def where(source: int, payload: memoryview) -> bytes:
        return threading.current_thread().name.encode()

    def fail(source: int, payload: memoryview) -> bytes:
        raise KeyError(f"digest {bytes(payload).hex()} is not homed here")

    svc = Service(comm, timeout=20, handlers={ECHO: _echo, ADD: add, WHO: who, FAIL: fail})
    svc.register(WHERE, where)
    # before the barrier: no peer can call yet, so no request is being answered (which lowers the interval
    # further while it lasts: a peer past the barrier made this assertion flaky after it)
    assert sys.getswitchinterval() == SERVICE_SWITCH_INTERVAL
    comm.Barrier()  # registered after construction: every rank must have done it before anyone calls

    # Ranks that reach an object allreduce while rank 0 still calls them must go on answering
    # (mpi4py's first one on a communicator holds the GIL; Service warms it up).
    if rank == 0:
        assert svc.call_many([(r, ECHO, b"first") for r in range(size)]) == [b"first"] * size
    assert comm.allreduce(1) == size

    # Across ranks: the handler runs on the peer's service thread and sees the caller's rank.
    assert svc.call(peer, ECHO, b"x" * 100) == b"x" * 100
    assert svc.call(peer, ECHO, b"") == b""
    big = os.urandom(4 << 20)  # far above any eager limit: the rendezvous path
    assert svc.call(peer, ECHO, big) == big
    assert svc.call(peer, ADD, struct.pack("<qq", rank, 1000)) == struct.pack("<q", rank + 1000)
    assert svc.call(peer, WHO, b"") == struct.pack("<ii", peer, rank)
    assert svc.call(peer, WHERE, b"") == f"cascade-service-{peer}".encode()

    # A call to oneself runs the handler here, on the calling thread.
    assert svc.call(rank, WHO, b"") == struct.pack("<ii", rank, rank)
    assert svc.call(rank, WHERE, b"") == threading.current_thread().name.encode()

    # call_many to every rank, several requests each, interleaved: replies in request order.
    reqs = [(i % size, ADD, struct.pack("<qq", i, rank)) for i in range(10 * size)]
    assert svc.call_many(reqs) == [struct.pack("<q", i + rank) for i in range(10 * size)]
    assert svc.call_many([]) == []

    # Many application threads at once: each gets its own replies.
    def worker(t: int) -> int:
        rng = random.Random(1000 * rank + t)
        for i in range(30):
            payload = f"{rank}:{t}:{i}".encode()
            assert svc.call(rng.randrange(size), ECHO, payload) == payload
        batch = [(rng.randrange(size), ECHO, f"{rank}:{t}:batch{i}".encode()) for i in range(20)]
        assert svc.call_many(batch) == [p for _, _, p in batch]
        return 1

    with ThreadPoolExecutor(8) as pool:
        finished = sum(pool.map(worker, range(8)))

    # A handler's exception comes back as RemoteError naming the rank and the remote error.
    for target in (peer, rank):
        try:
            svc.call(target, FAIL, b"\xab")
        except RemoteError as e:
            assert isinstance(e, RuntimeError) and e.rank == target and e.op == FAIL, e
            assert str(e).startswith(f"rank {target}: op {FAIL} failed: KeyError:"), e
            assert "digest ab is not homed here" in str(e), e
            assert (e.__cause__ is not None) == (target == rank)  # the local traceback is kept
        else:
            raise AssertionError("no RemoteError")
    try:
        svc.call(peer, 999, b"")
    except RemoteError as e:
        assert f"rank {peer}" in str(e) and "no handler registered for op 999" in str(e), e
    else:
        raise AssertionError("no RemoteError for an unknown op")
    # One failure in a batch fails the batch after all replies are in; the service goes on.
    try:
        svc.call_many([(r, ECHO, b"ok") for r in range(size)] + [(peer, FAIL, b"")])
    except RemoteError as e:
        assert e.rank == peer
    else:
        raise AssertionError("no RemoteError from call_many")
    assert svc.call_many([(r, ECHO, b"again") for r in range(size)]) == [b"again"] * size

    for bad, exc in (((size, ECHO, b""), ValueError), ((peer, -1, b""), ValueError),
                     ((peer, ECHO, "text"), TypeError)):
        try:
            svc.call_many([bad])
        except exc:
            pass
        else:
            raise AssertionError(f"{bad!r} accepted")

    # Global invariants: every rank finished every thread, and the home rules agree everywhere.
    assert comm.allreduce(finished) == 8 * size
    homes = [home_of_key(k, size) for k in ("a", b"a", "kv/0", b"\x00\xff")]
    assert comm.allgather(homes) == [homes] * size

    svc.close()
    svc.close()  # idempotent
    try:
        svc.call(peer, ECHO, b"")
    except ServiceClosed:
        pass
    else:
        raise AssertionError("call after close accepted")
    with Service(comm, timeout=20, handlers={ECHO: _echo}) as again:  # a second service on the same comm
        assert again.call(peer, ECHO, b"ctx") == b"ctx"
    assert threading.active_count() == 1, threading.enumerate()  # no service thread left behind
    assert sys.getswitchinterval() == 0.005
    print(f"rank {rank}: ok", flush=True)


def _scenario_timeout() -> None:
    from mpi4py import MPI

    from cascade_kv.cluster.service import Service
    from cascade_kv.errors import PeerTimeout

    timeout = 1.0
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    release = threading.Event()

    def slow(source: int, payload: memoryview) -> bytes:
        # Realistic stand-in for a peer that stops answering: its service thread is stuck
        # (here until the test releases it, so the job can still end cleanly).
        release.wait()
        return b"late"

    svc = Service(comm, timeout=timeout, handlers={ECHO: _echo, SLOW: slow})
    if rank == 0:
        # Rank 1's handler is held until rank 0 has seen both timeouts: a timeout that did not fire fails as
        # "no PeerTimeout" (or the job's own limit), whatever the machine's load; no clock of this test's decides.
        for requests in ([(1, SLOW, b"")], [(0, ECHO, b"mine"), (1, ECHO, b"queued behind the stuck one")]):
            try:
                svc.call_many(requests)
            except PeerTimeout as e:
                assert isinstance(e, TimeoutError)
                prefix = f"rank 0: no reply from rank 1 to op {requests[-1][1]} after "
                assert str(e).startswith(prefix), e
                # the wait the service measured on its own monotonic clock: no earlier than the timeout
                assert float(str(e)[len(prefix):].split()[0]) >= timeout, e
                print(f"rank 0: {e}", flush=True)
            else:
                raise AssertionError("no PeerTimeout")
        comm.send("release", dest=1)  # the application's communicator: the service's is its own
        # The late replies carry tags of their own: a new call gets its own reply, not theirs.
        assert svc.call(1, ECHO, b"after") == b"after"
        # Rank 1's one service thread sent the late replies before its reply to "after", and Open MPI delivers
        # one peer's messages in order: the next call's drain finds them. Counted calls, not a deadline.
        for _ in range(100):
            if not svc._abandoned:
                break
            svc.call(1, ECHO, b"")  # each call drains the late replies that arrived
        assert not svc._abandoned, svc._abandoned
    else:
        assert comm.recv(source=0) == "release"
        release.set()
    svc.close()
    assert threading.active_count() == 1, threading.enumerate()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    {"api": _scenario_api, "timeout": _scenario_timeout}[sys.argv[1]]()
