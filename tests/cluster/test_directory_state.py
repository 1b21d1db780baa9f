"""Unit tests of the directory's per-rank state machine and its wire encoding (no MPI)."""
from __future__ import annotations

import threading

import pytest

from cascade_kv.cluster.directory import (
    LOCATION,
    TIER_DISK,
    TIER_MEMORY,
    Claim,
    ClaimStatus,
    CopyStatus,
    DirectoryState,
    HomeStats,
    KeyRecord,
    LoadStatus,
    Located,
    Location,
    Released,
)
from cascade_kv.cluster.directory.codec import (
    _key,
    _located,
    _locations,
    _optional_record,
    _read_located,
    _read_optional_record,
    _Reader,
    _record,
)
from cascade_kv.errors import BlockNotFound
from cascade_kv.ids import Digest

D = Digest(bytes(range(32)))
E = Digest(bytes(range(1, 33)))
LOC = Location(rank=1, tier=TIER_MEMORY, offset=4096, nbytes=100, generation=7)
LOC2 = Location(rank=2, tier=TIER_MEMORY, offset=0, nbytes=100, generation=9)
DISK = Location(rank=1, tier=TIER_DISK, offset=0, nbytes=100, generation=0)
DISK2 = Location(rank=3, tier=TIER_DISK, offset=0, nbytes=100, generation=0)
"""The same shared file as DISK, written (or published again) by another rank."""

GRANTED, EXISTS, PENDING = ClaimStatus.GRANTED, ClaimStatus.EXISTS, ClaimStatus.PENDING
REMOVED, LAST, GONE = CopyStatus.REMOVED, CopyStatus.LAST, CopyStatus.GONE


def stored(*locations: Location, lease_s: float = 10.0, prefix: bool = False) -> DirectoryState:
    """A state where rank 1 claimed D (one reference, a prefix one if ``prefix``) and published ``locations``."""
    s = DirectoryState(lease_s=lease_s)
    assert s.claim(D, 100, rank=1, now=0.0, prefix=prefix).status is GRANTED
    for loc in locations:
        s.publish(D, loc)
    return s


# ------------------------------------------------------------------ claims
def test_second_claim_is_a_dedup_hit_after_publish():
    s = DirectoryState()
    assert s.claim(D, 100, rank=1, now=0.0) == Claim(GRANTED)
    s.publish(D, LOC)
    assert s.claim(D, 100, rank=2, now=0.1) == Claim(EXISTS, (LOC,))
    assert s.locate(D) == Located((LOC,), 0)
    assert s.locate(E) == Located((), 0)  # a miss is a value


def test_concurrent_claims_one_grant_others_pending_until_publish():
    s = DirectoryState(lease_s=5)
    answers = [s.claim(D, 100, rank=r, now=1.0) for r in range(4)]
    assert [a.status for a in answers] == [GRANTED] + [PENDING] * 3
    assert all(a.pending_rank == 0 for a in answers[1:])
    assert s.claim(D, 100, rank=3, now=5.9).status is PENDING  # polling takes no reference
    s.publish(D, LOC)
    assert [s.claim(D, 100, rank=r, now=2.0).status for r in (1, 2, 3)] == [EXISTS] * 3
    # 4 references: the grant and three hits (not the PENDING answers)
    assert [s.unref(D, rank=r, now=3.0) for r in (1, 2, 3)] == [Released(False, False)] * 3
    assert s.unref(D, rank=0, now=3.0) == Released(True, False, (LOC,))
    s.forget(D, rank=0)
    assert len(s) == 0


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
    assert sorted(got) == [GRANTED] + [PENDING] * 7


