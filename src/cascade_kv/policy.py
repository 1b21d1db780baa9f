"""Placement policy: which copies to evict, which blocks to promote. No I/O here.

The store tells the policy what happened (a copy was added to a tier, read,
removed; a block's protection changed) and asks it for victims. Per tier it
keeps two recency lists: evictable copies and protected ones. Protected copies
are kept out of the evictable list altogether, so finding a victim never walks
past a tier full of system prompts (a skip-list scan would make eviction
O(protected blocks) on exactly the workloads cascade-kv is for).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from .ids import BlockId


class LRUPolicy:
    """Least-recently-used eviction that never offers protected copies while unprotected ones remain.

    ``semantic=False`` ignores protection (plain LRU), for measuring what semantic eviction buys.
    """

    def __init__(self, tiers: int, *, semantic: bool = True, promotion_threshold: int = 3,
                 promote: bool = True) -> None:
        self.semantic = semantic
        self.promotion_threshold = promotion_threshold
        self.promote = promote
        self._lru: list[OrderedDict[BlockId, None]] = [OrderedDict() for _ in range(tiers)]
        self._protected_lru: list[OrderedDict[BlockId, None]] = [OrderedDict() for _ in range(tiers)]
        self._protected: set[BlockId] = set()

    # -- events -----------------------------------------------------------------------------------
    def _list(self, tier: int, block_id: BlockId) -> OrderedDict[BlockId, None]:
        return self._protected_lru[tier] if block_id in self._protected else self._lru[tier]

    def added(self, tier: int, block_id: BlockId) -> None:
        """A copy of the block now lives in ``tier`` (most recently used)."""
        self._list(tier, block_id)[block_id] = None

    def accessed(self, tier: int, block_id: BlockId) -> None:
        lst = self._list(tier, block_id)
        if block_id in lst:
            lst.move_to_end(block_id)

    def removed(self, tier: int, block_id: BlockId) -> None:
        self._lru[tier].pop(block_id, None)
        self._protected_lru[tier].pop(block_id, None)

    def set_protected(self, block_id: BlockId, protected: bool) -> None:
        if not self.semantic or (block_id in self._protected) == protected:
            return
        src, dst = (self._lru, self._protected_lru) if protected else (self._protected_lru, self._lru)
        if protected:
            self._protected.add(block_id)
        else:
            self._protected.discard(block_id)
        for tier in range(len(src)):
            if block_id in src[tier]:
                del src[tier][block_id]
                dst[tier][block_id] = None  # keeps no recency across the move: it was just (un)marked

    # -- decisions --------------------------------------------------------------------------------
    def victims(self, tier: int) -> Iterator[BlockId]:
        """Unprotected copies in ``tier``, least recently used first. Protected copies are never offered.

        A live iterator, not a snapshot (copying the list would make each eviction O(blocks)): take the
        first acceptable victim and stop before evicting."""
        return iter(self._lru[tier])

    def should_promote(self, lower_reads: int) -> bool:
        """Whether a block read ``lower_reads`` times from below the top tier earns a promotion."""
        return self.promote and lower_reads >= self.promotion_threshold


