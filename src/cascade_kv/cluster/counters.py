"""The distributed store's counters, one rank's snapshot of them (``stats``), and the sum of every rank's
snapshot (``cluster_stats``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..stats import StoreCounters, StoreStats, TierCounters, TierStats
from .arena import Arena
from .directory import HomeStats


@dataclass(slots=True)
class Counters(StoreCounters):
    """Mutable counters of one rank, updated under its arena's lock."""

    host: TierCounters = field(default_factory=TierCounters)
    """This rank's arena: gets served locally, bytes written into it (puts, adopted victims, loads, replicas)."""
    remote: TierCounters = field(default_factory=TierCounters)
    """Peers' memory: gets served one-sidedly from a peer; bytes written = victims this rank moved to peers."""
    disk: TierCounters = field(default_factory=TierCounters)
    """The shared disk tier: gets served from a file (disk reads); bytes written = files this rank wrote."""
    bytes_sent: int = 0
    bytes_received: int = 0


def rank_stats(c: Counters, arena: Arena, disk_capacity: int | None, has_disk: bool, home: HomeStats,
               open_seconds: float) -> StoreStats:
    """One rank's snapshot: its counters ``c`` (taken under the arena's lock) and what it is home to."""
    with arena.lock:
        tiers = [TierStats("host", c.host.hits, c.host.misses, c.host.bytes_read, c.host.bytes_written,
                           c.host.evictions, arena.sealed, arena.tier.used, arena.capacity),
                 TierStats("remote", c.remote.hits, c.remote.misses, c.remote.bytes_read, c.remote.bytes_written,
                           0, 0, 0, None)]
        if has_disk:
            # blocks and bytes on disk are counted at the digests' homes: summed over ranks, each file once
            tiers.append(TierStats("disk", c.disk.hits, c.disk.misses, c.disk.bytes_read, c.disk.bytes_written,
                                   0, home.disk_blocks, home.disk_bytes, disk_capacity))
        return StoreStats(
            tiers=tuple(tiers), keys=home.keys, blocks=home.blocks, logical_bytes=home.logical_bytes,
            unique_bytes=home.unique_bytes, protected_blocks=home.protected_blocks,
            protected_in_memory=home.protected_in_memory, puts=c.puts, gets=c.gets, misses=c.misses,
            deletes=c.deletes, dedup_hits=c.dedup_hits, dedup_bytes_saved=c.dedup_bytes_saved,
            demotions=c.demotions, promotions=c.promotions, drops=c.drops, dropped_bytes=c.dropped_bytes,
            integrity_errors=c.integrity_errors, quarantined=c.quarantined, open_seconds=open_seconds,
            ranks=1, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received)


def space_stats(c: Counters, arena: Arena, disk_capacity: int | None, has_disk: bool, home: HomeStats,
                open_seconds: float) -> StoreStats:
    """A named namespace's snapshot on one rank: its own operations (``c``) and what this rank is home to of
    it (``home``); its tiers show only capacity (per-tier counters are not kept per namespace)."""
    with arena.lock:
        tiers = [TierStats("host", 0, 0, 0, 0, 0, 0, arena.tier.used, arena.capacity),
                 TierStats("remote", 0, 0, 0, 0, 0, 0, 0, None)]
        if has_disk:
            tiers.append(TierStats("disk", 0, 0, 0, 0, 0, home.disk_blocks, home.disk_bytes, disk_capacity))
        return StoreStats(
            tiers=tuple(tiers), keys=home.keys, blocks=home.blocks, logical_bytes=home.logical_bytes,
            unique_bytes=home.unique_bytes, protected_blocks=home.protected_blocks,
            protected_in_memory=home.protected_in_memory, puts=c.puts, gets=c.gets, misses=c.misses,
            deletes=c.deletes, dedup_hits=c.dedup_hits, dedup_bytes_saved=c.dedup_bytes_saved, demotions=0,
            promotions=0, drops=0, dropped_bytes=0, integrity_errors=0, quarantined=0,
            open_seconds=open_seconds, ranks=1)


_MAX_FIELDS = frozenset({"open_seconds"})


def sum_stats(snapshots: Sequence[StoreStats]) -> StoreStats:
    """Every count summed over ``snapshots`` (one per rank); tiers matched by name; ``open_seconds`` is the
    slowest rank's; ``ranks`` is the number of snapshots."""
    if not snapshots:
        raise ValueError("sum_stats: no snapshots")
    tiers = []
    for name in dict.fromkeys(t.name for s in snapshots for t in s.tiers):
        same = [t for s in snapshots for t in s.tiers if t.name == name]
        caps = [t.capacity_bytes for t in same]
        tiers.append(TierStats(name, *(sum(getattr(t, f) for t in same) for f in
                                       ("hits", "misses", "bytes_read", "bytes_written", "evictions", "blocks",
                                        "used_bytes")),
                               None if None in caps else sum(caps)))  # type: ignore[arg-type]
    values: dict[str, object] = {"tiers": tuple(tiers), "ranks": len(snapshots)}
    for f in dataclasses.fields(StoreStats):
        if f.name in values:
            continue
        column = [getattr(s, f.name) for s in snapshots]
        values[f.name] = max(column) if f.name in _MAX_FIELDS else sum(column)
    return StoreStats(**values)  # type: ignore[arg-type]


__all__ = ["Counters", "rank_stats", "space_stats", "sum_stats"]