def test_lapsed_grant_is_granted_again():
    s = DirectoryState(lease_s=2)
    assert s.claim(D, 100, rank=0, now=10.0).status is GRANTED
    assert s.claim(D, 100, rank=1, now=11.9).status is PENDING
    assert s.claim(D, 100, rank=1, now=12.0).status is GRANTED  # rank 0 is presumed dead
    assert s.claim(D, 100, rank=2, now=12.5) == Claim(PENDING, pending_rank=1)
    s.publish(D, LOC)
    s.publish(D, LOC2)  # the slow first claimant publishes late: a second copy, not an error
    assert s.claim(D, 100, rank=2, now=13.0) == Claim(EXISTS, (LOC, LOC2))


def test_failed_put_gives_its_grant_back():
    s = DirectoryState()
    assert s.claim(D, 100, rank=1, now=0.0).status is GRANTED
    assert s.claim(D, 100, rank=2, now=0.1) == Claim(PENDING, pending_rank=1)
    # rank 1's store failed: its unref ends the grant, and nothing refers to the digest any more
    assert s.unref(D, rank=1, now=0.2) == Released(True, False, ())
    assert len(s) == 0
    assert s.claim(D, 100, rank=2, now=0.3) == Claim(GRANTED)


def test_prefix_claims_count_protection():
    s = DirectoryState()
    assert s.claim(D, 100, rank=1, now=0.0, prefix=True) == Claim(GRANTED, protected=1)
    assert s.claim(D, 100, rank=2, now=0.0, prefix=True) == Claim(PENDING, pending_rank=1)  # counts nothing
    s.publish(D, LOC)
    assert s.claim(D, 100, rank=2, now=0.1, prefix=True) == Claim(EXISTS, (LOC,), protected=2)
    assert s.claim(D, 100, rank=3, now=0.1) == Claim(EXISTS, (LOC,), protected=2)
    assert s.locate(D) == Located((LOC,), 2)
    assert s.unref(D, rank=1, now=0.2, prefix=True) == Released(False, False)  # one prefix reference left
    # the last prefix reference went while another remains: LOC's owner must learn it is unprotected
    assert s.unref(D, rank=2, now=0.2, prefix=True) == Released(False, True, (LOC,))
    with pytest.raises(ValueError, match="prefix reference"):
        s.unref(D, rank=3, now=0.2, prefix=True)
    assert s.locate(D) == Located((LOC,), 0)  # the refused unref changed nothing
    assert s.unref(D, rank=3, now=0.2) == Released(True, False, (LOC,))


def test_last_reference_going_frees_even_when_it_is_a_prefix_one():
    s = stored(LOC, prefix=True)
    assert s.unref(D, rank=1, now=0.0, prefix=True) == Released(True, False, (LOC,))  # freed, not "unprotected"


# -------------------------------------------------------------- free grant
def test_free_grant_holds_claims_until_forget():
    s = stored(LOC, DISK)
    assert s.claim(D, 100, rank=2, now=0.0).status is EXISTS
    assert s.unref(D, rank=2, now=1.0) == Released(False, False)
    assert s.unref(D, rank=1, now=1.0) == Released(True, False, (LOC, DISK))  # rank 1 frees these
    assert s.locate(D) == Located((), 0) and len(s) == 1  # unlisted, but known until forgotten
    # a claim now must not be told EXISTS (the copies are being freed) nor store a copy the cleanup may delete
    assert s.claim(D, 100, rank=3, now=2.0) == Claim(PENDING, pending_rank=1)
    assert s.load(D, rank=3, now=2.0).status is LoadStatus.MISSING
    s.forget(D, rank=3)  # not the grantee: nothing changes
    assert s.claim(D, 100, rank=3, now=2.0) == Claim(PENDING, pending_rank=1)
    s.forget(D, rank=1)
    assert len(s) == 0
    with pytest.raises(BlockNotFound):
        s.unref(D)
    s.forget(D, rank=1)  # forgetting an unknown digest is a no-op
    assert s.claim(D, 100, rank=3, now=2.0) == Claim(GRANTED)  # forgotten: the next claim stores it again


