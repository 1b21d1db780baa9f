"""The distributed store's parts, each alone (no MPI job): the shared context is a plain namespace of fakes,
which is what composition with explicit interfaces buys over a mixin sharing the store's fields."""
from __future__ import annotations

import struct
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from cascade_kv.cluster.counters import Counters
from cascade_kv.cluster.directory import TIER_DISK, TIER_MEMORY, Located, Location
from cascade_kv.cluster.diskio import SharedDisk, Vanished
from cascade_kv.cluster.handlers import OwnerOps
from cascade_kv.cluster.replication import Replication
from cascade_kv.errors import IntegrityError
from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId
from cascade_kv.tiers import DiskTier


def _ctx(**more) -> SimpleNamespace:
    parts = dict(rank=0, size=2, arena=SimpleNamespace(lock=threading.Lock()), counters=Counters())
    return SimpleNamespace(**{**parts, **more})


# ------------------------------------------------------------------ replication
class _Placing:
    """An eviction part that always finds room, and records what it was asked to place."""

    def __init__(self) -> None:
        self.placed: list[tuple[bytes, bool, bool]] = []

    def place(self, digest, data, *, protected, replica=False):
        self.placed.append((digest, protected, replica))
        return digest

    def publish_pinned(self, c) -> bool:
        return True


def test_a_replica_is_kept_at_the_replica_threshold_and_counted_once():
    ctx = _ctx(config=SimpleNamespace(locality_aware=True, replica_threshold=3))
    eviction = _Placing()
    r = Replication(ctx, eviction)
    data = memoryview(b"x" * 8)
    for _ in range(2):
        r.note_remote_read(BlockId(b"d" * 32), data, protected=0)
    assert not eviction.placed
    r.note_remote_read(BlockId(b"d" * 32), data, protected=1)
    assert eviction.placed == [(b"d" * 32, True, True)] and ctx.counters.promotions == 1
    r.note_remote_read(BlockId(b"e" * 32), data, protected=0)
    r.forget(BlockId(b"e" * 32))  # freed: its count starts again
    r.note_remote_read(BlockId(b"e" * 32), data, protected=0)
    r.note_remote_read(BlockId(b"e" * 32), data, protected=0)
    assert len(eviction.placed) == 1


def test_no_replica_without_locality_awareness():
    eviction = _Placing()
    r = Replication(_ctx(config=SimpleNamespace(locality_aware=False, replica_threshold=1)), eviction)
    r.note_remote_read(BlockId(b"d" * 32), memoryview(b"x"), protected=0)
    assert not eviction.placed


# ------------------------------------------------------------------ owner ops, both ends
class _Loopback:
    """A service whose calls run the handler registered on the same object (as a call to one's own rank)."""

    def __init__(self) -> None:
        self.handlers = {}
        self.sent: list[tuple[int, int]] = []

    def register(self, op, handler) -> None:
        self.handlers[op] = handler

    def call(self, rank, op, payload) -> bytes:
        self.sent.append((rank, op))
        return self.handlers[op](rank, memoryview(payload))

    def call_many(self, requests) -> list[bytes]:
        return [self.call(rank, op, payload) for rank, op, payload in requests]


class _Arena:
    """Copies of 100 B in a 400 B arena whose holes open as victims go."""

    def __init__(self, victims: list[bytes]) -> None:
        self.lock = threading.Lock()
        self.victims = [SimpleNamespace(digest=BlockId(d), nbytes=100) for d in victims]
        self.tier = SimpleNamespace(largest_hole=0)
        self.freed: list[tuple[bytes, int]] = []
        self.protected: list[tuple[bytes, bool]] = []

    def pick_victim(self, *, protected):
        return self.victims.pop(0) if self.victims else None

    def location(self, c) -> Location:
        return Location(1, TIER_MEMORY, 4096, c.nbytes, 7)

    def view(self, c) -> memoryview:
        return memoryview(bytearray(c.nbytes))

    def release(self, c, *, gone) -> None:
        if gone:
            self.tier.largest_hole += c.nbytes

    def free(self, digest, generation) -> None:
        self.freed.append((digest, generation))

    def set_protected(self, digest, protected) -> None:
        self.protected.append((digest, protected))


@pytest.mark.parametrize("with_disk", [True, False])
def test_make_room_demotes_until_the_hole_opens_and_returns_the_moves(with_disk):
    service, arena = _Loopback(), _Arena([b"a" * 32, b"b" * 32, b"c" * 32])
    written = []
    disk = SimpleNamespace(write=lambda d, data: written.append(d)) if with_disk else None
    ops = OwnerOps(_ctx(service=service, arena=arena), disk)
    ops.register()
    made = ops.make_room(1, 200)
    old = Location(1, TIER_MEMORY, 4096, 100, 7)
    assert made.ok and arena.victims[0].digest == b"c" * 32  # two victims opened 200 B; the third stays
    if with_disk:
        assert written == [b"a" * 32, b"b" * 32] and not made.drops
        assert made.moves == [(d, old, Location(1, TIER_DISK, 0, 100, 0)) for d in (b"a" * 32, b"b" * 32)]
        assert ops.ctx.counters.demotions == 2
    else:
        assert made.drops == [(b"a" * 32, old), (b"b" * 32, old)] and not made.moves
        assert ops.ctx.counters.drops == 2 and ops.ctx.counters.dropped_bytes == 200
    assert not ops.make_room(1, 10_000).ok  # no victim left to open a hole that big


