"""Persistence: the key journal and the directory a persistent store reopens.

A part of :class:`~cascade_kv.store.Store` (:class:`Persistence`), kept apart
because recovering a directory (locking it, replaying the journal, adopting
block files) is its own job with its own failure modes, separate from moving
data between tiers. The put, delete and protect paths append to the journal
through it; what the open found is its :class:`RecoveryReport`.

Opening runs in two phases. The *read* phase takes the lock, reads ``FORMAT``,
reads and parses the whole journal and examines every block file it names;
it writes nothing, so an open that fails there (a bad record we must not
guess past, a read-only disk, a config that does not match) leaves every file
exactly as it was. Only when all of that succeeded does the *commit* phase
write: ``FORMAT`` for a new directory, damaged block files into
``quarantine/``, orphans removed (or kept in ``quarantine/`` when the journal
was not read whole: they may belong to keys in the damaged part), ``tmp/``
emptied, and the journal compacted if there is room (never required: on a
full disk the old journal stays and appends follow it). What the open found
is :attr:`Store.recovery`.

A damaged journal record never lets an older record's state through: the key
it concerned is dropped (see :mod:`cascade_kv.catalog`), its block file then
is an orphan, kept in ``quarantine/`` like the others of a journal not read
whole, and the damaged journal itself is kept there before compaction.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import catalog
from .blocks import Block, Entry
from .context import StoreContext
from .errors import CapacityError, ConfigError, IntegrityError, InvalidArgumentType, StorageError
from .ids import BlockId, Key, block_name
from .placement import Placement
from .tiers import DiskTier

if TYPE_CHECKING:
    from .keys import KeyTable
from .tiers.disk import fsync_dir, lock_directory, make_dirs, write_atomically

log = logging.getLogger(__name__)

JOURNAL = "journal.log"


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening a persistent directory found and did (:attr:`Store.recovery`)."""

    journal_version: int
    """Format of the journal's first record: 3, 2 or 1 (older, rewritten as 3 when compacted), or 0 (none yet)."""
    records: int
    """Intact (or repaired) journal records replayed."""
    keys: int
    """Keys the store opened with."""
    damaged: tuple[tuple[int, int], ...]
    """(offset, length) of journal regions that failed their checks and were skipped; the records
    before and after them were replayed, less the keys the damage concerned (``journal_lost_keys``).
    Non-empty means the journal was not read whole."""
    torn_tail: int | None
    """Offset of an incomplete last record (a crash mid-append; never an acknowledged put), dropped."""
    lost_keys: tuple[Key, ...]
    """Journalled keys dropped because their block file was missing or damaged."""
    quarantined: tuple[str, ...]
    """Names of the files moved to ``quarantine/``: damaged block files, block files kept because the
    journal was not read whole, and a copy of the damaged journal."""
    orphans_removed: int
    """Block files no key referred to (written by a put that crashed before its record), deleted."""
    orphans_kept: int
    """Block files no key referred to, moved to ``quarantine/`` instead because the journal was not
    read whole (they may belong to keys in a damaged record)."""
    tmp_removed: int
    """Half-written files of interrupted writes removed from ``tmp/``."""
    compacted: bool
    """The journal was rewritten as one record per live key (``False``: no room; retried at close)."""
    journal_lost_keys: tuple[Key, ...] = ()
    """Keys dropped because a damaged journal record concerned them (a delete, an overwrite or a protect
    of theirs may be what was lost: their older records would serve a state that is no longer true), or
    because their last intact record precedes a region in ``unidentified``."""
    journal_lost_unnamed: int = 0
    """Damaged records whose key no intact record names (a new key's put, most likely): that key is absent."""
    unidentified: tuple[int, ...] = ()
    """Offsets of the damaged regions no key could be named for (damage across records, or in the payload of
    a record of the older format): every key live before one was dropped unless a later record decided it.
    Dropping rather than keeping them, because a cache can recompute a lost value but must not serve a stale
    one; rather than refusing to open, because the remedy left to an operator would lose every key."""
    repaired: tuple[int, ...] = ()
    """Offsets of journal records whose header was damaged but whose payload checked out: replayed as
    written. Nothing was lost, but the disk changed bytes: the journal is kept in ``quarantine/``."""

    @property
    def read_whole(self) -> bool:
        return not self.damaged

    @property
    def clean(self) -> bool:
        """Nothing was damaged, repaired, lost or quarantined (a torn tail and orphans are a crash's normal
        leftovers)."""
        return not (self.damaged or self.repaired or self.lost_keys or self.quarantined)


