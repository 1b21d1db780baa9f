"""Durability of the distributed store (``persist=True``): the write-ahead rule and the part the store holds.

**Acknowledged means durable.** A put writes each new block file (fsync, rename, directory fsync)
before it binds (:class:`~.writes.Writes`); the key's home appends the record and fsyncs it *before* the
change takes effect and before it answers (:class:`JournalledState`); a delete is journalled before the
block's last reference goes, so a file is never unlinked while a durable record still names it. A crash
can tear only the unanswered last record.

One job per module: the files and their format are :mod:`.journals`'s, what they mean at open (the
collective recovery under any rank count) is :mod:`.recovery`'s; this module is what a running store does
with them (:class:`Durability`). Their public names are re-exported here, so a caller (tests, tools)
names one module for persistence.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .. import catalog
from ..config import CascadeConfig
from ..errors import BlockNotFound, CapacityError, ConfigError, IntegrityError, PeerTimeout, StorageError
from ..ids import BlockId, Key
from ..tiers.disk import DiskTier
from .directory.records import TIER_DISK, KeyRecord, Location
from .directory.state import DirectoryState
from .journals import (Manifest, epoch_dir, format_line, journal_path, journal_record, read_epoch, read_manifest,
                       write_manifest)
from .recovery import (DigestRefs, Recovery, damaged_blocks, digest_refs, open_directory, release_lock,
                       remove_orphans, share)

if TYPE_CHECKING:  # the client imports mpi4py.MPI, which starts MPI: recovery is unit-tested without it
    from .directory.rpc import Directory

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the journalled directory share
class JournalledState(DirectoryState):
    """A home's directory share whose key changes are journalled, and fsynced, before they take effect.

    Journal order is apply order (one lock across both), so the next job replays what this one served.
    That lock is not the state's: lookups and digest operations never wait on an fsync. A failed append
    raises before anything changed, so the caller's put or delete fails as a whole."""

    def __init__(self, journal: catalog.Journal, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.journal = journal
        self._order = threading.Lock()

    def restore(self, recovery: Recovery, rank: int) -> None:
        """Load the share :func:`open_directory` recovered: keys, and digests listed on disk only."""
        self.restore_entries(recovery.keys, ((d, c.nbytes, c.refs, c.protected,
                                              [Location(rank, TIER_DISK, 0, c.nbytes, 0)])
                                             for d, c in recovery.digests.items()))

    def bind(self, key: Key, record: KeyRecord) -> KeyRecord | None:
        with self._order:
            self.journal.append([catalog.put_record(journal_record(key, record))], sync=True)
            return super().bind(key, record)

    def unbind(self, key: Key) -> KeyRecord | None:
        with self._order:
            if self.lookup(key) is None:
                return None
            self.journal.append([catalog.delete_record(key)], sync=True)
            return super().unbind(key)

    def set_prefix(self, key: Key, prefix: bool, digest: bytes | None = None) -> KeyRecord | None:
        with self._order:
            old = self.lookup(key)
            if old is not None and old.prefix != prefix and (digest is None or old.digest == digest):
                self.journal.append([catalog.protect_record(key, prefix)], sync=True)
            return super().set_prefix(key, prefix, digest)


# ------------------------------------------------------------------ the store's side
class Durability:
    """What :class:`~.store.DistributedStore` does differently with ``persist=True``: recover the directory
    at open (:meth:`open`), serve the journalled share (:attr:`state`), reload protected blocks, release the
    LOCK at close. Writing every new block durably before its key is bound is the write path's
    (:class:`~.writes.Writes`, ``durable_disk``). A part the store holds, not a mixin: it reads none of the
    store's fields."""

    def __init__(self, recovery: Recovery | None = None, state: JournalledState | None = None) -> None:
        self.recovery = recovery
        """What open recovered (None without persist)."""
        self.state = state
        """The directory share this rank serves, its journal open (None without persist: a plain one)."""

    @classmethod
    def open(cls, comm: object, rank: int, size: int, config: CascadeConfig, disk: DiskTier | None) -> Durability:
        """Collective: recover the shared directory (without persist, nothing to do)."""
        if not config.persist:
            return cls()
        if disk is None:  # the same config on every rank: every rank raises here, before any collective
            raise ConfigError("persist=True needs the shared disk tier (disk_path) to recover the directory from")
        recovery = open_directory(comm, rank, size, disk, config.hash_algorithm, file_mode=disk.file_mode,
                                  dir_mode=disk.dir_mode)
        state = JournalledState(recovery.journal)
        state.restore(recovery, rank)
        return cls(recovery, state)

    @property
    def enabled(self) -> bool:
        return self.recovery is not None

    def reload_protected(self, comm: object, rank: int, read_blocks: Callable[[list[BlockId], list[memoryview]], None],
                         directory: Directory) -> None:
        """Collective: protected keys come back protected. Each digest home loads the protected blocks it
        homes into cluster memory (a load under lease, as any read from disk: ``read_blocks``). One that does
        not fit stays on disk, and one whose file fails its digest check is quarantined (its keys then read
        as missing): both are logged and counted, never a failed open."""
        if self.recovery is None:
            return
        protected = [(d, c.nbytes) for d, c in self.recovery.digests.items() if c.protected > 0]
        failed = on_disk = 0
        for digest, nbytes in protected:
            out = np.empty(nbytes, np.uint8)
            try:
                read_blocks([digest], [memoryview(out)])
            except (BlockNotFound, CapacityError, IntegrityError, StorageError, PeerTimeout) as e:
                failed += 1
                log.warning("rank %d: protected block %s not reloaded: %s", rank, digest[:8].hex(), e)
                continue
            if not directory.locate(digest).memory:
                on_disk += 1
        self.recovery.protected_not_reloaded = failed + on_disk
        if on_disk:
            log.warning("rank %d: %d protected block(s) stay on disk: no room in cluster memory", rank, on_disk)
        comm.Barrier()  # open returns with every rank's protected blocks where they belong

    def close(self) -> None:
        """Close the journal and release the LOCK (the block files and the journals stay)."""
        if self.recovery is not None:
            self.recovery.journal.close()
            release_lock(self.recovery)


__all__ = ["DigestRefs", "Durability", "JournalledState", "Manifest", "Recovery", "damaged_blocks", "digest_refs",
           "epoch_dir", "format_line", "journal_path", "open_directory", "read_epoch", "read_manifest",
           "release_lock", "remove_orphans", "share", "write_manifest"]
