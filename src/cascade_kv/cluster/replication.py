"""Local replicas of blocks this rank reads often from peers.

The reader counts, not the home (the issue's wording put access counts at the home): only the reader
knows it keeps paying for a remote read, and it decides alone, with no message. At
``replica_threshold`` reads served by peers it stores the bytes it just read in its arena and publishes
them. A replica displaces replicas and unprotected copies (which move down as any victim does), never
protected ones, and is the first victim itself (:meth:`.eviction.Eviction.allocate`).
"""
from __future__ import annotations

from ..ids import BlockId
from .context import RankContext
from .eviction import Eviction


class Replication:
    """Counts reads of each block served by peers and keeps a replica once they reach the threshold."""

    def __init__(self, ctx: RankContext, eviction: Eviction) -> None:
        self.ctx = ctx
        self.eviction = eviction
        self._remote_reads: dict[BlockId, int] = {}  # per digest: reads served by peers since the last replica

    def note_remote_read(self, digest: BlockId, data: memoryview, protected: int) -> None:
        """Count a read of ``digest`` a peer served (``data``: its bytes); at the threshold keep a replica."""
        if not self.ctx.config.locality_aware:
            return
        n = self._remote_reads.get(digest, 0) + 1
        if n < self.ctx.config.replica_threshold:
            self._remote_reads[digest] = n
            return
        self._remote_reads.pop(digest, None)
        c = self.eviction.place(digest, data, protected=protected > 0, replica=True)
        if c is None:
            return
        if self.eviction.publish_pinned(c):
            with self.ctx.arena.lock:
                self.ctx.counters.promotions += 1

    def forget(self, digest: BlockId) -> None:
        """The block was freed: its count starts again if the same bytes come back."""
        self._remote_reads.pop(digest, None)


__all__ = ["Replication"]
