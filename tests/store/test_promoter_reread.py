"""A read that earns a promotion pays no copy: the promoter reads the block again from the tier it was read from
(issue 13: that copy, ~4 ms of the reader's CPU per 16 MiB block under the store's lock, was most of the spread
of cascade-kv's cold reads). Parts alone, as in test_parts: a StoreContext over real tiers, wired by hand."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cascade_kv.blocks import Block, Entry
from cascade_kv.config import CascadeConfig
from cascade_kv.context import StoreContext
from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId
from cascade_kv.placement import Placement
from cascade_kv.promoter import Promoter
from cascade_kv.tiers import DiskTier, HostTier

SIZE = 64 << 10


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[StoreContext, Placement, Promoter]]:
    cfg = CascadeConfig(host_capacity=4 * SIZE, disk_path=tmp_path / "disk")
    hasher = Hasher(cfg.hash_algorithm)
    ctx = StoreContext(cfg, hasher, [HostTier(cfg.host_capacity), DiskTier(tmp_path / "disk", hasher)])
    placement = Placement(ctx)
    promoter = Promoter(ctx, placement)
    yield ctx, placement, promoter
    with ctx.lock:
        ctx.closed = True
        ctx.cond.notify_all()
    promoter.join()
    for tier in ctx.tiers:
        for bid in list(tier.block_ids()):
            tier.free(bid)
        tier.close()


def _on_disk(ctx: StoreContext, placement: Placement, seed: int) -> tuple[Block, np.ndarray]:
    """A block of random bytes on the disk tier only, a key referring to it (lock held), read once (as the read
    that earned its promotion did: the disk tier then trusts the file)."""
    data = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    b = Block(BlockId(ctx.hasher.digest(memoryview(data))), SIZE, ready=True)
    ctx.blocks[b.id] = b
    assert ctx.tiers[1].allocate(b.id, SIZE)
    ctx.tiers[1].write(b.id, memoryview(data))
    placement.add_copy(b, 1, use=True)
    ctx.keys[f"k{seed}"] = Entry(b.id, data.dtype, data.shape, False)
    b.keys.add(f"k{seed}")
    ctx.tiers[1].read_into(b.id, memoryview(np.empty(SIZE, np.uint8)))
    return b, data


def test_the_promoter_keeps_no_copy_of_the_callers_buffer_and_reads_the_block_again(parts) -> None:  # type: ignore[no-untyped-def]
    ctx, placement, promoter = parts
    with ctx.lock:
        b, data = _on_disk(ctx, placement, seed=1)
        out = data.copy()  # the caller's buffer
        promoter.queue(b, out, owned=False)
        assert promoter._queue[0] == (b, None)  # nothing copied on the reader's clock
        out.fill(0)  # the caller reuses its buffer at once
        promoter.settle()
        assert b.where == 0b11 and ctx.counters.promotions == 1 and b.pins == 0
    got = np.empty(SIZE, np.uint8)
    ctx.tiers[0].read_into(b.id, memoryview(got))
    assert np.array_equal(got, data)


def test_a_lower_copy_gone_bad_before_its_promotion_is_quarantined_not_promoted(parts) -> None:  # type: ignore[no-untyped-def]
    ctx, placement, promoter = parts
    with ctx.lock:
        b, data = _on_disk(ctx, placement, seed=2)
        promoter.queue(b, data, owned=False)
        path = ctx.tiers[1].path(b.id)  # type: ignore[attr-defined]
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes([data[0] ^ 0xFF]), 0)  # changes the file's mtime: the tier hashes it again
        finally:
            os.close(fd)
        promoter.settle()
        assert b.where == 0 and ctx.counters.promotions == 0 and ctx.counters.integrity_errors == 1
        assert ctx.tiers[0].used == 0  # the place made for it was given back