def test_lapsed_free_grant_lets_a_claim_through():
    s = stored(LOC, lease_s=2)
    assert s.unref(D, rank=1, now=10.0) == Released(True, False, (LOC,))
    assert s.claim(D, 100, rank=2, now=11.9).status is PENDING
    assert s.claim(D, 100, rank=2, now=12.0) == Claim(GRANTED)  # rank 1 is presumed dead
    s.forget(D, rank=1)  # the slow freer's forget ends neither rank 2's grant nor the entry
    assert len(s) == 1
    assert s.claim(D, 100, rank=3, now=12.5) == Claim(PENDING, pending_rank=2)
    s.publish(D, LOC2)
    assert s.claim(D, 100, rank=3, now=13.0) == Claim(EXISTS, (LOC2,))


def test_publish_racing_a_free_is_refused_and_leaves_nothing_behind():
    # Rank 2 holds the load lease of disk-only D; the last reference goes (rank 1 frees) before rank 2
    # publishes its loaded copy: listing it would outlive every key, so the home refuses and rank 2 frees it.
    s = stored(DISK)
    assert s.load(D, rank=2, now=0.0).status is LoadStatus.GRANTED
    assert s.unref(D, rank=1, now=0.5) == Released(True, False, (DISK,))
    with pytest.raises(BlockNotFound):
        s.publish(D, LOC2)
    s.forget(D, rank=1)
    assert len(s) == 0


# -------------------------------------------------------------- load lease
def test_load_lease_one_reader_loads_a_disk_only_block():
    s = stored(DISK, lease_s=2)
    assert s.load(D, rank=0, now=10.0) == Located((DISK,), 0, LoadStatus.GRANTED)
    assert [s.load(D, rank=r, now=10.5) for r in (2, 3)] == [Located((DISK,), 0, LoadStatus.PENDING, 0)] * 2
    assert s.claim(D, 100, rank=2, now=10.5) == Claim(EXISTS, (DISK,))  # a put is a dedup hit meanwhile
    s.publish(D, LOC)  # the loader's memory copy ends the lease
    assert s.load(D, rank=2, now=10.6) == Located((DISK, LOC), 0, LoadStatus.IN_MEMORY)
    assert s.load(D, rank=3, now=10.6).memory == (LOC,)


def test_load_lease_lapses_or_is_given_back():
    s = stored(DISK, lease_s=2)
    assert s.load(D, rank=0, now=10.0).status is LoadStatus.GRANTED
    assert s.load(D, rank=1, now=11.9).status is LoadStatus.PENDING
    assert s.load(D, rank=1, now=12.0).status is LoadStatus.GRANTED  # rank 0 is presumed dead
    assert s.load(D, rank=0, now=12.1) == Located((DISK,), 0, LoadStatus.PENDING, 1)
    s.forget(D, rank=3)  # not the grantee: nothing changes
    assert s.load(D, rank=2, now=12.2).status is LoadStatus.PENDING
    s.forget(D, rank=1)  # rank 1's read failed (or found no room): the next reader loads it
    assert s.load(D, rank=2, now=12.3).status is LoadStatus.GRANTED
    assert s.locate(D) == Located((DISK,), 0)  # forget of a referenced digest keeps it


def test_load_lease_carries_protection_and_misses_are_values():
    assert stored(DISK, prefix=True).load(D, rank=2, now=0.0) == Located((DISK,), 1, LoadStatus.GRANTED)
    s = DirectoryState()
    assert s.load(E, rank=0, now=0.0) == Located((), 0, LoadStatus.MISSING) and len(s) == 0  # unknown
    s.claim(D, 100, rank=1, now=0.0, prefix=True)
    assert s.load(D, rank=2, now=0.0) == Located((), 1, LoadStatus.MISSING)  # claimed, no copy yet


