"""One rank's share of cluster memory: the copies its arena window holds, and which of them may go.

The distributed store keeps, per rank, the blocks whose bytes lie in that rank's
arena (its own puts, victims adopted from peers, blocks loaded from disk and
replicas of peers' blocks), plus their eviction order. This module is that
bookkeeping and nothing else: no MPI calls and no directory traffic, so the
service thread's handlers and the application's threads can share it under one
lock. Deciding *where* a victim goes takes messages, and is the store's job.

Victims are offered in three tiers of preference, least recently used first in
each: replicas (another memory copy exists by construction, so they are the
cheapest to lose), then unprotected copies, then protected ones (which may only
move to another rank's memory). One ordered dict per class keeps every pick
O(1) in the common case, as in :class:`~cascade_kv.policy.Policy`.

Every change of the arena's room is published in the window's header page
(:meth:`~.window.ArenaWindow.set_room`), where a rank looking for a peer to take a
victim reads it one-sidedly.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from ..ids import BlockId
from ..tiers import HostTier
from ..tiers.slots import SLOT_HEADER
from .directory import TIER_MEMORY, Location
from .window import ArenaWindow


@dataclass(slots=True)
class Copy:
    """A block whose bytes lie in this rank's arena."""

    digest: BlockId
    nbytes: int
    protected: bool
    """Some prefix key refers to the block (as last told by its home): it may only move to a peer's memory."""
    replica: bool
    """Made because this rank read the block from a peer often: the first to go under pressure."""
    generation: int = 0
    """The sealed slot's generation; 0 while the bytes are being written (not readable, not a victim)."""
    offset: int = 0
    """Offset of the slot header in the arena."""
    pins: int = 0
    """Local reads and moves in flight: the slot is not freed while > 0."""
    moving: bool = False
    """Being evicted by some thread: not offered as a victim again."""
    doomed: bool = False
    """Freed while pinned or moving: the slot goes when the last pin does."""


