"""Idle ranks sleep in the kernel and wake on a ring (issue 12): the service's hot window, its doorbell,
the caller's ring-again backstop, and one-sided reads from a rank whose threads all sleep.

Also its own MPI program (``python -m mpi4py test_service_idle.py SCENARIO``). Order between ranks is
fixed by messages and by the service's ``asleep`` event, never by the clock: a rank says it is asleep
only once its service thread has gone to sleep, and the other acts on that message.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from cascade_kv.cluster.doorbell import ADDRESS_VARIABLE, Doorbells, own_address
from cascade_kv.errors import ConfigError

WAIT_S = 30.0  # a safety bound on event waits: only a broken service reaches it
_ECHO = 1


# ------------------------------------------------------------------ doorbell alone (no MPI)
def test_doorbell_rings_wakes_and_drains():
    bell = Doorbells()
    try:
        bell.connect([bell.card()], 0)
        assert not bell.drain()
        bell.ring(0)
        bell.wait()  # returns: a ring is waiting (a broken ring would hang here, bounded by the test runner)
        assert bell.drain() and not bell.drain()
    finally:
        bell.close()


def test_doorbell_refuses_a_peer_it_cannot_reach():
    bell = Doorbells()
    try:
        cards = [bell.card(), ("other-host", None, 1234)]
        with pytest.raises(ConfigError, match=ADDRESS_VARIABLE) as e:
            bell.connect(cards, 0)
        assert "rank 1" in str(e.value) and "other-host" in str(e.value)
        bell.connect([bell.card(), ("other-host", "10.1.2.3", 1234)], 0)  # an address given: fine
    finally:
        bell.close()


def test_doorbell_address_variable():
    assert own_address({ADDRESS_VARIABLE: "10.0.0.7"}) == "10.0.0.7"
    with pytest.raises(ConfigError, match="not an IPv4 address"):
        own_address({ADDRESS_VARIABLE: "node-7"})


# ------------------------------------------------------------------ under mpiexec
def test_idle_service_sleeps_and_wakes_on_a_ring():
    from .conftest import run_scenario

    run_scenario(__file__, 2, "wake", timeout=90)


def test_a_lost_ring_is_rung_again():
    from .conftest import run_scenario

    run_scenario(__file__, 2, "lost_ring", timeout=90)


def test_a_wake_up_that_brings_no_request_sleeps_again():
    from .conftest import run_scenario

    run_scenario(__file__, 2, "stray_ring", timeout=90)


def test_a_hot_peer_is_not_rung():
    from .conftest import run_scenario

    run_scenario(__file__, 2, "hot", timeout=90)


@pytest.mark.parametrize("transport", ["sm", "tcp"])
def test_one_sided_reads_from_a_sleeping_rank(transport, monkeypatch):
    from .conftest import run_scenario

    if transport == "tcp":  # separate nodes emulated: no shared memory between the ranks
        monkeypatch.setenv("OMPI_MCA_btl", "tcp,self")
        monkeypatch.setenv("OMPI_MCA_osc", "rdma")
    run_scenario(__file__, 2, "sleeping_owner", timeout=120)


def _asleep(svc, comm, rank: int) -> None:
    """Rank ``rank`` waits for its service thread to sleep, then tells every other rank."""
    if comm.Get_rank() == rank:
        if not svc.asleep.wait(WAIT_S):
            raise AssertionError(f"rank {rank}: the service thread never went to sleep")
        for r in range(comm.Get_size()):
            if r != rank:
                comm.send("asleep", dest=r, tag=11)
    else:
        assert comm.recv(source=rank, tag=11) == "asleep"


def _wake(comm) -> None:
    from cascade_kv.cluster.service import Service

    rank = comm.Get_rank()
    served = []
    svc = Service(comm, hot_s=0.005, handlers={_ECHO: lambda source, p: served.append(source) or bytes(p)})
    for round_ in range(3):
        _asleep(svc, comm, 1)
        if rank == 0:
            sleeps = svc.call(1, _ECHO, b"")  # any reply proves the ring woke it
            assert sleeps == b""
            assert svc.call(1, _ECHO, b"round %d" % round_) == b"round %d" % round_
        comm.Barrier()
        if rank == 1:
            assert served == [0] * (2 * (round_ + 1)), served
            assert svc.sleeps >= round_ + 1, svc.sleeps
    svc.close()
    print(f"rank {rank}: ok", flush=True)


def _stray_ring(comm) -> None:
    """A ring with no request behind it (a stray datagram, or one that came after its request was served) wakes
    the service thread; it must go back to sleep, not poll MPI until some request comes."""
    import time

    from cascade_kv.cluster.service import Service

    rank = comm.Get_rank()
    svc = Service(comm, hot_s=0.005, handlers={_ECHO: lambda source, p: bytes(p)})
    _asleep(svc, comm, 1)
    if rank == 0:
        svc._doorbells.ring(1)
    elif rank == 1:
        deadline = time.monotonic() + WAIT_S  # a bound, not a synchronisation: the count decides
        while svc.sleeps < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc.sleeps >= 2, f"woken by a ring with no request, the service never slept again ({svc.sleeps})"
    comm.Barrier()
    svc.close()
    print(f"rank {rank}: ok", flush=True)


def _lost_ring(comm) -> None:
    from cascade_kv.cluster.service import Service

    rank = comm.Get_rank()
    svc = Service(comm, hot_s=0.005, handlers={_ECHO: lambda source, p: bytes(p)})
    rings = []
    real_ring = svc._doorbells.ring

    def first_ring_lost(r: int) -> None:
        rings.append(r)
        if len(rings) > 1:  # the first ring is "lost on the network"
            real_ring(r)

    _asleep(svc, comm, 1)
    if rank == 0:
        svc._doorbells.ring = first_ring_lost
        assert svc.call(1, _ECHO, b"late") == b"late"
        assert len(rings) >= 2 and set(rings) == {1}, rings
        svc._doorbells.ring = real_ring
    comm.Barrier()
    svc.close()
    print(f"rank {rank}: ok", flush=True)


def _hot(comm) -> None:
    from cascade_kv.cluster import service
    from cascade_kv.cluster.service import Service

    rank = comm.Get_rank()
    # A window far longer than the test: the peer never sleeps, so only the first call needs a ring. A call
    # that waits past RING_AGAIN_S rings again (a lost ring must not hang it): on a loaded machine a reply can
    # take that long, and this test is about the ring before sending, so the waits here never ring again.
    service.RING_AGAIN_S = 3600.0
    svc = Service(comm, hot_s=3600.0, handlers={_ECHO: lambda source, p: bytes(p)})
    if rank == 0:
        rings = []
        real_ring = svc._doorbells.ring
        svc._doorbells.ring = lambda r: (rings.append(r), real_ring(r))
        for i in range(20):
            assert svc.call(1, _ECHO, b"%d" % i) == b"%d" % i
        assert rings == [1], rings
        svc._doorbells.ring = real_ring
    comm.Barrier()
    assert svc.sleeps == 0
    svc.close()
    print(f"rank {rank}: ok", flush=True)


def _sleeping_owner(comm) -> None:
    from cascade_kv.cluster.store import DistributedStore

    rank = comm.Get_rank()
    n, size = 24, 2 << 20
    keys = [f"block{i}" for i in range(n)]
    with DistributedStore(comm=comm, host_capacity=128 << 20, locality_aware=False, timeout=60) as store:
        if rank == 1:
            store.put_many(keys, [np.full(size, i, np.uint8) for i in range(n)])
        comm.Barrier()
        _asleep(store.service, comm, 1)
        if rank == 0:
            before = [store.locations(k)[0].rank for k in keys]
            assert set(before) == {1}, before  # every copy is rank 1's: the reads are one-sided
            for _ in range(2):
                outs = store.get_many(keys)
                assert all(int(o[0]) == i and int(o[-1]) == i and o.nbytes == size for i, o in enumerate(outs))
        comm.Barrier()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    from mpi4py import MPI

    {"wake": _wake, "lost_ring": _lost_ring, "hot": _hot, "sleeping_owner": _sleeping_owner,
     "stray_ring": _stray_ring}[sys.argv[1]](MPI.COMM_WORLD)