# ------------------------------------------------------------------ copies
def test_publish_and_move_never_list_two_disk_copies():
    s = stored(LOC, LOC, DISK, DISK2)  # the same location twice, and the shared file twice
    assert s.locate(D).locations == (LOC, DISK)
    assert s.move(D, LOC, LOC2) and s.locate(D).locations == (DISK, LOC2)
    assert not s.move(D, LOC, LOC2)  # stale mover: nothing changes
    assert not s.move(E, LOC, LOC2)
    assert s.move(D, LOC2, DISK2)  # to disk where the file is listed already: just removes the old copy
    assert s.locate(D).locations == (DISK,)
    s = stored(LOC)
    assert s.move(D, LOC, DISK) and s.locate(D).locations == (DISK,)
    s.unref(D, rank=1, now=0.0)
    assert not s.move(D, DISK, LOC)  # being freed: no copy is listed


def test_drop_copy_answers():
    s = stored(LOC, LOC2, DISK)
    assert s.set_protected(D, +1).protected == 1
    assert s.drop_copy(D, LOC) == (REMOVED, 1)  # another memory copy keeps a protected block
    assert s.drop_copy(D, LOC) == (GONE, 0)  # not listed any more
    assert s.drop_copy(D, LOC2) == (LAST, 1)  # last memory copy of a protected block: disk is not enough
    assert s.locate(D).locations == (LOC2, DISK)
    assert s.drop_copy(D, LOC2, force=True) == (REMOVED, 1)  # a drop: nowhere left to put it

    s = stored(LOC, DISK)  # unprotected: the disk copy keeps the block
    assert s.drop_copy(D, LOC) == (REMOVED, 0)
    assert s.drop_copy(D, DISK) == (LAST, 0)
    s = stored(DISK, LOC)
    assert s.drop_copy(D, DISK) == (REMOVED, 0)  # and a memory copy keeps it when the file goes
    assert s.drop_copy(D, LOC) == (LAST, 0)  # the last copy of an unprotected block without disk
    assert s.drop_copy(D, LOC2) == (GONE, 0)
    assert s.drop_copy(E, LOC) == (GONE, 0)


def test_set_protected_and_checks():
    s = stored(LOC)
    assert s.set_protected(D, +2) == Located((LOC,), 2)
    assert s.set_protected(D, -1) == Located((LOC,), 1)
    with pytest.raises(ValueError, match="protected"):
        s.set_protected(D, -2)
    with pytest.raises(BlockNotFound):
        s.set_protected(E, +1)
    with pytest.raises(ValueError, match="claimed with 5 B"):
        s.claim(D, 5, 1, 0.0)
    with pytest.raises(ValueError, match="published"):
        s.publish(D, Location(1, TIER_MEMORY, 0, 99, 1))
    with pytest.raises(BlockNotFound):
        s.publish(E, LOC)
    with pytest.raises(ValueError, match="lease_s"):
        DirectoryState(lease_s=0)


# -------------------------------------------------------------------- keys
def test_bind_lookup_unbind_set_prefix():
    s = DirectoryState()
    r1 = KeyRecord(D, "<f4", (2, 3), prefix=True)
    r2 = KeyRecord(E, "|u1", ())
    assert s.lookup("k") is None
    assert s.bind("k", r1) is None
    assert s.lookup("k") == r1 and s.lookup(b"k") is None  # "k" and b"k" are different keys
    assert s.bind("k", r2) == r1  # the old record, for the caller to unref (a prefix reference)
    assert s.lookup("k") == r2
    assert s.set_prefix("k", True) == r2  # the record before the change
    assert s.lookup("k") == KeyRecord(E, "|u1", (), prefix=True)
    assert s.set_prefix("k", True).prefix  # no change: still the record as it stands
    assert s.set_prefix("k", False).prefix and not s.lookup("k").prefix
    assert s.set_prefix("missing", True) is None and s.lookup("missing") is None
    assert s.unbind("k") == r2
    assert s.unbind("k") is None and s.lookup("k") is None


