"""Requests to the owner of copies (ops 32..47; the directory has 16..31): both ends of each.

- ``OP_ADOPT``: a peer evicts a block to us; we take it only into a free hole (never evicting for someone
  else), pulling its bytes out of the peer's window with a checked one-sided read.
- ``OP_FREE``: the block's last reference went; free our copy of that generation.
- ``OP_NOTE_PROTECT``: the block became protected, or stopped being: reclass our copy.
- ``OP_MAKE_ROOM``: a peer needs memory for protected data; demote our unprotected copies to disk until a
  hole of the size asked for opens.

Handlers run on the service thread and never send a request to another rank (two service threads waiting
on each other would deadlock): where their work changes another home's entries (``OP_MAKE_ROOM``'s moves),
they return the changes and the caller forwards them.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..ids import BlockId
from .context import RankContext
from .diskio import SharedDisk
from .directory import LOCATION, TIER_DISK, TIER_MEMORY, Location
from .rma import remote_read
from .slots import digest16_of

OP_ADOPT = 32
OP_FREE = 33
OP_NOTE_PROTECT = 34
OP_MAKE_ROOM = 35

_ADOPT_REQ = struct.Struct("<QQQB")  # nbytes, source slot offset, source generation, protected; after the digest
_ADOPT_REPLY = struct.Struct("<BQQ")  # status, offset, generation
_ADOPTED, _NO_ROOM, _STALE, _HAVE = 0, 1, 2, 3
_FREE_REQ = struct.Struct("<Q")  # generation
_MAKE_ROOM_REQ = struct.Struct("<Q")  # bytes wanted in one hole
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")


def _digest_bytes(d: bytes) -> bytes:
    return _U8.pack(len(d)) + d


def _read_digest(buf: memoryview, pos: int) -> tuple[BlockId, int]:
    n = buf[pos]
    return BlockId(bytes(buf[pos + 1:pos + 1 + n])), pos + 1 + n


@dataclass(frozen=True, slots=True)
class Adopted:
    """A peer's answer to ``adopt``."""

    location: Location | None
    """Where the peer's copy lies; None when it did not take the block."""
    retry_elsewhere: bool
    """The peer had no hole (ask the next one); False with no location: our slot changed (give up)."""


@dataclass(frozen=True, slots=True)
class RoomMade:
    """A peer's answer to ``make_room``: whether a hole of the size asked for is open now, and the copies it
    demoted to disk or dropped, for the caller to tell their homes."""

    ok: bool
    moves: list[tuple[BlockId, Location, Location]]
    """``(digest, old memory location, new disk location)``."""
    drops: list[tuple[BlockId, Location]]


