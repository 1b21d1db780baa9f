"""The single-node store's parts, each alone (no Store): a StoreContext over real tiers and only the parts a
test needs, wired by hand, which is what composition with explicit interfaces buys over the mixins it replaced."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cascade_kv.blocks import Block, Entry
from cascade_kv.config import CascadeConfig
from cascade_kv.context import StoreContext
from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId
from cascade_kv.keys import KeyTable
from cascade_kv.persistence import Persistence
from cascade_kv.placement import Placement
from cascade_kv.promoter import Promoter
from cascade_kv.reads import Reads
from cascade_kv.tiers import DiskTier, HostTier

KIB = 1024
SIZE = 4 * KIB  # a host tier of 16 KiB holds four


def _open(tmp_path: Path, **config: object) -> StoreContext:
    cfg = CascadeConfig(host_capacity=4 * SIZE, disk_path=tmp_path / "disk", **config)  # type: ignore[arg-type]
    hasher = Hasher(cfg.hash_algorithm)
    return StoreContext(cfg, hasher, [HostTier(cfg.host_capacity), DiskTier(tmp_path / "disk", hasher)])


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[StoreContext]:
    c = _open(tmp_path)
    yield c
    c.closed = True
    for bid in list(c.tiers[1].block_ids()):
        c.tiers[1].free(bid)
    for t in c.tiers:
        t.close()


def _stored(ctx: StoreContext, placement: Placement, seed: int, tier: int = 0, key: str | None = None,
            ) -> tuple[Block, np.ndarray]:
    """A block of SIZE random bytes written into ``tier`` and recorded there (lock held); with ``key``, a key
    refers to it (placement never releases a block that has keys)."""
    data = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    b = Block(BlockId(ctx.hasher.digest(memoryview(data))), SIZE, ready=True)
    ctx.blocks[b.id] = b
    assert ctx.tiers[tier].allocate(b.id, SIZE)
    ctx.tiers[tier].write(b.id, memoryview(data))
    placement.add_copy(b, tier, use=True)
    if key is not None:
        ctx.keys[key] = Entry(b.id, data.dtype, data.shape, False)
        b.keys.add(key)
    return b, data


def _read(ctx: StoreContext, b: Block, tier: int) -> np.ndarray:
    out = np.empty(b.nbytes, np.uint8)
    ctx.tiers[tier].read_into(b.id, memoryview(out))
    return out


def test_placement_makes_room_by_demoting_the_policys_victim(ctx: StoreContext) -> None:
    placement = Placement(ctx)
    with ctx.lock:
        old, old_data = _stored(ctx, placement, seed=1, key="old")  # the least recently used
        rest = [_stored(ctx, placement, seed=s, key=f"k{s}")[0] for s in (2, 3, 4)]  # the host tier is full
        new = Block(BlockId(bytes(32)), SIZE, ready=True)
        assert placement.allocate(new, [0, 1]) == 0
    assert old.where == 0b10 and all(b.where == 0b01 for b in rest)  # moved down a tier, not dropped
    assert np.array_equal(_read(ctx, old, 1), old_data)
    assert ctx.counters.demotions == 1 and ctx.counters.tiers[0].evictions == 1 and ctx.counters.drops == 0
    assert ctx.counters.contents.tier_blocks == [3, 1]  # new is allocated, not yet recorded


def test_promoter_copies_a_queued_block_up_and_settle_waits_for_it(ctx: StoreContext) -> None:
    placement = Placement(ctx)
    promoter = Promoter(ctx, placement)
    try:
        with ctx.lock:
            b, data = _stored(ctx, placement, seed=5, tier=1, key="k")  # on disk only
            promoter.queue(b, data, owned=False)
            promoter.settle()  # the promoter thread did it meanwhile: settle released the lock while it waited
            assert b.where == 0b11 and not b.queued and b.pins == 0
            assert ctx.counters.promotions == 1
        assert np.array_equal(_read(ctx, b, 0), data)
    finally:
        with ctx.lock:
            ctx.closed = True
            ctx.cond.notify_all()
        promoter.join()


def test_key_table_counts_keys_and_protection_and_releases_a_block_no_key_refers_to(ctx: StoreContext) -> None:
    placement = Placement(ctx)
    table = KeyTable(ctx, placement, Promoter(ctx, placement), Persistence(ctx))  # no journal: appends do nothing
    c = ctx.default.counters.contents
    with ctx.lock:
        b, data = _stored(ctx, placement, seed=6)
        for key, prefix in (("a", True), ("b", False)):  # two keys, one block (a dedup hit)
            e = ctx.keys[key] = Entry(b.id, data.dtype, data.shape, prefix)
            table.attach(key, e, b)
        assert (c.keys, c.blocks, c.logical_bytes, c.unique_bytes, c.protected_blocks) == (2, 1, 2 * SIZE, SIZE, 1)
        assert placement.protected_bytes == [SIZE, 0] and ctx.default.protected_bytes == SIZE
    table.set_prefix("a", False, ctx.default)  # unprotect
    assert b.protected == 0 and placement.protected_bytes == [0, 0] and ctx.default.protected_bytes == 0
    table.delete(ctx.default, ["a", "b"])
    assert b.id not in ctx.blocks and not ctx.tiers[0].contains(b.id)
    assert (c.keys, c.blocks, c.logical_bytes, c.unique_bytes, c.tier_blocks) == (0, 0, 0, 0, [0, 0])
    assert ctx.default.counters.deletes == 2


def test_reads_copy_each_block_from_its_fastest_copy_and_count_per_tier(tmp_path: Path) -> None:
    ctx = _open(tmp_path, locality_aware=False)  # no promotion: this part alone
    try:
        placement = Placement(ctx)
        promoter = Promoter(ctx, placement)
        reads = Reads(ctx, KeyTable(ctx, placement, promoter, Persistence(ctx)), placement, promoter)
        with ctx.lock:
            top, top_data = _stored(ctx, placement, seed=7, key="top")
            low, low_data = _stored(ctx, placement, seed=8, tier=1, key="low")
        got = reads.get_many(ctx.default, ["top", "low"], None)
        assert np.array_equal(got[0], top_data) and np.array_equal(got[1], low_data)
        tiers = ctx.default.counters.tiers
        assert (tiers[0].hits, tiers[0].misses, tiers[1].hits) == (1, 1, 1)  # the disk read missed the host tier
        assert ctx.default.counters.gets == 2 and top.pins == low.pins == 0 and promoter.reads_in_flight == 0
    finally:
        ctx.closed = True
        for bid in list(ctx.tiers[1].block_ids()):
            ctx.tiers[1].free(bid)
        for t in ctx.tiers:
            t.close()
