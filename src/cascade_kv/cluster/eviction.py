"""Room in this rank's arena: placing a block in memory, and evicting victims to make room for it.

A victim leaves by the cheapest way that keeps its block where it must be (``docs/distributed-design.md``,
"eviction on rank R"): dropped when another copy keeps the block; else adopted by the peer with the most
room (it pulls the bytes out of our window one-sidedly); else, unprotected, written to the shared disk;
else (no disk tier) dropped and counted. A protected block that finds no room asks a peer to make room.

Nothing here holds the arena's lock across a message.
"""
from __future__ import annotations

import logging

from ..config import format_size
from ..errors import CapacityError
from ..ids import BlockId, block_name
from .arena import Copy
from .context import RankContext
from .diskio import SharedDisk
from .directory import CopyStatus, Location
from .handlers import OwnerOps
from .service import RemoteError
from .slots import SLOT_HEADER

log = logging.getLogger(__name__)


class Eviction:
    """Places blocks in this rank's arena, making room by moving victims down (peers, disk, dropped)."""

    def __init__(self, ctx: RankContext, disk: SharedDisk | None, owners: OwnerOps) -> None:
        self.ctx = ctx
        self.disk = disk
        self.owners = owners

    def place(self, digest: BlockId, data: memoryview, *, protected: bool, replica: bool = False) -> Copy | None:
        """Copy ``data`` into this rank's arena, making room; the sealed copy, *still pinned* (unpin it once
        the directory lists it: :meth:`publish_pinned`), or None when there is no room."""
        arena = self.ctx.arena
        c = self.allocate(digest, data.nbytes, protected=protected, replica=replica)
        if c is None:
            return None
        try:
            arena.view(c)[:] = data
        except BaseException:
            arena.abandon(c)
            raise
        with arena.lock:
            self.ctx.counters.host.bytes_written += data.nbytes
        arena.seal(c, keep_pin=True)
        return c

    def publish_pinned(self, c: Copy) -> bool:
        """List a freshly stored copy at its home, then unpin it; False (and the copy freed) when the block
        was deleted meanwhile."""
        arena = self.ctx.arena
        try:
            self.ctx.directory.publish(c.digest, arena.location(c))
        except RemoteError as e:
            if e.remote_type != "BlockNotFound":
                arena.abandon(c)
                raise
            arena.abandon(c)
            return False
        arena.unpin(c)
        return True

    def allocate(self, digest: BlockId, nbytes: int, *, protected: bool, replica: bool) -> Copy | None:
        """A slot in this rank's arena, evicting victims (replicas, then unprotected copies, then protected
        ones to peers' memory) until it fits; None when it cannot. A replica (a block this rank reads often
        from a peer) may displace replicas and unprotected copies, which move down as any victim does, but
        never protected ones: under pressure a hot block's replica is worth more here than a cold block.

        Bounded: it gives up after a full round of victims in a row that had to stay, and after a budget of
        tries (victims and requests for room) of a few times the copies the arena held when it began, since
        other threads and ranks may fill the holes it opens as fast as it opens them. A protected block asks a
        peer to make room only after a protected victim stayed for want of a peer's hole: a hole on a peer
        helps nothing else. With no victim at all (every copy here is being written, read or moved: a put keeps
        its copies pinned until the directory lists them, so a put of several protected blocks, or two
        threads' puts, can pin a fragmented arena whole), the answer "a peer has room" changed nothing here,
        and asking again on it looped forever while the pins it waited on belonged to the put itself or to a
        put waiting the same way (issue 8: a rank that never reached the model test's barrier). Such a put
        now fails with CapacityError, which gives its pins back."""
        arena = self.ctx.arena
        if not arena.fits(nbytes):
            return None
        stuck = 0  # victims in a row that had to stay (moves in flight): give up after a full round
        budget = 3 * (len(arena) + self.ctx.size)  # tries in all: a protected move may take a try, an ask, a try
        try_protected = True
        while stuck <= len(arena) and budget > 0:
            if digest in arena:
                return None  # a concurrent put or load of the same block got here first
            c = arena.allocate(digest, nbytes, protected=protected, replica=replica)
            if c is not None:
                return c
            budget -= 1
            victim = arena.pick_victim(protected=False)
            if victim is None and try_protected and not replica:
                victim = arena.pick_victim(protected=True)
            if victim is not None:
                if self.evict(victim):
                    stuck = 0
                else:
                    stuck += 1
                    try_protected = try_protected and not victim.protected  # no peer takes protected data now
                continue
            if protected and not replica and not try_protected and self.ask_for_room(nbytes + SLOT_HEADER):
                try_protected = True  # a peer has a hole now: our protected victims can go there
                continue
            return None
        return None

    def no_room(self, what: str, nbytes: int) -> CapacityError:
        """A protected block found no slot here after a bounded effort (see :meth:`allocate`): say why."""
        arena = self.ctx.arena
        busy = sum(c.nbytes for c in arena.copies() if c.pins or c.moving)
        holes = [hole for r, (hole, _) in enumerate(self.ctx.window.rooms()) if r != self.ctx.rank]
        return CapacityError(f"{what}: no room in cluster memory for a protected block of {format_size(nbytes)}: "
                             f"largest hole here {arena.tier.largest_hole} B, {busy} B here being written, read "
                             f"or moved, largest hole on a peer {max(holes, default=0)} B")

    def evict(self, victim: Copy) -> bool:
        """Make ``victim``'s slot free: drop it when another copy keeps the block, else move it to the peer with
        the most room, else (unprotected) to the shared disk, else drop the block. False: it must stay."""
        ctx, arena, c = self.ctx, self.ctx.arena, self.ctx.counters
        loc = arena.location(victim)
        gone = False
        try:
            status, protected = ctx.directory.drop_copy(victim.digest, loc)
            if status is CopyStatus.REMOVED:
                with arena.lock:
                    c.host.evictions += 1
                gone = True
                return True
            if status is CopyStatus.GONE:
                # Not listed: a copy a peer moved to us whose home has not been told yet (it will be, or the
                # mover frees it), or one whose block was freed (its FREE is on the way). Not ours to free.
                return False
            keep_in_memory = protected > 0 and ctx.config.semantic_eviction
            arena.set_protected(victim.digest, keep_in_memory)
            if victim.replica:
                arena.promote_to_primary(victim)
            if self.move_to_peer(victim, loc, protected > 0):
                gone = True
                return True
            if keep_in_memory:
                return False
            if self.disk is not None:
                self.disk.write(victim.digest, arena.view(victim))
                # moved, or the block was freed meanwhile: either way this slot may go
                ctx.directory.move(victim.digest, loc, self.disk.location(victim.nbytes))
                gone = True
                with arena.lock:
                    c.demotions += 1
                    c.host.evictions += 1
                return True
            ctx.directory.drop_copy(victim.digest, loc, force=True)
            gone = True
            with arena.lock:
                c.drops += 1
                c.dropped_bytes += victim.nbytes
                c.host.evictions += 1
            log.debug("rank %d: dropped block %s (%d B): no peer memory and no disk tier", ctx.rank,
                      block_name(victim.digest)[:16], victim.nbytes)
            return True
        finally:
            arena.release(victim, gone=gone)

    def move_to_peer(self, victim: Copy, loc: Location, protected: bool) -> bool:
        """Ask the peers with a hole big enough, most room first, to adopt the victim (they pull its bytes
        out of our window one-sidedly); then point the home at the new copy."""
        ctx, c = self.ctx, self.ctx.counters
        if ctx.size == 1:
            return False
        need = victim.nbytes + SLOT_HEADER
        rooms = ctx.window.rooms()
        peers = sorted((r for r in range(ctx.size) if r != ctx.rank and rooms[r][0] >= need),
                       key=lambda r: -rooms[r][0])
        for peer in peers:
            adopted = self.owners.adopt(peer, victim.digest, loc, protected)
            if adopted.location is None:
                if adopted.retry_elsewhere:
                    continue
                return False  # stale: our slot changed under us (cannot happen while we hold it moving)
            new = adopted.location
            if not ctx.directory.move(victim.digest, loc, new):  # freed meanwhile: the peer's copy must go too
                self.owners.free(victim.digest, [new])
            with ctx.arena.lock:
                c.demotions += 1
                c.host.evictions += 1
                c.remote.bytes_written += victim.nbytes
                c.bytes_sent += victim.nbytes
            return True
        return False

    def ask_for_room(self, need: int) -> bool:
        """Protected data needs memory and none is free: ask the peer with the most evictable bytes to demote
        unprotected blocks to disk until a hole of ``need`` bytes opens; forward its moves to their homes."""
        ctx = self.ctx
        rooms = ctx.window.rooms()
        peers = sorted((r for r in range(ctx.size) if r != ctx.rank and rooms[r][1] > 0),
                       key=lambda r: -rooms[r][1])
        for peer in peers:
            made = self.owners.make_room(peer, need)
            if made.moves:
                ctx.directory.move_many(made.moves)
            for digest, old in made.drops:
                ctx.directory.drop_copy(digest, old, force=True)
            if made.ok:
                return True
        return False


__all__ = ["Eviction"]
