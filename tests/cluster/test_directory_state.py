"""Unit tests of the directory's per-rank state machine and its wire encoding (no MPI)."""
from __future__ import annotations

import threading

import pytest

from cascade_kv.cluster.directory import (
    LOCATION,
    Claim,
    ClaimStatus,
    DirectoryState,
    KeyRecord,
    Location,
    _key,
    _locations,
    _Reader,
    _record,
)
from cascade_kv.errors import BlockNotFound
from cascade_kv.ids import Digest

D = Digest(bytes(range(32)))
E = Digest(bytes(range(1, 33)))
LOC = Location(rank=1, tier=0, offset=4096, nbytes=100, generation=7)
LOC2 = Location(rank=2, tier=0, offset=0, nbytes=100, generation=9)


def test_second_claim_is_a_dedup_hit_after_publish():
    s = DirectoryState()
    assert s.claim(D, 100, rank=1, now=0.0) == Claim(ClaimStatus.GRANTED)
    s.publish(D, LOC)
    assert s.claim(D, 100, rank=2, now=0.1) == Claim(ClaimStatus.EXISTS, (LOC,))
    assert s.locate(D) == [LOC]
    assert s.locate(E) == []  # a miss is a value


def test_concurrent_claims_one_grant_others_pending_until_publish():
    s = DirectoryState(lease_s=5)
    answers = [s.claim(D, 100, rank=r, now=1.0) for r in range(4)]
    assert [a.status for a in answers] == [ClaimStatus.GRANTED] + [ClaimStatus.PENDING] * 3
    assert all(a.pending_rank == 0 for a in answers[1:])
    assert s.claim(D, 100, rank=3, now=5.9).status is ClaimStatus.PENDING  # polling takes no reference
    s.publish(D, LOC)
    assert [s.claim(D, 100, rank=r, now=2.0).status for r in (1, 2, 3)] == [ClaimStatus.EXISTS] * 3
    # 4 references: the grant and three hits (not the PENDING answers)
    assert [s.unref(D) for _ in range(3)] == [[], [], []]
    assert s.unref(D) == [LOC] and len(s) == 0


def test_threads_racing_for_one_digest_get_one_grant():
    s = DirectoryState()
    barrier, got = threading.Barrier(8), []

    def claim(r):
        barrier.wait()
        got.append(s.claim(D, 100, rank=r, now=0.0).status)

    threads = [threading.Thread(target=claim, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [ClaimStatus.GRANTED] + [ClaimStatus.PENDING] * 7


def test_lapsed_grant_is_granted_again():
    s = DirectoryState(lease_s=2)
    assert s.claim(D, 100, rank=0, now=10.0).status is ClaimStatus.GRANTED
    assert s.claim(D, 100, rank=1, now=11.9).status is ClaimStatus.PENDING
    assert s.claim(D, 100, rank=1, now=12.0).status is ClaimStatus.GRANTED  # rank 0 is presumed dead
    assert s.claim(D, 100, rank=2, now=12.5) == Claim(ClaimStatus.PENDING, pending_rank=1)
    s.publish(D, LOC)
    s.publish(D, LOC2)  # the slow first claimant publishes late: a second copy, not an error
    assert s.claim(D, 100, rank=2, now=13.0) == Claim(ClaimStatus.EXISTS, (LOC, LOC2))


def test_refcounts_free_at_zero_and_forget():
    s = DirectoryState()
    s.claim(D, 100, 1, 0.0)
    s.publish(D, LOC)
    s.claim(D, 100, 2, 0.0)
    assert s.unref(D) == []
    assert s.unref(D) == [LOC]
    assert s.locate(D) == [] and len(s) == 0
    with pytest.raises(BlockNotFound):
        s.unref(D)
    # forgotten: the next claim stores it again
    assert s.claim(D, 100, 3, 0.0).status is ClaimStatus.GRANTED


def test_move_protect_and_checks():
    s = DirectoryState()
    s.claim(D, 100, 1, 0.0)
    s.publish(D, LOC)
    assert s.move(D, LOC, LOC2) and s.locate(D) == [LOC2]
    assert not s.move(D, LOC, LOC2)  # stale mover: nothing changes
    assert not s.move(E, LOC, LOC2)
    assert s.set_protected(D, +2) == 2 and s.set_protected(D, -1) == 1
    with pytest.raises(ValueError, match="protected"):
        s.set_protected(D, -2)
    with pytest.raises(ValueError, match="claimed with 5 B"):
        s.claim(D, 5, 1, 0.0)
    with pytest.raises(ValueError, match="published"):
        s.publish(D, Location(1, 0, 0, 99, 1))
    with pytest.raises(BlockNotFound):
        s.publish(E, LOC)
    with pytest.raises(ValueError, match="lease_s"):
        DirectoryState(lease_s=0)


def test_bind_lookup_unbind():
    s = DirectoryState()
    r1 = KeyRecord(D, "<f4", (2, 3), prefix=True)
    r2 = KeyRecord(E, "|u1", ())
    assert s.lookup("k") is None
    assert s.bind("k", r1) is None
    assert s.lookup("k") == r1 and s.lookup(b"k") is None  # "k" and b"k" are different keys
    assert s.bind("k", r2) == D  # the old digest, for the caller to unref
    assert s.lookup("k") == r2
    assert s.unbind("k") == E
    assert s.unbind("k") is None and s.lookup("k") is None


def test_wire_records_round_trip():
    rec = KeyRecord(D, "<f2", (1, 2**40, 0), prefix=True)
    r = _Reader(_key("é/k") + _key(b"\x00b") + _record(rec) + _locations([LOC, LOC2]) + _locations([]))
    assert (r.key(), r.key(), r.record(), r.locations(), r.locations()) == ("é/k", b"\x00b", rec, (LOC, LOC2), ())
    r.done()
    assert LOCATION.size == 29
    with pytest.raises(ValueError, match="ends inside"):
        _Reader(_locations([LOC])[:-1]).locations()
    with pytest.raises(ValueError, match="after its last record"):
        r = _Reader(_key("a") + b"x")
        r.key()
        r.done()