class Arena:
    """The copies in this rank's window, with their eviction order. Thread-safe."""

    def __init__(self, window: ArenaWindow, capacity: int, *, rank: int, semantic: bool = True) -> None:
        self.window = window
        self.rank = rank
        self.semantic = semantic
        # the window holds one header more than the tier's capacity: an empty arena takes a block of capacity bytes
        self.tier = HostTier(capacity + SLOT_HEADER, window.memory, slot_headers=True)
        self.lock = threading.Lock()
        self._copies: dict[BlockId, Copy] = {}
        self._order: tuple[OrderedDict[BlockId, None], ...] = (OrderedDict(), OrderedDict(), OrderedDict())
        self._evictable = 0  # bytes of sealed unprotected copies (replicas count too): what pressure can move
        self._publish_room()

    # -------------------------------------------------------------- queries (lock held or not)
    def __contains__(self, digest: object) -> bool:
        return digest in self._copies

    def get(self, digest: BlockId) -> Copy | None:
        return self._copies.get(digest)

    def __len__(self) -> int:
        return len(self._copies)

    @property
    def capacity(self) -> int:
        return self.tier.capacity

    def fits(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` could ever fit (in an empty arena)."""
        return self.tier.fits(nbytes)

    def location(self, c: Copy) -> Location:
        return Location(self.rank, TIER_MEMORY, c.offset, c.nbytes, c.generation)

    def copies(self) -> list[Copy]:
        with self.lock:
            return list(self._copies.values())

    # -------------------------------------------------------------- changes (take the lock)
    def allocate(self, digest: BlockId, nbytes: int, *, protected: bool, replica: bool) -> Copy | None:
        """Reserve a slot (no eviction); ``None`` when there is no hole for it, or the block is here already."""
        with self.lock:
            if digest in self._copies or not self.tier.allocate(digest, nbytes):
                return None
            c = self._copies[digest] = Copy(digest, nbytes, protected and self.semantic, replica)
            c.offset = self.tier.location(digest)[0]
            c.pins = 1  # the writer's pin: nobody frees the slot under it
            self._publish_room()
            return c

    def seal(self, c: Copy, *, keep_pin: bool = False) -> Location:
        """The writer filled the slot through :meth:`view`: publish the bytes under a fresh generation, make
        the copy a candidate victim, and drop the writer's pin (``keep_pin``: the caller unpins once the
        directory lists the copy; evicted before that, its eviction would find it unlisted)."""
        with self.lock:
            c.generation = self.tier.seal(c.digest)
            if not c.doomed:
                self._order[self._class(c)][c.digest] = None
                self._evictable += c.nbytes if self._class(c) < 2 else 0
                self._publish_room()
            loc = self.location(c)
            if not keep_pin:
                self._unpin_locked(c)
            return loc

    def view(self, c: Copy) -> memoryview:
        return self.tier.view(c.digest)

    def readable(self, digest: BlockId) -> Copy | None:
        """Pin and return a sealed copy for a local read (:meth:`unpin` after), or ``None``."""
        with self.lock:
            c = self._copies.get(digest)
            if c is None or c.generation == 0 or c.doomed:
                return None
            c.pins += 1
            order = self._order[self._class(c)]
            if digest in order:
                order.move_to_end(digest)
            return c

    def unpin(self, c: Copy) -> None:
        with self.lock:
            self._unpin_locked(c)

    def abandon(self, c: Copy) -> None:
        """A writer that failed: free the slot it allocated."""
        with self.lock:
            c.doomed = True
            self._unpin_locked(c)

    def free(self, digest: BlockId, generation: int | None = None) -> bool:
        """Free the copy (the one of ``generation``, if given); a pinned or moving copy goes when released.
        False when there is no such copy."""
        with self.lock:
            c = self._copies.get(digest)
            if c is None or (generation is not None and c.generation != generation):
                return False
            self._doom(c)
            return True

    def set_protected(self, digest: BlockId, protected: bool) -> None:
        with self.lock:
            c = self._copies.get(digest)
            protected = protected and self.semantic
            if c is None or c.protected == protected:
                return
            was = self._class(c)
            c.protected = protected
            self._reclass(c, was)

    def pick_victim(self, *, protected: bool) -> Copy | None:
        """Mark and return the least recently used copy that may go (replicas first, then unprotected copies;
        with ``protected``, protected copies too); ``None`` when none is idle. Call :meth:`release` after."""
        with self.lock:
            for cls in ((0, 1, 2) if protected else (0, 1)):
                for digest in self._order[cls]:
                    c = self._copies[digest]
                    if c.pins == 0 and not c.moving:
                        c.moving = True
                        return c
            return None

    def release(self, c: Copy, *, gone: bool) -> None:
        """End an eviction: ``gone`` frees the copy (it moved, or another copy keeps the block); otherwise it
        stays, as the most recently used of its class, so the next pick tries another one."""
        with self.lock:
            c.moving = False
            if gone:
                self._doom(c)
            elif c.doomed:
                self._free_locked(c)
            else:
                order = self._order[self._class(c)]
                if c.digest in order:
                    order.move_to_end(c.digest)

    def promote_to_primary(self, c: Copy) -> None:
        """A replica turned out to be the block's last memory copy: it is evicted like a primary from now on."""
        with self.lock:
            if c.replica:
                was = self._class(c)
                c.replica = False
                self._reclass(c, was)

    # -------------------------------------------------------------- internals (lock held)
    def _class(self, c: Copy) -> int:
        return 0 if c.replica else 2 if c.protected else 1

    def _reclass(self, c: Copy, was: int) -> None:
        now = self._class(c)
        if now == was or c.generation == 0 or c.doomed:
            return
        # the dicts map to None, so pop's default tells "was listed" (None) from "was not" (0)
        if self._order[was].pop(c.digest, 0) is None:  # it was listed: list it in its new class
            self._order[now][c.digest] = None
            self._evictable += (c.nbytes if now < 2 else 0) - (c.nbytes if was < 2 else 0)
            self._publish_room()

    def _doom(self, c: Copy) -> None:
        if not c.doomed:
            c.doomed = True
            if self._order[self._class(c)].pop(c.digest, 0) is None and self._class(c) < 2:
                self._evictable -= c.nbytes
        if c.pins == 0 and not c.moving:
            self._free_locked(c)

    def _unpin_locked(self, c: Copy) -> None:
        c.pins -= 1
        if c.pins == 0 and c.doomed and not c.moving:
            self._free_locked(c)

    def _free_locked(self, c: Copy) -> None:
        if self._copies.get(c.digest) is c:
            del self._copies[c.digest]
            self.tier.free(c.digest)  # tombstones the header first: peers reading the slot see it went
            self._publish_room()

    def _publish_room(self) -> None:
        self.window.set_room(self.tier.largest_hole, self._evictable)

    def close(self) -> None:
        with self.lock:
            self._copies.clear()
            for order in self._order:
                order.clear()
            self.tier.close()

    def blocks(self) -> Iterator[Copy]:
        return iter(self.copies())


__all__ = ["Arena", "Copy"]