def test_free_and_protection_notices_reach_each_owner_once():
    service, arena = _Loopback(), _Arena([])
    ops = OwnerOps(_ctx(service=service, arena=arena), None)
    ops.register()
    d = BlockId(b"d" * 32)
    ops.free(d, [Location(1, TIER_MEMORY, 0, 8, 5), Location(2, TIER_MEMORY, 64, 8, 9)])
    assert arena.freed == [(d, 5), (d, 9)]
    ops.note_protect(d, [Location(1, TIER_MEMORY, 0, 8, 5), Location(1, TIER_MEMORY, 99, 8, 6)], True)
    assert arena.protected == [(d, True)]  # one notice per owner rank
    ops.free(d, [])
    assert len(service.sent) == 3  # nothing sent for no copies


# ------------------------------------------------------------------ the shared disk
def _disk(tmp_path, listed_on_disk: bool) -> tuple[SharedDisk, DiskTier]:
    tier = DiskTier(tmp_path / "d", Hasher("blake3"))
    located = Located((Location(1, TIER_DISK, 0, 8, 0),) if listed_on_disk else (), 0)
    ctx = _ctx(directory=SimpleNamespace(locate=lambda digest: located))
    return SharedDisk(ctx, tier), tier


def test_shared_disk_adopts_a_file_another_rank_wrote(tmp_path):
    mine, tier = _disk(tmp_path, listed_on_disk=True)
    data = np.arange(8, dtype=np.uint8)
    digest = BlockId(Hasher("blake3").digest(memoryview(data)))
    other = DiskTier(tmp_path / "d", Hasher("blake3"))  # another rank's index of the same directory
    other.allocate(digest, 8)
    other.write(digest, memoryview(data))
    assert mine.write(digest, memoryview(data)) is False  # there already: taken as it is, not rewritten
    out = np.zeros(8, np.uint8)
    mine.read(digest, memoryview(out))
    assert np.array_equal(out, data) and mine.ctx.counters.disk.hits == 1
    other.close()
    tier.close()


@pytest.mark.parametrize("listed_on_disk", [False, True])
def test_a_file_gone_before_the_read_is_vanished_unless_its_home_still_lists_it(tmp_path, listed_on_disk):
    mine, tier = _disk(tmp_path, listed_on_disk)
    data = np.arange(8, dtype=np.uint8)
    digest = BlockId(Hasher("blake3").digest(memoryview(data)))
    assert mine.write(digest, memoryview(data)) is True
    tier.path(digest).unlink()  # another rank's delete
    with pytest.raises(IntegrityError if listed_on_disk else Vanished):
        mine.read(digest, memoryview(np.zeros(8, np.uint8)))
    tier.close()


# ------------------------------------------------------------------ the directory's batched lookup, alone
def test_directory_lookup_batch_parses_checks_and_answers():
    from cascade_kv.cluster.directory import KeyRecord
    from cascade_kv.cluster.directory.rpc import OP_LOOKUP, Directory
    from cascade_kv.cluster.homes import home_of_key

    service = _Loopback()
    service.rank, service.size = 0, 2
    directory = Directory(service)  # type: ignore[arg-type]
    mine = [k for k in (f"key-{i}" for i in range(40)) if home_of_key(k, 2) == 0][:8]
    other = next(k for k in (f"key-{i}" for i in range(40)) if home_of_key(k, 2) == 1)
    records = [KeyRecord(bytes([i]) * 32, "<f4", (i + 1, 2), prefix=bool(i % 2)) for i in range(len(mine))]
    directory.bind_many(list(zip(mine[:5], records[:5])))
    assert directory.lookup_many(mine) == records[:5] + [None] * (len(mine) - 5)
    assert directory.bound_many(mine) == [True] * 5 + [False] * (len(mine) - 5)
    handler = service.handlers[OP_LOOKUP]
    wire = b"s" + mine[0].encode()
    good = struct.pack("<II", 1, len(wire)) + wire
    assert handler(1, memoryview(good))[:1] == b"\x01"  # found
    for bad, says in [(b"\x01\x00", "ends inside"), (good[:-1], "ends inside"), (good + b"x", "after its last"),
                      (struct.pack("<II", 1, 99) + wire, "ends inside")]:
        with pytest.raises(ValueError, match=says):
            handler(1, memoryview(bad))
    raw = b"s" + other.encode()
    with pytest.raises(ValueError, match="homed at rank 1"):
        handler(1, memoryview(struct.pack("<II", 1, len(raw)) + raw))
