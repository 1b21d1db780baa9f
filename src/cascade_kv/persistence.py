"""Persistence: the key journal and the directory a persistent store reopens.

A mixin of :class:`~cascade_kv.store.Store`, kept apart because recovering a
directory (locking it, replaying the journal, adopting block files) is its own
job with its own failure modes, separate from moving data between tiers.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from . import catalog
from .blocks import Block, Entry
from .errors import CapacityError, ConfigError, IntegrityError, StorageError
from .ids import block_name
from .tiers import DiskTier

log = logging.getLogger(__name__)


class Persistence:
    """Journal and recovery, on the state ``Store.__init__`` sets up."""

    def _journal_append(self, records: list[bytes]) -> None:
        if self._journal is not None:
            self._journal.append(records, sync=True)

    def _recover(self, root: Path) -> None:
        """Take the directory's lock, replay the journal, adopt block files, reload protected blocks."""
        root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(errno.EBUSY, f"{root} is in use by another persistent store "
                               f"(its LOCK file is held)", str(root)) from None
        except OSError as e:  # Lustre mounted without flock: nothing to lock with; say so and go on
            log.warning("cannot lock %s (%s); make sure no other store opens it", root, e.strerror)
        self._check_format(root)
        assert self._disk is not None
        disk = self._tiers[self._disk]
        assert isinstance(disk, DiskTier)
        disk.clean_tmp()
        self._journal = catalog.Journal(root / "journal.log")
        records = self._journal.load()
        missing = 0
        for key, r in records.items():
            b = self._blocks.get(r.block_id)
            if b is None:
                if disk.adopt(r.block_id) != r.nbytes:
                    missing += 1
                    continue
                b = self._blocks[r.block_id] = Block(r.block_id, r.nbytes, ready=True)
                self._add_copy(b, self._disk)
            e = Entry(r.block_id, r.dtype, r.shape, r.prefix)
            self._keys[key] = e
            self._attach(key, e, b)
        if missing:
            log.warning("%s: %d journalled keys had no intact block file and were dropped", root, missing)
        referenced = set(self._blocks)
        for bid in disk.scan():
            if bid not in referenced:
                disk.remove_untracked(bid)  # written by a put that crashed before its journal record
        self._c.tiers[self._disk].bytes_written = 0
        with self._lock:
            for b in [b for b in self._blocks.values() if b.protected]:
                if self._must_be_in_memory(True):
                    try:
                        self._bring_to_memory(b)
                    except (CapacityError, IntegrityError) as e:
                        log.warning("protected block %s not reloaded into memory: %s", block_name(b.id)[:16], e)
            self._c.promotions = 0

    def _check_format(self, root: Path) -> None:
        """A persistent directory records the digest its block files are named by. Reopening it with
        another ``hash_algorithm`` would fail every file's check and quarantine them all: refuse instead."""
        marker = root / "FORMAT"
        wanted = f"cascade-kv blocks v1 hash={self.config.hash_algorithm}\n"
        try:
            found = marker.read_text()
        except FileNotFoundError:
            try:
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(wanted)
                os.replace(tmp, marker)
            except OSError as e:
                raise StorageError(e.errno, f"cannot write {marker}: {e.strerror}", str(marker)) from e
            return
        if found != wanted:
            raise ConfigError(f"{root} holds blocks written as {found.strip()!r}; this store is configured "
                              f"for {wanted.strip()!r}: open it with the same hash_algorithm")

    def _release_dir_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
