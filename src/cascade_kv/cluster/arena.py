"""One rank's share of cluster memory: the copies its arena window holds, and which of them may go.

The distributed store keeps, per rank, the blocks whose bytes lie in that rank's
arena (its own puts, victims adopted from peers, blocks loaded from disk and
replicas of peers' blocks), plus their eviction order. This module is that
bookkeeping and nothing else: no MPI calls and no directory traffic, so the
service thread's handlers and the application's threads can share it under one
lock. Deciding *where* a victim goes takes messages, and is the store's job.

Which copy goes first is :class:`~cascade_kv.policy.ArenaPolicy`'s decision
(the policy module orders the single-node store's tiers too): replicas, then
unprotected copies, then protected ones (which may only move to another
rank's memory), each class ranked by ``eviction_order``. The arena tells it
which copies are listed and skips the victims it cannot take now. The bytes
and their slot headers live in a :class:`~.slots.SlotArena`.

The policy's lists, the copies and the count of evictable bytes change together in two
places only (``_list`` and ``_unlist``), and a copy remembers the class it is
listed in: every path that seals, reclasses, dooms or frees a copy goes through
them, so no digest can stay ordered after its copy went. (Before, a sealed copy
abandoned by a writer whose ``publish`` failed was freed without leaving its
order, and every later eviction on that rank tripped over the stale digest.)
:meth:`Arena.check` states the invariants, for tests.

Every change of the arena's room is published in the window's header page
(:meth:`~.window.ArenaWindow.set_room`), where a rank looking for a peer to take a
victim reads it one-sidedly.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..config import EvictionOrder
from ..errors import InternalError
from ..ids import BlockId
from ..policy import ArenaPolicy
from .directory import TIER_MEMORY, Location
from .slots import SLOT_HEADER, SlotArena
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
    reads: int = 0
    """Reads of this copy by this rank (peers read one-sidedly, unseen): the policy's reuse class."""
    moving: bool = False
    """Being evicted by some thread: not offered as a victim again."""
    doomed: bool = False
    """Freed while pinned or moving: the slot goes when the last pin does."""
    listed: int = -1
    """The eviction class whose order lists the copy, or -1: only a sealed copy that is not doomed is
    listed, and only the arena's ``_list``/``_unlist`` change this, with the order, under the lock."""