class OwnerOps:
    """Serves the owner ops on this rank and sends them to peers."""

    def __init__(self, ctx: RankContext, disk: SharedDisk | None) -> None:
        self.ctx = ctx
        self.disk = disk

    def register(self) -> None:
        for op, handler in ((OP_ADOPT, self._on_adopt), (OP_FREE, self._on_free),
                            (OP_NOTE_PROTECT, self._on_note_protect), (OP_MAKE_ROOM, self._on_make_room)):
            self.ctx.service.register(op, handler)

    # ------------------------------------------------------------------ calling
    def adopt(self, peer: int, digest: BlockId, loc: Location, protected: bool) -> Adopted:
        """Ask ``peer`` to take our copy at ``loc``."""
        request = _digest_bytes(digest) + _ADOPT_REQ.pack(loc.nbytes, loc.offset, loc.generation, protected)
        status, offset, generation = _ADOPT_REPLY.unpack(self.ctx.service.call(peer, OP_ADOPT, request))
        if status == _ADOPTED:
            return Adopted(Location(peer, TIER_MEMORY, offset, loc.nbytes, generation), False)
        return Adopted(None, status == _NO_ROOM)

    def free(self, digest: BlockId, memory: Sequence[Location]) -> None:
        """Tell each owner of a memory copy to free it (that generation only)."""
        requests = [(loc.rank, OP_FREE, _digest_bytes(digest) + _FREE_REQ.pack(loc.generation)) for loc in memory]
        if requests:
            self.ctx.service.call_many(requests)

    def note_protect(self, digest: BlockId, memory: Sequence[Location], protected: bool) -> None:
        """Tell the owners of ``memory`` copies that the block became protected (or stopped being)."""
        requests = [(rank, OP_NOTE_PROTECT, _digest_bytes(digest) + _U8.pack(protected))
                    for rank in sorted({loc.rank for loc in memory})]
        if requests:
            self.ctx.service.call_many(requests)

    def make_room(self, peer: int, need: int) -> RoomMade:
        """Ask ``peer`` to open a hole of ``need`` bytes by demoting its unprotected copies."""
        reply = memoryview(self.ctx.service.call(peer, OP_MAKE_ROOM, _MAKE_ROOM_REQ.pack(need)))
        ok, count = reply[0], _U32.unpack_from(reply, 1)[0]
        pos, moves, drops = 5, [], []
        for _ in range(count):
            digest, pos = _read_digest(reply, pos)
            old = Location(*LOCATION.unpack_from(reply, pos))
            pos += LOCATION.size
            to_disk = reply[pos]
            pos += 1
            if to_disk:
                moves.append((digest, old, Location(peer, TIER_DISK, 0, old.nbytes, 0)))
            else:
                drops.append((digest, old))
        return RoomMade(bool(ok), moves, drops)

    # ------------------------------------------------------------------ serving (service thread)
    def _on_adopt(self, source: int, payload: memoryview) -> bytes:
        """Take the block if a hole is free now (never evict for a peer); answer where it lies."""
        arena, c = self.ctx.arena, self.ctx.counters
        digest, pos = _read_digest(payload, 0)
        nbytes, offset, generation, protected = _ADOPT_REQ.unpack_from(payload, pos)
        if digest in arena:
            return _ADOPT_REPLY.pack(_HAVE, 0, 0)
        copy = arena.allocate(digest, nbytes, protected=bool(protected), replica=False)
        if copy is None:
            return _ADOPT_REPLY.pack(_NO_ROOM, 0, 0)
        try:
            ok = remote_read(self.ctx.window, source, offset, nbytes, generation, digest16_of(digest), arena.view(copy))
        except BaseException:
            arena.abandon(copy)
            raise
        if not ok:
            arena.abandon(copy)
            return _ADOPT_REPLY.pack(_STALE, 0, 0)
        loc = arena.seal(copy)
        with arena.lock:
            c.host.bytes_written += nbytes
            c.bytes_received += nbytes
        return _ADOPT_REPLY.pack(_ADOPTED, loc.offset, loc.generation)

    def _on_free(self, source: int, payload: memoryview) -> bytes:
        digest, pos = _read_digest(payload, 0)
        self.ctx.arena.free(digest, _FREE_REQ.unpack_from(payload, pos)[0])
        return b""

    def _on_note_protect(self, source: int, payload: memoryview) -> bytes:
        digest, pos = _read_digest(payload, 0)
        self.ctx.arena.set_protected(digest, bool(payload[pos]))
        return b""

    def _on_make_room(self, source: int, payload: memoryview) -> bytes:
        """Demote our unprotected copies to disk (drop them without a disk tier) until a hole of the size
        asked for opens. Never calls another rank: the homes are told by the caller, from the moves."""
        arena, c = self.ctx.arena, self.ctx.counters
        need = _MAKE_ROOM_REQ.unpack_from(payload, 0)[0]
        moves: list[bytes] = []
        while arena.tier.largest_hole < need:
            victim = arena.pick_victim(protected=False)
            if victim is None:
                break
            loc = arena.location(victim)
            to_disk = False
            try:
                if self.disk is not None:
                    self.disk.write(victim.digest, arena.view(victim))
                    to_disk = True
            finally:  # a write that failed keeps the copy: its home still lists it here
                arena.release(victim, gone=to_disk or self.disk is None)
            with arena.lock:
                c.host.evictions += 1
                if to_disk:
                    c.demotions += 1
                else:
                    c.drops += 1
                    c.dropped_bytes += victim.nbytes
            moves.append(_digest_bytes(victim.digest) + loc.pack() + _U8.pack(to_disk))
        ok = arena.tier.largest_hole >= need
        return _U8.pack(ok) + _U32.pack(len(moves)) + b"".join(moves)


__all__ = ["OP_ADOPT", "OP_FREE", "OP_MAKE_ROOM", "OP_NOTE_PROTECT", "Adopted", "OwnerOps", "RoomMade"]
