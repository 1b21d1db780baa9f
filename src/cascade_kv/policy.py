"""Placement policy: which copies to evict, which blocks to promote. No I/O here.

The store tells the policy what happened (a copy was added to a tier, read, removed; a block's
protection changed) and asks it for victims. Per tier it keeps protected copies in a list of their
own, out of the victims' way, so finding a victim never walks past a tier full of system prompts
(a skip-list scan would make eviction O(protected blocks) on exactly the workloads cascade-kv is for).

Unprotected copies are ranked by recency (``order="lru"``: the seed's rule) or, with ``order="reuse"``
(the store's default), by recency credited by whether the block has been read since it was stored
(:class:`ReuseCredit`). In KV-cache traces a block that has been reused once is far more likely to
be reused again than a block just computed (on the Mooncake FAST'25 trace 84 % against 45 %, see
``python -m cascade_kv.bench.tracesim``), but plain LRU ranks a block computed a moment ago above a
system prompt read a thousand times an hour ago.

Both stores ask this module: :class:`Policy` orders each tier of the single-node store, :class:`ArenaPolicy`
one rank's arena in the distributed store (replicas, then unprotected copies, then protected ones). Both rank
unprotected copies the same way, so ``eviction_order`` means the same in either.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

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

    The defaults (0, 1, 1) are fitted, not chosen by hand: ``python -m cascade_kv.bench.tracefit fit``
    (:func:`~cascade_kv.bench.tracefit.fit`) over :data:`~cascade_kv.bench.tracefit.FIT_PARTS`, the first half
    of the shipped Mooncake trace (requests 1-1,997 in arrival order) and two generated conversation traces
    (``tracegen`` seeds 1 and 3), at 1/8, 1/4 and 1/2 of each one's distinct blocks: of the credits 0 to 4,
    those never below LRU there, the one closing the largest mean share of the LRU-to-Belady gap. Judged on
    what they were not fitted on (the second half, other seeds and shapes: ``tracefit heldout``,
    ``docs/policy.md``). The constants before issue 13 (4, 2) were chosen on the whole trace they were
    scored on, and fall below LRU on conversation traces.
    """

    never_read: float = 0.0
    read_once: float = 1.0
    read_twice_or_more: float = 1.0

    def by_reads(self) -> tuple[float, float, float]:
        return (self.never_read, self.read_once, self.read_twice_or_more)


def _credits(order: EvictionOrder, credit: ReuseCredit) -> tuple[float, ...]:
    """The credit of each read class for ``order``, in tier capacities: plain LRU is one recency list (no
    merge, and ties keep the order of use); ``reuse`` has one list per read class."""
    if order not in ("reuse", "lru"):
        raise ConfigError(f"eviction order must be 'reuse' or 'lru', got {order!r}")
    return (0.0,) if order == "lru" else credit.by_reads()


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
        credits = _credits(order, credit)
        self._ranked = [_Ranked([c * (cap or 0) for c in credits]) for cap in capacities]
        self.semantic = semantic
        self.order = order
        self.promotion_threshold = promotion_threshold
        self.promote = promote
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

    def accessed_many(self, tier: int, uses: Iterable[tuple[BlockId, int, int]]) -> None:
        """:meth:`accessed` for each ``(block_id, nbytes, reads)`` in order: a batch's reads in one call. The
        same steps, with the lookups hoisted out of the loop: at ~1 us a block, :meth:`accessed` per block was
        a third of a 4 KiB ``get_many``."""
        ranked, protected = self._ranked[tier], self._protected_lru[tier]
        lists, steps, last = ranked.lists, ranked.steps, len(ranked.lists) - 1
        clock = self._clock
        for block_id, nbytes, reads in uses:
            clock += nbytes
            for lst in lists:
                if lst.pop(block_id, None) is not None:
                    cls = reads if reads < last else last
                    lists[cls][block_id] = clock + steps[cls]
                    break
            else:
                if block_id in protected:
                    protected.move_to_end(block_id)
        self._clock = clock

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


class ArenaPolicy:
    """Eviction order of one rank's arena in the distributed store (:class:`~cascade_kv.cluster.arena.Arena`).

    Three classes, offered in this order: replicas (another memory copy exists by construction, so they are
    the cheapest to lose), unprotected copies, protected copies (which may only move to another rank's
    memory). Replicas and unprotected copies are ranked as :class:`Policy` ranks a tier's unprotected copies
    (``order``); protected ones by recency alone. The arena says which copies are listed, under which class,
    and skips victims it cannot take now (pinned, moving); the policy only orders. Reads by peers are
    one-sided and never reach the owner: only this rank's own reads count as uses.
    """

    REPLICA, UNPROTECTED, PROTECTED = 0, 1, 2
    EVICTABLE = (REPLICA, UNPROTECTED)
    """The classes whose bytes pressure can move anywhere (protected copies only go to a peer's memory)."""

    def __init__(self, capacity: int, *, order: EvictionOrder = "lru", credit: ReuseCredit = ReuseCredit()) -> None:
        steps = [c * capacity for c in _credits(order, credit)]
        self.order = order
        self._ranked = (_Ranked(steps), _Ranked(steps))  # replicas, unprotected copies
        self._protected: OrderedDict[BlockId, None] = OrderedDict()
        self._clock = 0.0

    def class_of(self, *, replica: bool, protected: bool) -> int:
        return self.REPLICA if replica else self.PROTECTED if protected else self.UNPROTECTED

    def _place(self, cls: int, block_id: BlockId, reads: int) -> None:
        if cls == self.PROTECTED:
            self._protected[block_id] = None
        else:
            self._ranked[cls].put(block_id, reads, self._clock)

    def added(self, cls: int, block_id: BlockId, nbytes: int, reads: int = 0, *, use: bool = True) -> None:
        """A copy (read ``reads`` times here) is a candidate victim of class ``cls`` now; ``use``: its bytes
        were just written (a reclassed copy is no use of its own and does not move the clock)."""
        self._clock += nbytes if use else 0
        self._place(cls, block_id, reads)

    def accessed(self, cls: int, block_id: BlockId, nbytes: int, reads: int) -> None:
        """This rank read the copy; it has now been read ``reads`` times here."""
        self._clock += nbytes
        self.kept(cls, block_id, reads)

    def kept(self, cls: int, block_id: BlockId, reads: int) -> None:
        """A victim that could not go stays, ranked as if used now, so the next pick tries another one."""
        self.removed(cls, block_id)
        self._place(cls, block_id, reads)

    def removed(self, cls: int, block_id: BlockId) -> None:
        if cls == self.PROTECTED:
            self._protected.pop(block_id, None)
        else:
            self._ranked[cls].pop(block_id)

    def victims(self, *, protected: bool) -> Iterator[BlockId]:
        """Replicas, then unprotected copies, lowest rank first; then, with ``protected``, protected copies,
        least recently used first. A live iterator (see :meth:`Policy.victims`): stop before changing a list."""
        first = chain(self._ranked[0].ascending(), self._ranked[1].ascending())
        return chain(first, self._protected) if protected else first

    def listed(self) -> Iterator[tuple[int, BlockId]]:
        """Every listed copy with its class (for the arena's consistency check)."""
        for cls, ranked in enumerate(self._ranked):
            for lst in ranked.lists:
                yield from ((cls, b) for b in lst)
        yield from ((self.PROTECTED, b) for b in self._protected)