class Arena:
    """The copies in this rank's window, with their eviction order. Thread-safe."""

    def __init__(self, window: ArenaWindow, capacity: int, *, rank: int, semantic: bool = True,
                 order: EvictionOrder = "lru") -> None:
        self.window = window
        self.rank = rank
        self.semantic = semantic
        # the window holds one header more than the tier's capacity: an empty arena takes a block of capacity bytes
        self.tier = SlotArena(capacity + SLOT_HEADER, window.memory)
        self.policy = ArenaPolicy(self.tier.capacity, order=order)
        self.lock = threading.Lock()
        self._copies: dict[BlockId, Copy] = {}
        self._evictable = 0  # bytes of sealed unprotected copies (replicas count too): what pressure can move
        self.sealed = 0
        """Sealed copies held (readable blocks): kept as copies are sealed and freed, so stats() need not walk
        them (2.2 ms at 50k copies)."""
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
            if not c.generation:
                self.sealed += 1
            c.generation = self.tier.seal(c.digest)
            if not c.doomed and c.listed < 0:
                self._list(c)
                self._publish_room()
            loc = self.location(c)
            if not keep_pin:
                self._unpin_locked(c)
            return loc

    def view(self, c: Copy) -> memoryview:
        return self.tier.view(c.digest)

    def readable(self, digest: BlockId) -> Copy | None:
        """Pin and return a sealed copy for a local read (:meth:`unpin` after), or ``None``."""
        return self.readable_many([digest])[0]

    def readable_many(self, digests: Sequence[BlockId]) -> list[Copy | None]:
        """:meth:`readable` for a batch, under one hold of the lock (a get of 64 small blocks took it 64 times)."""
        out: list[Copy | None] = []
        with self.lock:
            copies = self._copies
            for digest in digests:
                c = copies.get(digest)
                if c is None or c.generation == 0 or c.doomed:
                    out.append(None)
                    continue
                c.pins += 1
                c.reads += 1
                if c.listed >= 0:
                    self.policy.accessed(c.listed, digest, c.nbytes, c.reads)
                out.append(c)
        return out

    def unpin(self, c: Copy) -> None:
        with self.lock:
            self._unpin_locked(c)

    def abandon(self, c: Copy) -> None:
        """A writer that failed, before or after :meth:`seal` (its ``publish`` refused): drop its pin and
        free the copy (once other pins, taken by local readers after the seal, are gone too)."""
        with self.lock:
            c.pins -= 1
            self._doom(c)

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
            c.protected = protected
            self._reclass(c)

    def pick_victim(self, *, protected: bool) -> Copy | None:
        """Mark and return the policy's first victim that is idle (replicas first, then unprotected copies;
        with ``protected``, protected copies too); ``None`` when none is. Call :meth:`release` after."""
        with self.lock:
            for digest in self.policy.victims(protected=protected):
                c = self._copies[digest]  # listed implies live: see _list
                if c.pins == 0 and not c.moving:
                    c.moving = True
                    return c
            return None

    def release(self, c: Copy, *, gone: bool) -> None:
        """End an eviction: ``gone`` frees the copy (it moved, or another copy keeps the block); otherwise it
        stays, as the most recently used of its class, so the next pick tries another one."""
        with self.lock:
            c.moving = False
            if gone or c.doomed:
                self._doom(c)  # frees it unless a local reader pinned it while it moved
            elif c.listed >= 0:
                self.policy.kept(c.listed, c.digest, c.reads)

    def promote_to_primary(self, c: Copy) -> None:
        """A replica turned out to be the block's last memory copy: it is evicted like a primary from now on."""
        with self.lock:
            if c.replica:
                c.replica = False
                self._reclass(c)

    def check(self, *, idle: bool = False) -> list[str]:
        """What is wrong with the bookkeeping: an empty list when the eviction order, the copies, the tier's
        slots and the published room agree. ``idle``: no read, write or move is in flight either (no pins,
        nothing moving or doomed). For tests; takes the lock, so it sees no change half made."""
        problems: list[str] = []
        with self.lock:
            listed: dict[BlockId, int] = {}
            for cls, digest in self.policy.listed():
                name = digest.hex()[:16]
                if digest in listed:
                    problems.append(f"block {name}: listed in eviction classes {listed[digest]} and {cls}")
                listed[digest] = cls
                c = self._copies.get(digest)
                if c is None:
                    problems.append(f"block {name}: listed in eviction class {cls} but has no copy")
                elif c.listed != cls or self._class(c) != cls:
                    problems.append(f"block {name}: listed in class {cls}, copy says {c.listed}, "
                                    f"belongs in {self._class(c)}")
                elif c.generation == 0 or c.doomed:
                    problems.append(f"block {name}: listed while {'doomed' if c.doomed else 'unsealed'}")
            for digest, c in self._copies.items():
                name = digest.hex()[:16]
                if c.generation and not c.doomed and digest not in listed:
                    problems.append(f"block {name}: sealed live copy missing from the eviction order")
                if not self.tier.contains(digest):
                    problems.append(f"block {name}: copy without a slot in the tier")
                elif self.tier.location(digest)[0] != c.offset:
                    problems.append(f"block {name}: copy at {c.offset}, slot at {self.tier.location(digest)[0]}")
                if c.pins < 0:
                    problems.append(f"block {name}: {c.pins} pins")
                if idle and (c.pins or c.moving or c.doomed):
                    problems.append(f"block {name}: pins {c.pins}, moving {c.moving}, doomed {c.doomed} while idle")
            for digest in self.tier.block_ids():
                if digest not in self._copies:
                    problems.append(f"block {digest.hex()[:16]}: slot in the tier with no copy (leaked)")
            evictable = sum(self._copies[d].nbytes for cls, d in self.policy.listed()
                            if cls in ArenaPolicy.EVICTABLE and d in self._copies)
            if sum(1 for c in self._copies.values() if c.generation) != self.sealed:
                problems.append(f"sealed copies counted {self.sealed}, "
                                f"{sum(1 for c in self._copies.values() if c.generation)} held")
            if evictable != self._evictable:
                problems.append(f"evictable bytes counted {self._evictable}, listed copies hold {evictable}")
            if not self.window.closed and self.window.room() != (self.tier.largest_hole, self._evictable):
                problems.append(f"room published {self.window.room()}, tier has "
                                f"{(self.tier.largest_hole, self._evictable)}")
        return [f"rank {self.rank}: {p}" for p in problems]

    # -------------------------------------------------------------- internals (lock held)
    def _class(self, c: Copy) -> int:
        return self.policy.class_of(replica=c.replica, protected=c.protected)

    def _list(self, c: Copy, *, use: bool = True) -> None:
        """Offer a sealed, live copy as a victim of its class (the most recently used)."""
        if c.listed >= 0 or not c.generation or c.doomed or self._copies.get(c.digest) is not c:
            # listed twice, or a copy that is unsealed, going or replaced: evicting it would free live bytes
            raise InternalError(f"rank {self.rank}: arena: {c} cannot be listed as a victim")
        c.listed = self._class(c)
        self.policy.added(c.listed, c.digest, c.nbytes, c.reads, use=use)
        self._evictable += c.nbytes if c.listed in ArenaPolicy.EVICTABLE else 0

    def _unlist(self, c: Copy) -> None:
        if c.listed >= 0:
            self.policy.removed(c.listed, c.digest)
            self._evictable -= c.nbytes if c.listed in ArenaPolicy.EVICTABLE else 0
            c.listed = -1

    def _reclass(self, c: Copy) -> None:
        """List the copy under its class again, if it is listed and its class changed."""
        if c.listed >= 0 and c.listed != self._class(c):
            self._unlist(c)
            self._list(c, use=False)
            self._publish_room()

    def _doom(self, c: Copy) -> None:
        if not c.doomed:
            c.doomed = True
            self._unlist(c)
            self._publish_room()
        if c.pins == 0 and not c.moving:
            self._free_locked(c)

    def _unpin_locked(self, c: Copy) -> None:
        c.pins -= 1
        if c.pins == 0 and c.doomed and not c.moving:
            self._free_locked(c)

    def _free_locked(self, c: Copy) -> None:
        self._unlist(c)  # a no-op on the paths through _doom; it keeps every other one honest
        if self._copies.get(c.digest) is c:
            del self._copies[c.digest]
            if c.generation:
                self.sealed -= 1
            self.tier.free(c.digest)  # tombstones the header first: peers reading the slot see it went
            self._publish_room()

    def _publish_room(self) -> None:
        self.window.set_room(self.tier.largest_hole, self._evictable)

    def close(self) -> None:
        with self.lock:
            for c in self._copies.values():
                self._unlist(c)
            self._copies.clear()
            self.sealed = 0
            self.tier.close()

    def blocks(self) -> Iterator[Copy]:
        return iter(self.copies())


__all__ = ["Arena", "Copy"]