class Persistence:
    """The journal of a ``persist=True`` store (``journal`` is None without it) and the open that replays it."""

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        self.journal: catalog.Journal | None = None
        """Set by :meth:`open`; user mutations are appended here before they are committed."""
        self._lock_fd = -1

    def append(self, records: list[bytes]) -> None:
        """Append ``records`` durably (nothing without a journal)."""
        if self.journal is not None:
            self.journal.append(records, sync=True)

    def refuse_unpersistable(self, items: list[tuple[Key, object, bool]]) -> None:
        """TypeError, before anything changes, for a value whose dtype the journal cannot record exactly
        (a put that succeeded but could not be reloaded would lose the key at the next open)."""
        if self.journal is None:
            return
        for key, arr, _ in items:
            try:
                catalog.encode_dtype(arr.dtype)  # type: ignore[attr-defined]
            except TypeError as e:
                raise InvalidArgumentType(f"put({key!r}) with persist=True: {e}") from None

    def open(self, root: Path, table: KeyTable, placement: Placement) -> RecoveryReport:
        """Open the directory in two phases (see the module docstring) and reload protected blocks: the keys
        and blocks found go into ``table`` (and the context's tables), their copies through ``placement``."""
        ctx = self._ctx
        if ctx.disk is None or not isinstance(ctx.tiers[ctx.disk], DiskTier):
            raise ConfigError("persist=True needs a DiskTier among the store's tiers")
        disk: DiskTier = ctx.tiers[ctx.disk]
        blocks, keys = ctx.blocks, ctx.keys
        # -- read phase: nothing below writes a byte
        self._lock_fd = lock_directory(root, disk.file_mode)
        marker = root / "FORMAT"
        wanted = f"cascade-kv blocks v1 hash={ctx.config.hash_algorithm}\n"
        has_format = self._check_format(marker, wanted)
        journal = self.journal = catalog.Journal(root / JOURNAL, file_mode=disk.file_mode)
        replay = journal.read()
        journal.open()  # a read-only disk fails here
        lost: list[Key] = []
        damaged_files: set[BlockId] = set()
        for key, r in replay.state.items():
            b = blocks.get(r.block_id)
            if b is None and r.block_id not in damaged_files:
                size = disk.adopt(r.block_id, r.nbytes)
                if size == r.nbytes:
                    b = blocks[r.block_id] = Block(r.block_id, r.nbytes, ready=True, space=ctx.space_of(key))
                    placement.add_copy(b, ctx.disk)
                elif size is not None:
                    damaged_files.add(r.block_id)  # truncated, grown, not a file, or unreadable
            if b is None or b.nbytes != r.nbytes:
                lost.append(key)
                continue
            e = Entry(r.block_id, r.dtype, r.shape, r.prefix)
            keys[key] = e
            table.attach(key, e, b)
        orphans = [bid for bid in disk.scan() if bid not in blocks and bid not in damaged_files]
        # -- commit phase: everything was read; from here on the open only tidies, best effort
        if not has_format:
            self._write_format(marker, wanted, disk.file_mode)
        quarantined: list[str] = []
        for bid in sorted(damaged_files):
            if (dst := disk.quarantine_untracked(bid)) is not None:
                quarantined.append(dst.name)
        kept = removed = 0
        if (replay.damaged or replay.repaired) and (dst := self._keep_damaged_journal(root, disk)) is not None:
            quarantined.append(dst.name)
        if replay.damaged:
            for bid in orphans:  # they may belong to the keys of a damaged record: never delete them
                if (dst := disk.quarantine_untracked(bid)) is not None:
                    quarantined.append(dst.name)
                    kept += 1
        else:
            for bid in orphans:
                disk.remove_untracked(bid)  # written by a put that crashed before its journal record
                removed += 1
        tmp_removed = disk.clean_tmp()
        for leftover in journal.leftovers():
            try:
                leftover.unlink()
            except OSError as e:
                log.warning("cannot remove %s: %s", leftover, e.strerror)
        compacted = self._compact_at_open(journal, replay)
        for c in (ctx.counters, ctx.default.counters):  # files no key accounts for: the store's own
            c.quarantined += len(quarantined)
        for c in [ctx.counters, ctx.default.counters] + [s.counters for s in ctx.spaces.values()]:
            c.tiers[ctx.disk].bytes_written = 0
        report = RecoveryReport(
            journal_version=replay.version, records=replay.records, keys=len(keys), damaged=replay.damaged,
            torn_tail=replay.torn_at, lost_keys=tuple(lost), quarantined=tuple(quarantined),
            orphans_removed=removed, orphans_kept=kept, tmp_removed=tmp_removed, compacted=compacted,
            journal_lost_keys=replay.lost, journal_lost_unnamed=replay.lost_unnamed,
            unidentified=replay.unidentified, repaired=replay.repaired)
        if not report.clean:
            log.warning("%s: recovery: %d journal region(s) damaged %s (%d naming no key: %s), %d repaired %s; "
                        "%d key(s) dropped for journal damage (+%d unnamed), %d for damaged block files; "
                        "%d file(s) quarantined (%d unaccounted block files kept); %d keys recovered", root,
                        len(replay.damaged), [off for off, _ in replay.damaged], len(replay.unidentified),
                        list(replay.unidentified), len(replay.repaired), list(replay.repaired), len(replay.lost),
                        replay.lost_unnamed, len(lost), len(quarantined), kept, len(keys))
        with ctx.lock:
            for b in [b for b in blocks.values() if b.protected]:
                if ctx.must_be_in_memory(True):
                    try:
                        placement.bring_to_memory(b)
                    except (CapacityError, IntegrityError, StorageError) as e:  # served from disk meanwhile
                        log.warning("protected block %s not reloaded into memory: %s", block_name(b.id)[:16], e)
            for c in [ctx.counters, ctx.default.counters] + [s.counters for s in ctx.spaces.values()]:
                c.promotions = 0
        return report

    def _check_format(self, marker: Path, wanted: str) -> bool:
        """A persistent directory records the digest its block files are named by. Reopening it with
        another ``hash_algorithm`` would fail every file's check and quarantine them all: refuse instead.
        Whether the marker exists (it is written in the commit phase)."""
        try:
            found = marker.read_text()
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError) as e:
            raise StorageError(getattr(e, "errno", None) or errno.EIO, f"cannot read {marker}: {e}", str(marker)) from e
        if found != wanted:
            raise ConfigError(f"{marker.parent} holds blocks written as {found.strip()!r}; this store is configured "
                              f"for {wanted.strip()!r}: open it with the same hash_algorithm")
        return True

    @staticmethod
    def _write_format(marker: Path, wanted: str, mode: int) -> None:
        try:
            write_atomically(marker.parent, marker.name, wanted.encode(), mode)
        except OSError as e:
            raise StorageError(e.errno, f"cannot write {marker}: {e.strerror}", str(marker)) from e

    def _keep_damaged_journal(self, root: Path, disk: DiskTier) -> Path | None:
        """Hard-link the damaged journal into ``quarantine/`` (no data copied: works on a full disk), so
        that compaction does not erase what someone will want to inspect."""
        dst = root / "quarantine" / f"{JOURNAL}.{time.time_ns()}"
        try:
            make_dirs(dst.parent, disk.dir_mode)
            os.link(root / JOURNAL, dst)
            fsync_dir(dst.parent)
        except OSError as e:
            log.warning("cannot keep a copy of the damaged journal in %s: %s", dst.parent, e.strerror)
            return None
        return dst

    def _live_records(self) -> Iterator[catalog.KeyRecord]:
        """One record per live key: a compacted journal."""
        blocks = self._ctx.blocks
        return (catalog.KeyRecord(k, e.block_id, blocks[e.block_id].nbytes, e.dtype, e.shape, e.prefix)
                for k, e in self._ctx.keys.items())

    def _compact_at_open(self, journal: catalog.Journal, replay: catalog.Replay) -> bool:
        """Rewrite the journal from the keys just opened, if there is room. Optional: without room the
        old journal stays (a torn tail is cut off, which needs no room) and compaction is retried at close."""
        try:
            journal.compact(self._live_records())
            return True
        except StorageError as e:
            log.warning("journal not compacted at open (retried at close): %s", e)
        journal.create()  # a new directory on a full disk still gets an (empty) journal
        if replay.torn_at is not None:
            try:
                journal.truncate(replay.torn_at)
            except StorageError as e:  # appends then follow the garbage: replay resynchronises past it
                log.warning("torn journal tail not cut off: %s", e)
        return False

    def close_journal(self, compact: bool) -> None:
        """At close: compact the journal if ``compact`` (only a store that finished opening knows every key),
        then close it."""
        if self.journal is None:
            return
        try:  # a long-lived store's journal holds every change since it opened: keep only live keys
            if compact:
                self.journal.compact(self._live_records())
        except StorageError as e:  # the old journal is intact (compaction writes aside, then renames)
            log.warning("journal not compacted at close: %s", e)
        self.journal.close()

    def release_dir_lock(self) -> None:
        """Last at close (after the tiers), and when an open fails: another process may open the directory."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