def test_home_stats():
    s = DirectoryState()
    assert s.stats() == HomeStats(0, 0, 0, 0, 0, 0)
    f, g = Digest(b"f" * 32), Digest(b"g" * 32)
    s.claim(D, 100, 1, 0.0, prefix=True)  # protected, in memory
    s.publish(D, LOC)
    s.claim(E, 24, 1, 0.0)  # unprotected, on disk
    s.publish(E, Location(1, TIER_DISK, 0, 24, 0))
    s.claim(f, 8, 1, 0.0, prefix=True)  # protected, on disk only
    s.publish(f, Location(1, TIER_DISK, 0, 8, 0))
    s.claim(g, 50, 1, 0.0)  # freed: counted nowhere
    s.publish(g, Location(1, TIER_MEMORY, 0, 50, 1))
    s.unref(g, 1, 0.0)
    s.bind("a", KeyRecord(D, "|u1", (100,)))
    s.bind("b", KeyRecord(D, "<f4", (5, 5), prefix=True))  # the same block under another key: logical only
    s.bind("c", KeyRecord(E, "<f8", (3,)))
    s.bind(b"d", KeyRecord(f, "<i8", ()))
    assert s.stats() == HomeStats(keys=4, blocks=3, logical_bytes=100 + 100 + 24 + 8, unique_bytes=100 + 24 + 8,
                                  protected_blocks=2, protected_in_memory=1, disk_blocks=2, disk_bytes=24 + 8)


# ---------------------------------------------------------------- encoding
def test_wire_records_round_trip():
    rec = KeyRecord(D, "<f2", (1, 2**40, 0), prefix=True)
    r = _Reader(_key("é/k") + _key(b"\x00b") + _record(rec) + _locations([LOC, LOC2]) + _locations([]))
    assert (r.key(), r.key(), r.record(), r.locations(), r.locations()) == ("é/k", b"\x00b", rec, (LOC, LOC2), ())
    r.done()
    assert LOCATION.size == 29
    located = Located((LOC, DISK), 3, LoadStatus.PENDING, 2)
    r = _Reader(_located(located) + _located(Located((), 0)) + _optional_record(None) + _optional_record(rec))
    assert (_read_located(r), _read_located(r)) == (located, Located((), 0))
    assert (_read_optional_record(r), _read_optional_record(r)) == (None, rec)
    r.done()
    with pytest.raises(ValueError, match="ends inside"):
        _Reader(_locations([LOC])[:-1]).locations()
    with pytest.raises(ValueError, match="after its last record"):
        r = _Reader(_key("a") + b"x")
        r.key()
        r.done()


# ---------------------------------------------------------------- stats kept as entries change
def _walk_stats(s: DirectoryState, space: tuple[str | None, bytes] | None = None) -> tuple[HomeStats, dict]:
    """What stats() and protected_bytes() said when they walked every entry: the reference for the tallies."""
    import math

    from cascade_kv.cluster.directory import dtype_of, space_tag
    from cascade_kv.ids import SpacedKey

    def owns(k) -> bool:
        return (k.space if isinstance(k, SpacedKey) else None) == space[0]

    live = [e for d, e in s._digests.items() if e.refs and (space is None or space_tag(d) == space[1])]
    keys = [r for k, r in s._keys.items() if space is None or owns(k)]
    protected = [e for e in live if e.protected > 0]
    on_disk = [e for e in live if any(loc.tier == TIER_DISK for loc in e.locations)]
    home = HomeStats(
        keys=len(keys), blocks=len(live),
        logical_bytes=sum(dtype_of(r.dtype).itemsize * math.prod(r.shape) for r in keys),
        unique_bytes=sum(e.nbytes for e in live), protected_blocks=len(protected),
        protected_in_memory=sum(any(loc.tier == TIER_MEMORY for loc in e.locations) for e in protected),
        disk_blocks=len(on_disk), disk_bytes=sum(e.nbytes for e in on_disk))
    tags = {space_tag(d) for d in s._digests}
    quota = {t: sum(e.nbytes for d, e in s._digests.items() if e.protected > 0 and space_tag(d) == t) for t in tags}
    return home, quota


