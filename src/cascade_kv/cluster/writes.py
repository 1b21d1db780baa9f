"""The write path: put (claims, storing new blocks, bind), delete, protect/unprotect, demote, and giving
back references.

A put hashes locally, ``claim``s each distinct block at its digest home (a dedup hit moves no bytes),
stores granted blocks in this rank's arena (:mod:`.eviction` makes room) or, unprotected and with no
room, on the shared disk, ``publish``es where they lie (a new copy stays pinned until then), then
``bind``s the keys at their homes and gives back the references the old records held. The put returns
after ``bind``: any rank's later get finds the key, no barrier. ``docs/distributed-design.md`` has the
protocol, including why protection changes take a reference of the new kind before the flag flips.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

import numpy as np

from ..arrays import byte_view
from ..config import format_size
from ..errors import BlockNotFound, CapacityError, ConfigError, InvalidArgument, PeerTimeout
from ..hashing import Hasher
from ..ids import BlockId, Key, StoreKey
from ..namespace import Space
from .arena import Copy
from .context import RankContext
from .diskio import SharedDisk
from .directory import TIER_DISK, TIER_MEMORY, Claim, ClaimStatus, CopyStatus, KeyRecord, Location, Released, dtype_text
from .eviction import Eviction
from .handlers import OwnerOps
from .reads import MAX_RETRY_SLEEP_S, RETRY_SLEEP_S, Reads, nbytes_of
from .replication import Replication
from .service import RemoteError
from .slots import SLOT_HEADER


class Writes:
    """Every change to keys and references this rank makes."""

    def __init__(self, ctx: RankContext, disk: SharedDisk | None, eviction: Eviction, owners: OwnerOps,
                 reads: Reads, replication: Replication, hasher: Hasher, *, persist: bool) -> None:
        self.ctx = ctx
        self.disk = disk
        self.eviction = eviction
        self.owners = owners
        self.reads = reads
        self.replication = replication
        if persist and disk is None:
            raise ConfigError("persist=True needs the shared disk tier (disk_path) to keep every block's file in")
        self.durable_disk = disk if persist else None
        """``persist=True``: the disk where every block's file is written durably before any key names it."""
        self._hasher = hasher
        self._serial = itertools.count(time.time_ns())

    # ------------------------------------------------------------------ put
    def put_many(self, space: Space, items: Sequence[tuple[Key, np.ndarray, bool]]) -> None:
        """Store ``(key, array, is_prefix)`` items (checked: ``arrays.put_items``); all or nothing."""
        items = [(space.internal(k), a, p) for k, a, p in items]
        ctx, arena, directory = self.ctx, self.ctx.arena, self.ctx.directory
        # the directory records every dtype exactly, or refuses it here (InvalidArgumentType), before any message
        dtypes = [dtype_text(a.dtype) for _, a, _ in items]
        ids = [self.block_id(byte_view(a), space) for _, a, _ in items]  # hashing: no lock, no message
        self.check_quota(space, items, ids)
        first: dict[BlockId, int] = {}  # one claim per distinct block first: a second would wait on our own grant
        for i, bid in enumerate(ids):
            first.setdefault(bid, i)
        claimed: list[tuple[BlockId, bool]] = []  # references taken, to give back if the put fails
        pinned: list[Copy] = []  # copies stored by this put, pinned until the directory lists them
        hits = 0
        try:
            lead = list(first.values())
            claims = directory.claim_settled_many([(ids[i], items[i][1].nbytes, items[i][2]) for i in lead])
            claimed += [(ids[i], items[i][2]) for i in lead]
            self._check_protected_room(items, lead, claims)
            published = []
            for i, claim in zip(lead, claims):
                published += self._settle_claim(ids[i], items[i][1], items[i][2], claim, pinned)
            directory.publish_many(published)
            for c in pinned:
                arena.unpin(c)
            pinned.clear()
            hits = sum(c.status is ClaimStatus.EXISTS for c in claims)
            rest = [i for i in range(len(items)) if first[ids[i]] != i]
            if rest:  # duplicates within the batch: their block is published now, so these are hits
                more = directory.claim_settled_many([(ids[i], items[i][1].nbytes, items[i][2]) for i in rest])
                claimed += [(ids[i], items[i][2]) for i in rest]
                hits += len(rest)
                for i, claim in zip(rest, more):
                    directory.publish_many(self._settle_claim(ids[i], items[i][1], items[i][2], claim, pinned))
                    for c in pinned:
                        arena.unpin(c)
                    pinned.clear()
            records = [(k, KeyRecord(bid, dt, a.shape, p)) for (k, a, p), bid, dt in zip(items, ids, dtypes)]
            old = directory.bind_many(records)
        except BaseException:
            for c in pinned:
                arena.abandon(c)
            if claimed:
                self.release_refs(claimed)
            raise
        self.release_refs([(r.digest, r.prefix) for r in old if r is not None])
        saved = sum(items[i][1].nbytes for i, c in zip(lead, claims) if c.status is ClaimStatus.EXISTS) + sum(
            items[i][1].nbytes for i in rest)
        with arena.lock:
            for c in (ctx.counters, space.counters):  # a hit is only ever on this namespace's own block
                c.puts += len(items)
                c.dedup_hits += hits
                c.dedup_bytes_saved += saved

    def block_id(self, data: memoryview, space: Space) -> BlockId:
        """As :meth:`Store._block_ids` (one block): the digest, then a named namespace's tag (equal bytes in two
        namespaces are two blocks: separate claims, never a dedup hit), then with dedup off the rank and a
        serial. The tag stays before the serial so the directory can tell a block's namespace
        (:func:`.directory.space_tag`)."""
        digest = self._hasher.digest(data) + space.tag
        if self.ctx.config.dedup_enabled:
            return BlockId(digest)
        return BlockId(digest + self.ctx.rank.to_bytes(4, "big") + next(self._serial).to_bytes(8, "big"))

    def check_quota(self, space: Space, items: list[tuple[StoreKey, np.ndarray, bool]], ids: list[BlockId]) -> None:
        """CapacityError, before any claim, when the namespace's protected bytes (summed over every home) plus
        the batch's protected blocks not protected yet would pass its quota. Conservative: a prefix key the
        batch overwrites is not counted as released."""
        quota = space.protected_quota
        if quota is None or not any(p for _, _, p in items):
            return
        new = {bid: a.nbytes for (_, a, p), bid in zip(items, ids) if p}
        located = self.ctx.directory.locate_many(list(new))
        need = sum(n for (bid, n), where in zip(new.items(), located) if where.protected == 0)
        used = self.ctx.directory.protected_bytes(space.tag)
        if need and used + need > quota:
            raise CapacityError(f"namespace {space.name!r}: protected_quota is {quota} B, {used} B are protected "
                                f"and this call needs {need} B more; nothing was changed")

    def _check_protected_room(self, items: list[tuple[StoreKey, np.ndarray, bool]],
                              lead: list[int], claims: list[Claim]) -> None:
        """Before any byte moves: the protected blocks this put must bring into memory fit in cluster memory
        (free holes plus evictable bytes on every rank), else CapacityError."""
        ctx, arena = self.ctx, self.ctx.arena
        need = 0
        for i, claim in zip(lead, claims):
            _, arr, prefix = items[i]
            if not prefix or not ctx.config.semantic_eviction:
                continue
            in_memory = any(loc.tier == TIER_MEMORY for loc in claim.locations)
            if claim.status is ClaimStatus.GRANTED or not in_memory:
                if not arena.fits(arr.nbytes) and not any(cap >= arr.nbytes + 2 * SLOT_HEADER
                                                          for cap in ctx.window.capacities):
                    raise CapacityError(f"put: protected block of {format_size(arr.nbytes)} is larger than any "
                                        f"rank's memory ({format_size(arena.capacity)} here)")
                need += arr.nbytes + SLOT_HEADER
        if not need:
            return
        rooms = ctx.window.rooms()
        room = sum(hole + evictable for hole, evictable in rooms)
        if need > room:
            raise CapacityError(f"put: {need} B of protected blocks need room in cluster memory, which has "
                                f"{sum(h for h, _ in rooms)} B free and {sum(e for _, e in rooms)} B evictable over "
                                f"{ctx.size} rank(s) (the rest is protected)")

    def _settle_claim(self, digest: BlockId, arr: np.ndarray, prefix: bool, claim: Claim,
                      pinned: list[Copy]) -> list[tuple[BlockId, Location]]:
        """Act on the home's answer for one block of a put; the copies to publish (their slots, if in this
        rank's memory, are appended to ``pinned`` for the caller to unpin once published)."""
        data = byte_view(arr)
        durable = []  # persist: the block's file is durable before any key names it
        disk = self.durable_disk
        if disk is not None and (claim.status is ClaimStatus.GRANTED
                                 or not any(loc.tier == TIER_DISK for loc in claim.locations)):
            disk.write(digest, data)
            durable = [(digest, disk.location(data.nbytes))]
        if claim.status is ClaimStatus.GRANTED:
            return durable + [(digest, self._store_new(digest, data, prefix, pinned))]
        in_memory = [loc for loc in claim.locations if loc.tier == TIER_MEMORY]
        if prefix and claim.protected == 1 and self.ctx.config.semantic_eviction:
            if not in_memory:  # a dedup hit on a disk-only block that must now stay in memory: from our bytes
                c = self.eviction.place(digest, data, protected=True)
                if c is None:
                    raise self.eviction.no_room("put", data.nbytes)
                pinned.append(c)
                return durable + [(digest, self.ctx.arena.location(c))]
            self.owners.note_protect(digest, in_memory, True)
        return durable

    def _store_new(self, digest: BlockId, data: memoryview, prefix: bool, pinned: list[Copy]) -> Location:
        """Store a granted block: local memory (making room), else (unprotected) the shared disk."""
        c = self.eviction.place(digest, data, protected=prefix)
        if c is not None:
            pinned.append(c)
            return self.ctx.arena.location(c)
        if prefix and self.ctx.config.semantic_eviction:
            raise self.eviction.no_room("put", data.nbytes)
        if self.disk is None:
            raise CapacityError(f"put: a block of {format_size(data.nbytes)} fits neither this rank's memory "
                                f"({format_size(self.ctx.arena.capacity)}) nor a disk tier (none configured)")
        self.disk.write(digest, data)
        return self.disk.location(data.nbytes)

    # ------------------------------------------------------------------ delete and references
    def delete_many(self, space: Space, keys: list[StoreKey]) -> None:
        """Remove the (distinct, namespaced) keys; all must exist, otherwise nothing is removed."""
        directory = self.ctx.directory
        for k, r in zip(keys, directory.lookup_many(keys)):
            if r is None:
                raise BlockNotFound(f"key {k!r} is not in the store")
        old = directory.unbind_many(keys)
        self.release_refs([(r.digest, r.prefix) for r in old if r is not None])
        with self.ctx.arena.lock:
            self.ctx.counters.deletes += len(keys)
            space.counters.deletes += len(keys)

    def release_refs(self, items: Sequence[tuple[BlockId, bool]]) -> None:
        """Give back references (a delete, an overwritten key, a failed put): free the blocks whose last
        reference went, tell owners about protection that ended."""
        if not items:
            return
        directory = self.ctx.directory
        released: list[Released] = directory.unref_many(items)
        freed = [(d, r) for (d, _), r in zip(items, released) if r.freed]
        for (digest, _), r in zip(items, released):
            if r.unprotected:
                self.owners.note_protect(digest, [loc for loc in r.locations if loc.tier == TIER_MEMORY], False)
        if not freed:
            return
        for digest, r in freed:
            self._free_copies(digest, r.locations)
            self.replication.forget(digest)
        directory.forget_many([d for d, _ in freed])

    def _free_copies(self, digest: BlockId, locations: Iterable[Location]) -> None:
        locations = list(locations)
        if any(loc.tier == TIER_DISK for loc in locations) and self.disk is not None:
            self.disk.free(digest)
        self.owners.free(digest, [loc for loc in locations if loc.tier == TIER_MEMORY])

    # ------------------------------------------------------------------ protection
    def set_prefix(self, space: Space, key: Key, prefix: bool) -> None:
        """Turn ``key``'s reference into a prefix reference or back. The flag lives at the key's home and
        the count at the digest's home, so they cannot change together; a put or delete of the key in
        between gives back a reference of the kind the flag says. So the count may run ahead of the flags,
        never behind: a claim at the digest home first takes a reference of the kind the key will hold
        (which also keeps the block from being freed meanwhile), then the flag flips only if the key still
        names that digest, then the reference of the kind the key held before goes. A key that changed
        in between gives back the claim and is looked up again. (Flipping the flag first, as before, let
        an overwrite give back a prefix reference the count did not hold yet.)"""
        ctx, directory = self.ctx, self.ctx.directory
        key = space.internal(key)
        deadline = time.monotonic() + ctx.timeout
        pause = RETRY_SLEEP_S
        while True:
            record = self.reads.records([key])[0]
            if record.prefix == prefix:
                return
            if prefix:
                self.check_quota(space, [(key, np.empty(nbytes_of(record), np.uint8), True)], [record.digest])
            # EXISTS, or GRANTED for a block with no copy left (dropped; or freed, and the key changed): our
            # release below gives such a grant back. PENDING: being freed or stored, so the key is changing.
            claim = directory.claim(record.digest, nbytes_of(record), prefix)
            if claim.status is ClaimStatus.PENDING:
                if time.monotonic() >= deadline:
                    raise PeerTimeout(f"rank {ctx.rank}: {'protect' if prefix else 'unprotect'}({key!r}) found "
                                      f"its block held by rank {claim.pending_rank} for {ctx.timeout:g} s")
                time.sleep(pause)
                pause = min(2 * pause, MAX_RETRY_SLEEP_S)
                continue
            old = directory.set_prefix(key, prefix, record.digest)
            if old is None or old.digest != record.digest or old.prefix == prefix:
                self.release_refs([(record.digest, prefix)])  # the key changed under us: ours is surplus
                if old is None:
                    raise BlockNotFound(f"key {key!r} is not in the store")
                if old.digest == record.digest:
                    return  # another caller flipped it the same way
                continue
            if prefix and claim.protected == 1 and ctx.config.semantic_eviction:
                try:
                    memory = [loc for loc in claim.locations if loc.tier == TIER_MEMORY]
                    if memory:
                        self.owners.note_protect(record.digest, memory, True)
                    else:
                        self._bring_to_memory(old)
                except BaseException:
                    undone = directory.set_prefix(key, False, record.digest)
                    flipped_back = undone is not None and undone.digest == record.digest and undone.prefix
                    self.release_refs([(record.digest, flipped_back)])
                    raise
            # the key holds a reference of the new kind now: the one of the old kind is surplus (its release
            # tells the owners when the last prefix reference went)
            self.release_refs([(record.digest, not prefix)])
            return

    def _bring_to_memory(self, record: KeyRecord) -> None:
        """A block that just became protected lives on disk only: load it into this rank's memory."""
        data = np.empty(nbytes_of(record), np.uint8)
        self.reads.read_blocks([record.digest], [memoryview(data)])
        if self.ctx.directory.locate(record.digest).memory:
            return  # the read above loaded it under a lease (and keeps it protected once told)
        rooms = self.ctx.window.rooms()
        if data.nbytes + SLOT_HEADER > sum(h + e for h, e in rooms):
            raise CapacityError(f"protect: no room in cluster memory for a block of {format_size(data.nbytes)}")
        c = self.eviction.place(record.digest, memoryview(data), protected=True)
        if c is None:
            raise self.eviction.no_room("protect", data.nbytes)
        self.eviction.publish_pinned(c)

    def demote(self, keys: list[Key]) -> None:
        """Move the blocks of (distinct) ``keys`` out of cluster memory into the shared disk tier."""
        if self.disk is None:
            raise ConfigError("demote: the store has no disk tier (set disk_path)")
        directory = self.ctx.directory
        records = self.reads.records(keys)
        for k, r in zip(keys, records):
            if r.prefix:
                raise InvalidArgument(f"demote: key {k!r} is protected (is_prefix); unprotect it first")
        blocks = {r.digest: k for k, r in zip(keys, records)}
        located = directory.locate_many(list(blocks))
        for (digest, k), where in zip(blocks.items(), located):
            if where.protected and self.ctx.config.semantic_eviction:
                raise InvalidArgument(f"demote: the block of {k!r} is protected by another key")
        outs = [np.empty(nbytes_of(r), np.uint8) for r in {r.digest: r for r in records}.values()]
        self.reads.read_blocks(list(blocks), [memoryview(o) for o in outs])
        for digest, data in zip(blocks, outs):
            located = directory.locate(digest)
            if located.disk is None:
                wrote = self.disk.write(digest, memoryview(data))
                try:
                    directory.publish(digest, self.disk.location(data.nbytes))
                except RemoteError as e:  # deleted meanwhile: nothing to demote, and the file must not stay
                    if e.remote_type != "BlockNotFound":
                        raise
                    if wrote:
                        self.disk.free_written(digest)
                    continue
            for loc in located.memory:
                status, _ = directory.drop_copy(digest, loc)
                if status is not CopyStatus.LAST:
                    self._free_copies(digest, [loc])


__all__ = ["Writes"]
