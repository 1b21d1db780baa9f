"""The distributed store's counters, and the sum of every rank's snapshot (``cluster_stats``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..stats import StoreCounters, StoreStats, TierCounters, TierStats


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


__all__ = ["Counters", "sum_stats"]