class _NoWalk(dict):
    """A table that refuses to be walked: stats() must read its tallies, not the entries."""

    def _refuse(self, *args):
        raise AssertionError("stats() walked the directory")

    __iter__ = items = values = keys = _refuse


@pytest.mark.parametrize("seed", range(6))
def test_stats_tallies_equal_a_walk_after_random_operations(seed):
    import random

    from cascade_kv.ids import SpacedKey, TAG_SIZE

    rng = random.Random(seed)
    tags = [b"", b"T" * TAG_SIZE, b"U" * TAG_SIZE]
    spaces = [(None, b""), ("t", tags[1]), ("u", tags[2])]
    digests = [bytes([i]) * 32 + rng.choice(tags) for i in range(12)]
    sizes = {d: rng.choice([8, 24, 100, 4096]) for d in digests}
    keys = [f"k{i}" for i in range(6)] + [SpacedKey(name, f"k{i}") for name in ("t", "u") for i in range(4)]
    dtypes = ["|u1", "<f4", "<i8", '{"names":["a"],"formats":["<i4"],"offsets":[0],"itemsize":4}']
    s = DirectoryState(lease_s=1.0)
    now = 0.0

    def loc(d: bytes, tier: int) -> Location:
        return Location(rng.randrange(4), tier, rng.randrange(3) * 4096, sizes[d], rng.randrange(1, 4) * (tier == 0))

    for step in range(1500):
        now += rng.random() * 0.3
        d, k, rank = rng.choice(digests), rng.choice(keys), rng.randrange(4)
        op = rng.randrange(13)
        try:
            if op <= 2:
                s.claim(d, sizes[d], rank, now, prefix=rng.random() < 0.3)
            elif op <= 4:
                s.publish(d, loc(d, rng.choice([TIER_MEMORY, TIER_MEMORY, TIER_DISK])))
            elif op == 5:
                s.unref(d, rank, now, prefix=rng.random() < 0.3)
            elif op == 6:
                s.forget(d, rank)
            elif op == 7:
                where = s.locate(d).locations
                if where:
                    s.move(d, rng.choice(where), loc(d, rng.choice([TIER_MEMORY, TIER_DISK])))
            elif op == 8:
                where = s.locate(d).locations
                if where:
                    s.drop_copy(d, rng.choice(where), force=rng.random() < 0.3)
            elif op == 9:
                s.set_protected(d, rng.choice([-1, 1]))
            elif op == 10:
                s.bind(k, KeyRecord(d, rng.choice(dtypes), tuple(rng.randrange(1, 5) for _ in range(rng.randrange(3))),
                                    prefix=rng.random() < 0.3))
            elif op == 11:
                s.unbind(k)
            else:
                s.set_prefix(k, rng.random() < 0.5, d if rng.random() < 0.5 else None)
        except (BlockNotFound, ValueError, AssertionError):
            pass  # refused: must leave the state, and so its tallies, as they were
        if step % 50 == 0 or step > 1450:
            for space in [None, *spaces]:
                home, quota = _walk_stats(s, space)
                assert s.stats(space) == home, (step, space)
                for tag in tags:
                    assert s.protected_bytes(tag) == quota.get(tag, 0), (step, tag)
    restored = DirectoryState()
    restored.restore_entries({k: r for k, r in s._keys.items()},
                             [(d, e.nbytes, e.refs, e.protected, e.locations) for d, e in s._digests.items()])
    for space in [None, *spaces]:
        assert restored.stats(space) == s.stats(space)
    s._digests, s._keys = _NoWalk(s._digests), _NoWalk(s._keys)
    for space in [None, *spaces]:
        s.stats(space)
    s.protected_bytes(tags[1])
