"""The shared cold tier as the distributed store uses it: one content-addressed directory every rank sees.

Any rank may write, read or unlink any block's file, so this rank's index of the directory
(:class:`~cascade_kv.tiers.DiskTier`) can be stale: another rank deleted a file it had read. Every
decision therefore looks at the file itself, never at the index alone. A file of the right size that is
already there is adopted, not rewritten; its first read is hashed (``verify_reads``), so a bad or foreign
file is detected and never returned.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import CapacityError, IntegrityError
from ..ids import BlockId, block_name
from ..tiers import DiskTier
from .context import RankContext
from .directory import TIER_DISK, Location


class Vanished(Exception):
    """A block's shared file went while this rank was about to read it (freed by its last delete, or moved):
    not a loss; look the block up again."""


class SharedDisk:
    """This rank's access to the shared disk tier: write, read, free block files; counts into the rank's
    counters."""

    def __init__(self, ctx: RankContext, tier: DiskTier) -> None:
        self.ctx = ctx
        self.tier = tier
        self._lock = threading.Lock()  # this rank's threads (and its service thread) change the index one at a time

    def location(self, nbytes: int) -> Location:
        """Where a block written here lies: the one shared file per digest."""
        return Location(self.ctx.rank, TIER_DISK, 0, nbytes, 0)

    def exists(self, digest: BlockId) -> bool:
        return self.tier.path(digest).exists()

    def write(self, digest: BlockId, data: memoryview) -> bool:
        """Put the block in the shared disk tier: one content-addressed file. A file of the right size that
        is there already, written by any rank, is taken as it is (its first read here checks its digest).
        True when this call wrote the file."""
        disk = self.tier
        with self._lock:
            try:
                size = os.stat(disk.path(digest)).st_size
            except FileNotFoundError:
                size = None
            if size == data.nbytes:
                if not disk.contains(digest):
                    disk.adopt(digest)
                return False
            if disk.contains(digest):  # indexed here, but deleted or torn: forget it, then write it anew
                disk.free(digest)
            if not disk.allocate(digest, data.nbytes):
                raise CapacityError(f"disk tier full: {disk.used} B used of {disk.capacity} B")
            try:
                disk.write(digest, data)
            except BaseException:
                disk.free(digest)
                raise
        with self.ctx.arena.lock:
            self.ctx.counters.disk.bytes_written += data.nbytes
        return True

    def read(self, digest: BlockId, out: memoryview) -> None:
        """Read the block's shared file; :class:`Vanished` when another rank removed it meanwhile (the file
        may go between the directory's answer and the open: a delete on another rank unlinks it after its
        home let go of the digest), IntegrityError when it is damaged or gone while still listed."""
        disk, c = self.tier, self.ctx.counters
        with self._lock:
            if disk.contains(digest) and not disk.path(digest).exists():
                disk.untrack(digest)  # a stale entry of this rank's index: another rank deleted the file
            missing = not disk.contains(digest) and disk.adopt(digest) is None
        if missing:
            self._vanished(digest)
            raise IntegrityError(f"block {block_name(digest)[:16]}: its disk copy is listed but missing")
        try:
            disk.read_into(digest, out)
        except IntegrityError:
            np.asarray(out).fill(0)  # no bad byte stays in the caller's buffer
            quarantined = False
            if not disk.path(digest).exists():  # gone, not damaged
                with self._lock:
                    disk.untrack(digest)
                self._vanished(digest)  # ... or lost, if its home still lists it: an IntegrityError below
            else:
                with self._lock:
                    if disk.contains(digest):
                        quarantined = disk.quarantine(digest) is not None
            with self.ctx.arena.lock:
                c.integrity_errors += 1
                c.quarantined += quarantined
            raise
        with self.ctx.arena.lock:
            c.disk.hits += 1
            c.disk.bytes_read += out.nbytes
            c.host.misses += 1
            c.remote.misses += 1

    def _vanished(self, digest: BlockId) -> None:
        """A block's file is not there: :class:`Vanished` unless its home still lists it on disk (then it is
        lost, and the caller raises IntegrityError; asking again would find the same)."""
        if not any(loc.tier == TIER_DISK for loc in self.ctx.directory.locate(digest).locations):
            raise Vanished(digest)  # freed by its last delete, or moved: not a loss

    def free(self, digest: BlockId) -> None:
        """Remove the block's file (its last reference went): through the index if this rank knows the file."""
        if self.tier.contains(digest):
            self.tier.free(digest)
        else:
            self.tier.path(digest).unlink(missing_ok=True)

    def free_written(self, digest: BlockId) -> None:
        """Remove a file this rank has just written (its block was deleted meanwhile)."""
        with self._lock:
            self.tier.free(digest)

    def remove_known(self) -> None:
        """Remove the files this rank wrote or read (close without persist; removing twice is harmless)."""
        for bid in self.tier.block_ids():
            self.tier.free(bid)

    def close(self) -> None:
        self.tier.close()


__all__ = ["SharedDisk", "Vanished"]
