"""A dry run of placement: whether a put, protect or demote can place every block it must, decided
before anything is demoted or dropped.

Placement evicts as it goes (a victim demoted from memory may push the disk's LRU block out of the
store), so finding out half way through a batch that its last block has no room would leave blocks
dropped and demoted for nothing. :class:`DryRun` replays the steps of
:class:`~cascade_kv.placement.Placement` (the policy's victims in order, demotion one tier down, a drop
at the last tier) against what-if copies of the tiers' room (:meth:`Tier.room_model`: the host
arena's holes, a byte count elsewhere) and changes nothing; the store then allocates each block in
the tier the run chose, so the two cannot disagree while no other thread moves blocks meanwhile (the
store keeps its own promoter out of the way; concurrent callers are not).

Summing free and evictable bytes (the first version) was rejected: it cannot see the arena's
fragmentation, nor that a victim dropped at the last tier frees its memory copy too, nor that every
block of a batch but the first must find room next to the ones placed before it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .blocks import Block
from .errors import InternalError
from .ids import BlockId
from .tiers.base import RoomModel

if TYPE_CHECKING:
    from .context import StoreContext


class DryRun:
    """What-if placement over a store's current state (its lock held throughout; nothing is changed).

    ``held``: blocks that may not be victims (the batch's own: pinned until its commit)."""

    def __init__(self, ctx: StoreContext, held: Iterable[BlockId] = ()) -> None:
        self._ctx = ctx
        self._tiers = ctx.tiers
        self._blocks: dict[BlockId, Block] = ctx.blocks
        self._rooms: list[RoomModel | None] = [None] * len(self._tiers)  # made on first use
        self._where: dict[BlockId, int] = {}  # blocks whose copies the run changed -> their tiers now
        self._arrived: list[list[BlockId]] = [[] for _ in self._tiers]  # copies moved in, in order
        self.held: set[BlockId] = set(held)
        self._moving: set[BlockId] = set()
        self.dropped: set[BlockId] = set()
        """Blocks the run dropped (a full last tier): a put that fits may drop them, as any cache does."""

    # -- state ----------------------------------------------------------------------------------
    def where(self, b: Block) -> int:
        return self._where.get(b.id, b.where)

    def room(self, t: int) -> RoomModel:
        room = self._rooms[t]
        if room is None:
            room = self._rooms[t] = self._tiers[t].room_model()
        return room

    def add(self, b: Block, t: int) -> None:
        """``b`` was allocated in tier ``t`` (by :meth:`allocate` or :meth:`make_room`) and written."""
        self._where[b.id] = self.where(b) | 1 << t

    def free_copy(self, b: Block, t: int) -> None:
        self.room(t).free(b.id, b.nbytes)
        self._where[b.id] = self.where(b) & ~(1 << t)

    def _drop_block(self, b: Block) -> None:
        w = self.where(b)
        for t in range(len(self._tiers)):
            if w >> t & 1:
                self.free_copy(b, t)
        self.dropped.add(b.id)

    def _victims(self, t: int) -> Iterator[Block]:
        """Tier ``t``'s victims in the run's state: the policy's order, then the copies moved in by the
        run (a moved copy is no use of its own, so the policy ranks it after every copy there before)."""
        seen = self._ctx.policy.victims(t)
        i = 0
        for bid in seen:
            v = self._blocks[bid]
            if self._eligible(v, t):
                yield v
        while i < len(self._arrived[t]):
            v = self._blocks[self._arrived[t][i]]
            i += 1
            if self._eligible(v, t):
                yield v

    def _eligible(self, v: Block, t: int) -> bool:
        return (self.where(v) >> t & 1 == 1 and v.id not in self.held and v.id not in self._moving
                and v.pins == 0 and not v.moving and v.ready)

    # -- the steps of Placement -----------------------------------------------------------------
    def could_make_room(self, t: int, nbytes: int) -> bool:
        """Whether tier ``t`` can take ``nbytes`` after freeing its victims (the run is not changed).
        Frees only ``t``'s own copies: what a cascade frees above (a drop at the last tier) is extra."""
        room = self.room(t).copy()
        probe = BlockId(b"")
        if room.allocate(probe, nbytes):
            return True
        for v in self._victims(t):
            room.free(v.id, v.nbytes)
            if room.allocate(probe, nbytes):
                return True
        return False

    def allocate(self, b: Block, allowed: list[int]) -> int | None:
        """The tier a put would place ``b`` in (allocated in the run), or ``None`` when none can take it.
        A tier is tried only if it can make room: the store then never empties a tier for nothing."""
        for t in allowed:
            if self._tiers[t].fits(b.nbytes) and self.could_make_room(t, b.nbytes):
                if not self.make_room(t, b):  # the plan would place a block where no room was made
                    raise InternalError(f"dry run: tier {t} could make room for {b.nbytes} B, then did not "
                                        f"(could_make_room must free a subset of what make_room frees)")
                return t
        return None

    def make_room(self, t: int, b: Block, may_drop: bool = True) -> bool:
        room = self.room(t)
        while not room.allocate(b.id, b.nbytes):
            victim = next(self._victims(t), None)
            if victim is None or not self._evict(victim, t, may_drop):
                return False
        return True

    def _evict(self, v: Block, t: int, may_drop: bool) -> bool:
        w, dst = self.where(v), t + 1
        if w >> dst:
            self.free_copy(v, t)
            return True
        if dst == len(self._tiers):
            if w & ~(1 << t) and not self._ctx.durable_copy(t):
                self.free_copy(v, t)
            elif not may_drop:
                return False
            else:
                self._drop_block(v)
            return True
        self._moving.add(v.id)
        try:
            placed = self.make_room(dst, v, may_drop)
        finally:
            self._moving.discard(v.id)
        if not placed:
            if not may_drop:
                return False
            self._drop_block(v)
            return True
        self.add(v, dst)
        self._arrived[dst].append(v.id)
        self.free_copy(v, t)
        return True
