"""The global directory over real ranks.

Like ``test_service.py``, this file is also the MPI program (``python -m mpi4py
test_directory.py <scenario>``). MPI is imported only inside the scenario:
importing it here would initialise MPI in the pytest process.
"""
from __future__ import annotations

import sys
import time

import pytest


def _mpirun(n: int, scenario: str, timeout: float = 60.0) -> str:
    # imported here: this file is also run as a plain MPI program, outside the test package
    from .conftest import run_scenario

    return run_scenario(__file__, n, scenario, timeout)


@pytest.mark.parametrize("n", [2, 4])
def test_directory_protocol(n):
    _mpirun(n, "protocol")


# ------------------------------------------------------------------ scenarios
def _scenario_protocol() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import blake3
    from mpi4py import MPI

    from cascade_kv.cluster.directory import (
        TIER_DISK,
        TIER_MEMORY,
        Claim,
        ClaimStatus,
        CopyStatus,
        Directory,
        KeyRecord,
        LoadStatus,
        Located,
        Location,
        Released,
    )
    from cascade_kv.cluster.homes import home_of_digest, home_of_key
    from cascade_kv.cluster.service import RemoteError, Service
    from cascade_kv.errors import PeerTimeout
    from cascade_kv.ids import Digest

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    svc = Service(comm, timeout=20)
    directory = Directory(svc)
    comm.Barrier()  # every rank has registered the handlers before anyone calls

    # 1. Every rank claims the same digest at once: one grant cluster-wide, the rest wait for it.
    shared = Digest(blake3.blake3(b"shared block").digest())
    nbytes = 1 << 20
    comm.Barrier()
    first = directory.claim(shared, nbytes)
    granted = first.status is ClaimStatus.GRANTED
    assert first.status in (ClaimStatus.GRANTED, ClaimStatus.PENDING), first
    assert comm.allreduce(int(granted)) == 1
    owner = comm.allreduce(rank if granted else 0)
    loc = Location(rank=owner, tier=TIER_MEMORY, offset=64 * owner, nbytes=nbytes, generation=1000 + owner)
    if granted:
        directory.publish(shared, loc)
    else:
        assert first.pending_rank == owner, (first, owner)
        settled = directory.claim_settled(shared, nbytes, timeout=10)
        assert settled.status is ClaimStatus.EXISTS and settled.locations == (loc,), settled

    # Again with 4 threads per rank: the home's own threads race with its service thread.
    contested = Digest(blake3.blake3(b"contested block").digest())
    comm.Barrier()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: directory.claim(contested, 10), range(4)))
    grants = sum(a.status is ClaimStatus.GRANTED for a in answers)
    assert comm.allreduce(grants) == 1
    assert comm.allreduce(sum(a.status is ClaimStatus.PENDING for a in answers)) == 4 * size - 1
    holder = comm.allreduce(rank if grants else 0)
    if grants:
        for r in range(size):  # hold the grant until every other rank gave up waiting for it
            if r != rank:
                assert comm.recv(source=r) == "timed out"
        directory.publish(contested, Location(rank, TIER_MEMORY, 0, 10, 1))
        # PENDING answers take no reference: the grant's is the only one, so its unref frees the copy
        assert directory.unref(contested) == Released(True, False, (Location(rank, TIER_MEMORY, 0, 10, 1),))
        directory.forget_many([contested])  # copy freed: end the free grant
    else:
        t0 = time.monotonic()
        try:
            directory.claim_settled_many([(contested, 10)] * 3, timeout=0.05)
        except PeerTimeout as e:
            # not before the timeout (the holder keeps the grant until told, so only the timeout ends the wait;
            # no upper bound: a loaded 2-core machine may take long to deliver it, and a wait that never ends
            # fails the job's own timeout)
            assert time.monotonic() - t0 >= 0.05, e
            assert f"still pending on rank {holder} (3 claim(s) pending)" in str(e), e
        else:
            raise AssertionError("no PeerTimeout while the grant is held")
        comm.send("timed out", dest=holder)
    comm.Barrier()  # each rank reads its own state below: the granting rank's unref must be in
    assert comm.allreduce(len(directory.state)) == 1  # only the shared digest is left

    # 2. Rank 0 binds a key; the others look it up as soon as rank 0 says so (no barrier between).
    record = KeyRecord(shared, "<f4", (256, 1024), prefix=False)
    key = "layer0/block0"
    if rank == 0:
        assert directory.bind(key, record) is None
        for r in range(1, size):
            comm.send("bound", dest=r)
    else:
        assert comm.recv(source=0) == "bound"
    found = directory.lookup(key)
    assert found == record, found
    where = directory.locate(found.digest)
    assert comm.allgather((found, where)) == [(record, Located((loc,), 0))] * size

    # 3. Batches over every home: private digests, each granted to its claimant, then deduplicated.
    mine = [Digest(blake3.blake3(f"{rank}/{i}".encode()).digest()) for i in range(8 * size)]
    assert {home_of_digest(d, size) for d in mine} == set(range(size))
    assert {c.status for c in directory.claim_many([(d, 100 + i) for i, d in enumerate(mine)])} == {
        ClaimStatus.GRANTED}
    locs = [Location(rank, TIER_MEMORY, i, 100 + i, i) for i in range(len(mine))]
    directory.publish_many(list(zip(mine, locs, strict=True)))
    assert directory.locate_many(mine) == [Located((x,), 0) for x in locs]
    hits = directory.claim_many([(d, 100 + i) for i, d in enumerate(mine)])
    assert [c.locations for c in hits] == [(x,) for x in locs]
    keys = [f"r{rank}/k{i}" if i % 2 else f"r{rank}/k{i}".encode() for i in range(len(mine))]
    assert {home_of_key(k, size) for k in keys} == set(range(size))
    records = [KeyRecord(d, "|u1", (100 + i,), prefix=bool(i % 3 == 0)) for i, d in enumerate(mine)]
    assert directory.bind_many(list(zip(keys, records, strict=True))) == [None] * len(keys)
    assert directory.lookup_many(keys) == records
    # rebinding returns the old record, and unbind the current one
    assert directory.bind(keys[0], records[1]) == records[0]
    assert directory.unbind(keys[0]) == records[1]
    assert directory.lookup(keys[0]) is None and directory.unbind(keys[0]) is None
    # set_prefix answers the record before the change
    assert directory.set_prefix(keys[1], True) == records[1] and not records[1].prefix
    assert directory.lookup(keys[1]) == KeyRecord(mine[1], "|u1", (101,), prefix=True)
    assert directory.set_prefix(keys[0], True) is None  # not bound
    assert directory.unref_many(mine) == [Released(False, False)] * len(mine)  # two references each: one left
    assert directory.unref_many(mine) == [Released(True, False, (x,)) for x in locs]  # zero: the copies to free
    assert directory.locate_many(mine) == [Located((), 0)] * len(mine)
    directory.forget_many(mine)

    # moves, copies and protection, at a remote home where there is one
    d = next(x for x in mine if home_of_digest(x, size) == (rank + 1) % size)
    assert directory.claim(d, 5, prefix=True) == Claim(ClaimStatus.GRANTED, protected=1)
    old, new = Location(rank, TIER_MEMORY, 0, 5, 1), Location(rank, TIER_MEMORY, 64, 5, 2)
    disk = Location(rank, TIER_DISK, 0, 5, 0)
    directory.publish(d, old)
    assert directory.move(d, old, new) and not directory.move(d, old, new)
    directory.publish(d, disk)
    assert directory.drop_copy(d, new) == (CopyStatus.LAST, 1)  # protected: the disk copy is not enough
    assert directory.claim(d, 5) == Claim(ClaimStatus.EXISTS, (new, disk), protected=1)
    assert directory.unref(d, prefix=True) == Released(False, True, (new, disk))  # protection ended
    assert directory.set_protected(d, 1) == Located((new, disk), 1)
    assert directory.set_protected(d, -1) == Located((new, disk), 0)
    assert directory.drop_copy(d, new) == (CopyStatus.REMOVED, 0)  # unprotected: the disk copy keeps it
    assert directory.drop_copy(d, new, force=True) == (CopyStatus.GONE, 0)
    assert directory.unref(d) == Released(True, False, (disk,))
    directory.forget_many([d])
    try:
        directory.publish(d, old)  # forgotten: a failure at the home comes back as RemoteError
    except RemoteError as e:
        assert e.remote_type == "BlockNotFound", e
    else:
        raise AssertionError("publish of a forgotten digest accepted")

    # 4. Load leases: every rank asks at once to load the same disk-only block; exactly one reads the
    # file, the others wait for its memory copy.
    cold, unknown = (Digest(blake3.blake3(x).digest()) for x in (b"cold block", b"never stored"))
    on_disk = Location(0, TIER_DISK, 0, 4096, 0)
    if rank == 0:
        assert directory.claim(cold, 4096).status is ClaimStatus.GRANTED
        directory.publish(cold, on_disk)
    comm.Barrier()
    lease, missing = directory.load_many([cold, unknown])
    assert missing == Located((), 0, LoadStatus.MISSING), missing
    loader = lease.status is LoadStatus.GRANTED
    assert comm.allreduce(int(loader)) == 1
    first_loader = comm.allreduce(rank if loader else 0)
    assert loader or lease == Located((on_disk,), 0, LoadStatus.PENDING, first_loader), lease
    comm.Barrier()
    if loader:  # its read failed: it gives the lease back, and the next round has one loader again
        directory.forget_many([cold])
    comm.Barrier()
    loader = directory.load_many([cold])[0].status is LoadStatus.GRANTED
    assert comm.allreduce(int(loader)) == 1
    second_loader = comm.allreduce(rank if loader else 0)
    loaded = Location(second_loader, TIER_MEMORY, 128, 4096, 5)
    if loader:
        directory.publish(cold, loaded)  # ends the lease
    comm.Barrier()
    assert directory.load_many([cold]) == [Located((on_disk, loaded), 0, LoadStatus.IN_MEMORY)]
    comm.Barrier()
    if rank == 0:  # the claim's reference was the only one
        assert directory.unref(cold) == Released(True, False, (on_disk, loaded))
        directory.forget_many([cold])

    # 5. Unref to zero. Each rank's claim took one reference; rank 0's became the key's when it
    # bound the key (as in a put), so rank 0 unbinds first, then every rank drops one.
    comm.Barrier()
    if rank == 0:
        assert directory.unbind(key) == record
    freed = directory.unref(shared)
    assert comm.allreduce(int(freed.freed)) == 1  # exactly one unref reached zero, and it returned the one copy
    assert freed == (Released(True, False, (loc,)) if freed.freed else Released(False, False)), freed
    if freed.freed:
        directory.forget_many([shared])
    comm.Barrier()
    assert directory.locate(shared) == Located((), 0)
    assert comm.allreduce(len(directory.state)) == 0  # nothing left anywhere

    svc.close()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    {"protocol": _scenario_protocol}[sys.argv[1]]()
