"""Placement policy: which copies to evict, which blocks to promote. No I/O here.

The store tells the policy what happened (a copy was added to a tier, read, removed; a block's
protection changed) and asks it for victims. Per tier it keeps protected copies in a list of their
own, out of the victims' way, so finding a victim never walks past a tier full of system prompts
(a skip-list scan would make eviction O(protected blocks) on exactly the workloads cascade-kv is for).

Unprotected copies are ranked by recency (``order="lru"``, the default: the seed's rule) or, with
``order="reuse"``, by recency credited by how often the block has been read since it was stored
(:class:`ReuseCredit`). In KV-cache traces a block that has been reused once is far more likely to
be reused again than a block just computed (on the Mooncake FAST'25 trace 84 % against 45 %, see
``python -m cascade_kv.bench.tracesim``), but plain LRU ranks a block computed a moment ago above a
system prompt read a thousand times an hour ago.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .config import EvictionOrder
from .errors import ConfigError
from .ids import BlockId


@dataclass(frozen=True, slots=True)
class ReuseCredit:
    """How far ahead in time a read block is ranked, in units of its tier's capacity.

    A copy's rank is ``clock at its last use + credit * tier capacity`` (the clock counts the bytes
    of every use: puts and reads); the lowest rank is evicted first. So a block read once
    since it was stored outlives a block never read that was last used up to ``read_once`` tiers'
    worth of traffic later. Within a class rank follows recency: each class is one LRU list and a
    victim is the least of the list heads, O(classes) per eviction.

    The defaults were chosen on the Mooncake synthetic trace at memory = 1/4 of its distinct blocks
    (read once 3 to 5 with read twice or more 1.5 to 2 all hit 0.477-0.483 against LRU's 0.443) and
    are never below LRU at 1/8 and 1/2 of them. Blocks read twice or more get less credit than blocks
    read once: the trace reuses them sooner, so recency alone keeps them.
    """

    never_read: float = 0.0
    read_once: float = 4.0
    read_twice_or_more: float = 2.0

    def by_reads(self) -> tuple[float, float, float]:
        return (self.never_read, self.read_once, self.read_twice_or_more)


LRU_CREDIT = ReuseCredit(0.0, 0.0, 0.0)


class _Ranked:
    """One tier's unprotected copies: one recency list per read class, each in ascending rank."""

    __slots__ = ("lists", "steps")

    def __init__(self, steps: Sequence[float]) -> None:
        self.steps = tuple(steps)
        self.lists: tuple[OrderedDict[BlockId, float], ...] = tuple(OrderedDict() for _ in steps)

    def put(self, block_id: BlockId, reads: int, clock: float) -> None:
        cls = min(reads, len(self.lists) - 1)
        self.lists[cls][block_id] = clock + self.steps[cls]  # clock only grows: each list stays sorted

    def pop(self, block_id: BlockId) -> bool:
        for lst in self.lists:
            if lst.pop(block_id, None) is not None:
                return True
        return False

    def ascending(self) -> Iterator[BlockId]:
        if not any(self.lists[1:]):
            return iter(self.lists[0])  # the common cases of plain LRU and a cold tier: no merge
        merged = heapq.merge(*(((rank, i, b) for b, rank in lst.items()) for i, lst in enumerate(self.lists)))
        return (b for _, _, b in merged)


class Policy:
    """Eviction order per tier and the promotion rule.

    ``capacities`` are the tiers' sizes in bytes (``None``: unbounded, ranked by recency alone).
    ``semantic=False`` ignores protection (every copy is a candidate victim), for measuring what
    semantic eviction buys; ``order="lru"`` ranks by recency alone.
    """

    def __init__(self, capacities: Sequence[int | None], *, semantic: bool = True, order: EvictionOrder = "lru",
                 credit: ReuseCredit = ReuseCredit(), promotion_threshold: int = 3, promote: bool = True) -> None:
        if order not in ("reuse", "lru"):
            raise ConfigError(f"eviction order must be 'reuse' or 'lru', got {order!r}")
        self.semantic = semantic
        self.order = order
        self.promotion_threshold = promotion_threshold
        self.promote = promote
        credits = (credit if order == "reuse" else LRU_CREDIT).by_reads()
        self._ranked = [_Ranked([c * (cap or 0) for c in credits]) for cap in capacities]
        self._protected_lru: list[OrderedDict[BlockId, None]] = [OrderedDict() for _ in capacities]
        self._protected: set[BlockId] = set()
        self._clock = 0.0

    # -- events -----------------------------------------------------------------------------------
    def _place(self, tier: int, block_id: BlockId, reads: int) -> None:
        if block_id in self._protected:
            self._protected_lru[tier][block_id] = None
        else:
            self._ranked[tier].put(block_id, reads, self._clock)

    def added(self, tier: int, block_id: BlockId, nbytes: int, reads: int = 0, *, use: bool = True) -> None:
        """A copy of the block (read ``reads`` times since it was stored) now lives in ``tier``. ``use``: a
        put wrote it; a copy moved by a demotion or promotion is no use of its own and does not move the clock
        (else every eviction would age the others twice)."""
        self._clock += nbytes if use else 0
        self._place(tier, block_id, reads)

    def accessed(self, tier: int, block_id: BlockId, nbytes: int, reads: int) -> None:
        """The copy in ``tier`` was used; the block has now been read ``reads`` times since it was stored."""
        self._clock += nbytes
        if self._ranked[tier].pop(block_id):
            self._ranked[tier].put(block_id, reads, self._clock)
        elif block_id in self._protected_lru[tier]:
            self._protected_lru[tier].move_to_end(block_id)

    def removed(self, tier: int, block_id: BlockId) -> None:
        self._ranked[tier].pop(block_id)
        self._protected_lru[tier].pop(block_id, None)

    def set_protected(self, block_id: BlockId, protected: bool, reads: int = 0) -> None:
        if not self.semantic or (block_id in self._protected) == protected:
            return
        for tier, ranked in enumerate(self._ranked):
            # moved without its old rank: it was just (un)marked, a use of its own
            if protected and ranked.pop(block_id):
                self._protected_lru[tier][block_id] = None
            elif not protected and block_id in self._protected_lru[tier]:
                del self._protected_lru[tier][block_id]
                ranked.put(block_id, reads, self._clock)
        if protected:
            self._protected.add(block_id)
        else:
            self._protected.discard(block_id)

    # -- decisions --------------------------------------------------------------------------------
    def victims(self, tier: int) -> Iterator[BlockId]:
        """Unprotected copies in ``tier``, lowest rank first. Protected copies are never offered.

        A live iterator, not a snapshot (copying the lists would make each eviction O(blocks)): take the
        first acceptable victim and stop before evicting."""
        return self._ranked[tier].ascending()

    def should_promote(self, lower_reads: int) -> bool:
        """Whether a block read ``lower_reads`` times from below the top tier earns a promotion."""
        return self.promote and lower_reads >= self.promotion_threshold
