"""Fixtures for the store tests: a temporary disk directory and small stores that close themselves.

Stores are tiny on purpose (a 64 KiB host arena, blocks of a few KiB) so that eviction, demotion,
promotion and drops happen within a handful of puts and every test stays fast.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cascade_kv import CascadeConfig, Store

KIB = 1024
HOST = 64 * KIB  # host arena of the small stores: eight 8 KiB blocks
BLOCK = 8 * KIB  # a multiple of the arena's 64 B alignment, so sizes add up exactly

_DEFAULT = object()


def block(nbytes: int = BLOCK, seed: int = 0, dtype: object = np.uint8,
          shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``nbytes`` pseudo-random bytes (the same for the same ``seed`` and size), viewed as ``dtype``."""
    raw = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
    arr = raw.view(np.dtype(dtype))
    return arr.reshape(shape) if shape is not None else arr


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (byte-wise, so NaNs and odd bool bytes compare exactly)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def snapshot(store: Store, placement: bool = True) -> dict[str, object]:
    """What a failed call must leave unchanged: every key's info (dtype, shape, prefix flag, digest,
    sharing and, with ``placement``, tiers) and the content counters. Reads nothing (a get would move
    LRU order and could promote); compare values with :func:`values` as well, read *before* the snapshot
    is taken: with the default ``promotion_threshold=1`` a read from disk promotes the block (settled by the
    snapshot's ``stats()``), so values read after it would move what it recorded."""
    s = store.stats()
    infos = {}
    for k in store.keys():
        i = store.info(k)
        infos[k] = (i.dtype, i.shape, i.nbytes, i.prefix, i.digest, i.shared_by, i.tiers if placement else None)
    snap: dict[str, object] = {
        "infos": infos, "keys": s.keys, "blocks": s.blocks, "logical": s.logical_bytes,
        "unique": s.unique_bytes, "protected_blocks": s.protected_blocks,
        "protected_in_memory": s.protected_in_memory, "dedup": (s.dedup_hits, s.dedup_bytes_saved),
        "drops": s.drops,
    }
    if placement:
        snap["tiers"] = [(t.name, t.blocks, t.used_bytes) for t in s.tiers]
    return snap


def values(store: Store) -> dict[object, tuple[np.dtype, tuple[int, ...], bytes]]:
    """Every key's dtype, shape and bytes, read through ``get``."""
    out = {}
    for k in store.keys():
        v = store.get(k)
        out[k] = (v.dtype, v.shape, v.tobytes())
    return out


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    return tmp_path / "disk"


@pytest.fixture
def make_store(disk_dir: Path) -> Iterator[Callable[..., Store]]:
    """``make_store(**config)``: a small store (64 KiB host, disk under ``disk_dir``), closed at teardown.
    Pass ``disk_path=None`` for a memory-only store."""
    stores: list[Store] = []

    def make(**overrides: object) -> Store:
        overrides.setdefault("host_capacity", HOST)
        overrides.setdefault("disk_path", disk_dir)
        s = Store(CascadeConfig(**overrides))  # type: ignore[arg-type]
        stores.append(s)
        return s

    yield make
    for s in reversed(stores):
        s.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    """64 KiB host over an unlimited disk tier."""
    return make_store()


@pytest.fixture
def host_only(make_store: Callable[..., Store]) -> Store:
    """64 KiB host tier and nothing below it: its LRU victims are dropped."""
    return make_store(disk_path=None)


def check_consistent(store: Store) -> None:
    """Cross-check the store's metadata against itself and the disk directory (dedup on, no threads
    running): block counts, bytes used per tier, protection, and one file per disk-resident block."""
    s = store.stats()
    keys = store.keys()
    assert len(keys) == len(store) == s.keys
    by_digest: dict[str, object] = {}
    for k in keys:
        i = store.info(k)
        by_digest.setdefault(i.digest, i)
        assert by_digest[i.digest].tiers == i.tiers and by_digest[i.digest].nbytes == i.nbytes, k
        if i.prefix:
            assert any(t in i.tiers for t in ("host",)), (k, i.tiers)
    assert s.blocks == len(by_digest)
    assert s.unique_bytes == sum(i.nbytes for i in by_digest.values())
    prefixed = {store.info(k).digest for k in keys if store.info(k).prefix}
    assert s.protected_blocks == len(prefixed) == s.protected_in_memory
    for t, tier in enumerate(s.tiers):  # the running count CapacityError's message uses
        assert store._placement.protected_bytes[t] == sum(i.nbytes for d, i in by_digest.items()
                                                if d in prefixed and tier.name in i.tiers), tier.name

    def align(n: int) -> int:  # the host arena's rounding
        return (max(n, 1) + 63) // 64 * 64

    host = [i for i in by_digest.values() if "host" in i.tiers]
    assert s.tier("host").blocks == len(host)
    assert s.tier("host").used_bytes == sum(align(i.nbytes) for i in host)
    assert s.tier("host").used_bytes <= s.tier("host").capacity_bytes
    if len(s.tiers) > 1:
        disk = [i for i in by_digest.values() if "disk" in i.tiers]
        assert s.tier("disk").blocks == len(disk)
        assert s.tier("disk").used_bytes == sum(i.nbytes for i in disk)
        root = store.tiers[1].root
        files = {p.name for p in (root / "blocks").rglob("*") if p.is_file()}
        assert files == {i.digest for i in disk}
