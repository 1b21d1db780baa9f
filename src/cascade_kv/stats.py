"""Counters the store keeps, and the typed snapshot ``Store.stats()`` returns."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .errors import InvalidArgument, TierNotFound


@dataclass(slots=True)
class TierCounters:
    """Mutable per-tier counters, updated under the store's lock (no atomics needed)."""

    hits: int = 0  # gets served from this tier
    misses: int = 0  # gets that looked here first and were served by a slower tier
    bytes_read: int = 0  # bytes served to callers from this tier
    bytes_written: int = 0  # bytes written into this tier (puts, demotions, promotions)
    evictions: int = 0  # copies removed from this tier to make room


@dataclass(slots=True)
class StoreCounters:
    """Mutable store-wide counters every store keeps (its tiers' counters are the subclass's)."""

    puts: int = 0
    gets: int = 0
    misses: int = 0
    deletes: int = 0
    dedup_hits: int = 0
    dedup_bytes_saved: int = 0
    demotions: int = 0
    promotions: int = 0
    drops: int = 0
    dropped_bytes: int = 0
    integrity_errors: int = 0
    quarantined: int = 0


@dataclass(slots=True)
class Contents:
    """What a namespace (or the whole store) holds now, kept as it changes under the store's lock, so that
    ``stats()`` reads it in O(1) instead of walking every key and block (8.4 ms at 50k blocks, which a
    metrics scrape would pay at every call). The store's ``_walk_stats`` recounts it from scratch: tests
    hold the two equal after random sequences of every operation that changes them."""

    keys: int = 0
    logical_bytes: int = 0  # sum of the sizes of the keys' blocks, as if nothing were shared
    blocks: int = 0  # blocks that at least one key refers to
    unique_bytes: int = 0  # sum of the sizes of those blocks
    protected_blocks: int = 0  # blocks with at least one prefix key
    protected_in_memory: int = 0  # of those, the ones with a copy in a memory tier
    tier_blocks: list[int] = field(default_factory=list)  # per tier: blocks with a copy there (keyless ones too)


@dataclass(slots=True)
class Counters(StoreCounters):
    """The single-node store's counters: one :class:`TierCounters` per tier, fastest first, and what it holds."""

    tiers: list[TierCounters] = field(default_factory=list)
    contents: Contents = field(default_factory=Contents)

    @classmethod
    def for_tiers(cls, n: int) -> Counters:
        return cls(tiers=[TierCounters() for _ in range(n)], contents=Contents(tier_blocks=[0] * n))


@dataclass(frozen=True, slots=True)
class TierStats:
    """One tier, at the moment of the snapshot."""

    name: str
    hits: int
    """Gets served from this tier."""
    misses: int
    """Gets that found no copy here and were served by a slower tier (a get served by the disk tier is a
    miss of every memory tier above it)."""
    bytes_read: int
    """Bytes copied from this tier to callers."""
    bytes_written: int
    """Bytes written into this tier: puts, demotions into it, promotions into it."""
    evictions: int
    """Copies removed from this tier to make room (demoted or dropped)."""
    blocks: int
    """Blocks with a copy in this tier."""
    used_bytes: int
    """Bytes allocated in this tier (with allocator rounding)."""
    capacity_bytes: int | None
    """Capacity of the tier; ``None`` when unlimited."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A consistent snapshot of the store's counters (taken under its lock)."""

    tiers: tuple[TierStats, ...]
    """Per tier, fastest first."""
    keys: int
    """Keys currently stored."""
    blocks: int
    """Distinct blocks currently stored (fewer than keys when dedup found duplicates)."""
    logical_bytes: int
    """Sum of the sizes of all keys' values, as if nothing were shared."""
    unique_bytes: int
    """Sum of the sizes of distinct blocks."""
    protected_blocks: int
    """Blocks referred to by at least one ``is_prefix`` key."""
    protected_in_memory: int
    """Protected blocks that have a copy in a memory tier (semantic eviction keeps this = protected_blocks)."""
    puts: int
    gets: int
    misses: int
    """Gets of keys that were not in the store."""
    deletes: int
    dedup_hits: int
    """Puts whose bytes were already stored (under any key): acknowledged without storing."""
    dedup_bytes_saved: int
    demotions: int
    """Copies moved down a tier to make room."""
    promotions: int
    """Copies made in a faster tier for blocks read often from a slower one."""
    drops: int
    """Blocks that lost their last copy because the last tier was full (their keys are gone)."""
    dropped_bytes: int
    integrity_errors: int
    """Copies that failed their digest or size check."""
    quarantined: int
    """Bad copies moved aside to ``quarantine/``."""
    open_seconds: float
    """Time to open the store (arena allocation and touch, journal replay)."""
    ranks: int = 1
    """Ranks whose counters these are (a distributed store's ``cluster_stats()`` sums every rank's)."""
    bytes_sent: int = 0
    """Bytes this rank's memory gave to other ranks' arenas (victims moved to a peer). 0 on one node."""
    bytes_received: int = 0
    """Bytes that reached this rank from other ranks' memory: remote reads and victims adopted. 0 on one node."""

    def tier(self, name: str) -> TierStats:
        """The stats of the tier called ``name`` (:class:`TierNotFound`, a ``KeyError``, if there is none)."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise TierNotFound(f"no tier named {name!r}; tiers are {[t.name for t in self.tiers]}")

    @property
    def hits(self) -> int:
        return sum(t.hits for t in self.tiers)


def stats_to_dict(stats: StoreStats) -> dict[str, object]:
    """``stats`` in plain JSON types (how the daemon ships it over its socket); :func:`stats_from_dict`
    gives it back exactly (JSON keeps Python's ints and floats as they were)."""
    d = asdict(stats)
    d["tiers"] = [asdict(t) for t in stats.tiers]  # a list, not asdict's tuple: what JSON gives back anyway
    return d


def stats_from_dict(d: Mapping[str, object]) -> StoreStats:
    """The :class:`StoreStats` that :func:`stats_to_dict` made ``d`` from (:class:`InvalidArgument` when
    ``d`` is not such a dict: a field missing, unknown or of the wrong shape)."""
    try:
        tiers = tuple(TierStats(**t) for t in d["tiers"])  # type: ignore[attr-defined]
        return StoreStats(**{**d, "tiers": tiers})  # type: ignore[arg-type]
    except (KeyError, TypeError) as e:
        raise InvalidArgument(f"not a StoreStats dict: {e}") from e
