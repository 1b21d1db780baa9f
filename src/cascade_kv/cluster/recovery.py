"""Recovery at open: the collective step that turns the journals of the last epoch into this job's directory
shares, under any rank count (the files are :mod:`.journals`'s).

**Open (collective)** -- every rank reads the manifest and *every* journal of its epoch (records are
small next to blocks), so each one computes, with no message, the keys it homes under the new rank
count and the references and protection of the digests it homes. Digest homes check their block
files (size, regular file); keys whose block is gone are dropped and counted. Then each rank writes
its share compacted as the journal of epoch E+1 (fsync), rank 0 replaces the manifest (temp file,
fsync, rename, directory fsync), and only then are the old epoch and orphan block files removed. A
crash before the switch leaves the old manifest (the half-written epoch is ignored, removed next
time); after it, the new epoch is complete. Every check that can fail runs before anything is
written, and ranks agree on failure with one allgather, so a failed open leaves the directory as it
was (apart from the LOCK file) and no rank waits in a collective another one skipped.

Orphans (block files no record names: puts that died before their bind) are removed only when every
journal read whole (a torn last record is what a kill leaves, and counts as whole); a journal with a
damaged region keeps them (counted): records it lost may have named them. A damaged record never lets an
older record of its key through (the catalog drops the key its header names, see :mod:`cascade_kv.catalog`):
a lost delete or overwrite costs that key, it does not bring back its old block.

``comm`` here is anything with ``allgather``, ``bcast`` and ``Barrier`` (mpi4py's lower-case calls),
so the protocol is unit-tested without MPI.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import catalog
from ..errors import ConfigError, StorageError
from ..ids import BlockId, Key, parse_block_name
from ..tiers.disk import DiskTier, lock_directory, make_dirs, unlink_quietly
from .directory.records import KeyRecord
from .homes import home_of_digest, home_of_key
from .journals import (JOURNAL_DIR, MANIFEST_NAME, Manifest, check_format, directory_record, epoch_dir, epochs,
                       journal_path, read_epoch, read_manifest, write_format, write_manifest)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DigestRefs:
    """What a digest's home must know of a recovered block."""

    nbytes: int
    refs: int
    """Keys naming the block."""
    protected: int
    """Prefix keys among them."""


@dataclass(slots=True)
class Recovery:
    """The outcome of :func:`open_directory` on one rank."""

    manifest: Manifest
    journal: catalog.Journal
    """This rank's journal of the new epoch, open for appends."""
    keys: dict[Key, KeyRecord] = field(repr=False)
    """The keys this rank homes, as the directory holds them."""
    digests: dict[BlockId, DigestRefs] = field(repr=False)
    """The digests this rank homes."""
    lock_fd: int = -1
    """Rank 0: the descriptor holding the directory's LOCK (-1 elsewhere, or where flock is unavailable)."""
    recovered_keys: int = 0
    """Keys found, over every rank (each rank sees them all)."""
    lost_keys: int = 0
    """Journalled keys dropped because their block file was missing or damaged (over every rank)."""
    damaged: list[str] = field(default_factory=list)
    """Journals with a damaged region (skipped records; not a torn tail, which a crash leaves)."""
    journal_lost_keys: int = 0
    """Keys dropped because a damaged journal record concerned them, or preceded them with no key to name
    (over every rank; counted apart from ``lost_keys``, and not in ``recovered_keys``)."""
    orphans_removed: int = 0
    """Block files no key named, removed by this rank."""
    orphans_kept: int = 0
    """Block files no key named, kept because a journal did not read whole (this rank's share)."""
    protected_not_reloaded: int = 0
    """Protected blocks this rank homes that open could not bring into memory (no room, or damaged)."""


# ------------------------------------------------------------------ what the journals say (pure)
def digest_refs(records: Iterable[catalog.KeyRecord]) -> dict[BlockId, DigestRefs]:
    """References and prefix references per block, counted over ``records``."""
    counts: dict[BlockId, list[int]] = {}
    for r in records:
        c = counts.setdefault(r.block_id, [r.nbytes, 0, 0])
        c[1] += 1
        c[2] += r.prefix
    return {d: DigestRefs(*c) for d, c in counts.items()}


def share(records: Mapping[Key, catalog.KeyRecord], rank: int, size: int
          ) -> tuple[dict[Key, catalog.KeyRecord], dict[BlockId, DigestRefs]]:
    """The keys ``rank`` homes among ``size`` ranks, and the digests it homes (counted over every key)."""
    keys = {k: r for k, r in records.items() if home_of_key(k, size) == rank}
    digests = {d: c for d, c in digest_refs(records.values()).items() if home_of_digest(d, size) == rank}
    return keys, digests


def damaged_blocks(disk: DiskTier, digests: Mapping[BlockId, DigestRefs]) -> set[BlockId]:
    """The blocks whose file is missing, not a regular file, or of the wrong size. Any other error (a file
    system that cannot answer now) raises: dropping keys over a transient error would lose them for good."""
    bad = set()
    for d, c in digests.items():
        path = disk.path(d)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            bad.add(d)
            continue
        except OSError as e:
            raise StorageError(e.errno, f"cannot examine {path}: {e.strerror}", str(path)) from e
        if not stat.S_ISREG(st.st_mode) or st.st_size != c.nbytes:
            bad.add(d)
    return bad


def remove_orphans(disk: DiskTier, referenced: set[BlockId], rank: int, size: int, remove: bool) -> int:
    """Block files under ``blocks/xy/`` with ``int(xy, 16) % size == rank`` that no key names: removed when
    ``remove``, else only counted. Their number."""
    blocks = disk.root / "blocks"
    n = 0
    try:
        subdirs = sorted(p for p in blocks.iterdir() if p.is_dir())
    except FileNotFoundError:
        return 0
    for sub in subdirs:
        try:
            if int(sub.name, 16) % size != rank:
                continue
        except ValueError:
            continue
        for f in sub.iterdir():
            try:
                bid = parse_block_name(f.name)
            except ValueError:
                continue
            if bid in referenced:
                continue
            n += 1
            if remove and not disk.contains(bid):
                disk.remove_untracked(bid)
    return n


# ------------------------------------------------------------------ the collective open
def _agree(comm: object, error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank if any rank failed (its own error there, a StorageError naming it
    elsewhere), so no rank goes on into a collective step the others skip."""
    seen = comm.allgather(None if error is None else (isinstance(error, ConfigError), f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    bad = [(r, s) for r, s in enumerate(seen) if s is not None]
    if bad:
        rank, (config, message) = bad[0]
        if config:
            raise ConfigError(f"{what}: rank {rank}: {message}")
        raise StorageError(errno.EIO, f"{what}: rank {rank} failed: {message}")


def open_directory(comm: object, rank: int, size: int, disk: DiskTier, hash_algorithm: str, *,
                   file_mode: int = 0o600, dir_mode: int = 0o700,
                   stop_after: str | None = None) -> Recovery:
    """Collective: recover the directory of ``disk`` for a job of ``size`` ranks (see the module docstring).

    ``stop_after`` (tests) returns ``None`` after the named step, as a job killed there would leave things:
    ``"written"`` (new epoch written, manifest not switched), ``"switched"`` (switched, nothing cleaned)."""
    root = disk.root
    lock_fd = -1
    error: BaseException | None = None
    if rank == 0:
        try:
            lock_fd = lock_directory(root, file_mode)
            check_format(root, hash_algorithm)
            found = epochs(root)
        except (OSError, ConfigError) as e:
            error, found = e, []
    try:
        _agree(comm, error, f"open {root}")
        # 1. read: every rank reads the manifest and every journal of its epoch; digest homes check their files
        next_epoch = comm.bcast(found[-1] + 1 if rank == 0 and found else 1 if rank == 0 else None, root=0)
        old: Manifest | None = None
        records: dict[Key, catalog.KeyRecord] = {}
        damaged: list[str] = []
        journal_lost = 0
        mine: dict[Key, catalog.KeyRecord] = {}
        digests: dict[BlockId, DigestRefs] = {}
        bad: set[BlockId] = set()
        try:
            old = read_manifest(root)
            if old is not None:
                records, damaged, journal_lost = read_epoch(root, old)
                next_epoch = max(next_epoch, old.epoch + 1)
            mine, digests = share(records, rank, size)
            bad = damaged_blocks(disk, digests)
        except (OSError, ValueError) as e:  # StorageError, IntegrityError (a legacy journal it cannot read)
            error = e
        _agree(comm, error, f"open {root}: reading the journals")
        lost = set().union(*comm.allgather(bad))
        kept = {k: r for k, r in records.items() if r.block_id not in lost}
        if lost:
            mine, digests = share(kept, rank, size)
        manifest = Manifest(next_epoch, size)

        # 2. write this rank's share as the new epoch's journal (the old epoch still counts)
        journal = catalog.Journal(journal_path(root, manifest.epoch, rank), file_mode=file_mode)

        def agree_or_drop_journal(failure: BaseException | None, what: str) -> None:
            # a step failed on some rank: no rank goes on, and this rank's new journal goes (never current)
            try:
                _agree(comm, failure, what)
            except BaseException:
                journal.close()
                unlink_quietly(journal.path)
                raise

        def stopped(step: str) -> bool:
            if stop_after != step:
                return False
            journal.close()  # as a kill here would leave it: the kernel drops the lock
            if lock_fd >= 0:
                os.close(lock_fd)
            return True

        try:
            make_dirs(epoch_dir(root, manifest.epoch), dir_mode)
            journal.compact(mine.values())  # private mode, fsync, rename, directory fsync
        except OSError as e:
            error = e
        agree_or_drop_journal(error, f"open {root}: writing the journals of epoch {manifest.epoch}")
        if stopped("written"):
            return None  # type: ignore[return-value]

        # 3. switch: rank 0 names the new epoch in the manifest; from here on the open has happened
        if rank == 0:
            try:
                write_format(root, hash_algorithm, file_mode)
                write_manifest(root, manifest, file_mode)
            except OSError as e:
                error = e
        agree_or_drop_journal(error, f"open {root}: switching the manifest to epoch {manifest.epoch}")
        if stopped("switched"):
            return None  # type: ignore[return-value]

        # 4. clean: old epochs, leftovers of interrupted writes, orphan block files (each rank a share)
        if rank == 0:
            for e in epochs(root):
                if e == manifest.epoch:
                    continue
                if damaged and old is not None and e == old.epoch:
                    _keep_damaged_epoch(root, e, dir_mode)  # what someone will want to inspect
                else:
                    shutil.rmtree(epoch_dir(root, e), ignore_errors=True)
            for p in (root / JOURNAL_DIR).glob(f"{MANIFEST_NAME}.*.tmp"):
                unlink_quietly(p)
            disk.clean_tmp()
        whole = not damaged
        for d in lost & set(digests_all := digest_refs(records.values())):
            if home_of_digest(d, size) == rank and disk.path(d).exists():
                disk.quarantine_untracked(d)  # damaged: kept for a look, never read again
        orphans = remove_orphans(disk, set(digests_all), rank, size, remove=whole)
        comm.Barrier()  # no rank puts (or cleans) while another still removes orphans
    except BaseException:
        if lock_fd >= 0:
            os.close(lock_fd)
        raise
    recovery = Recovery(manifest, journal, {k: directory_record(r) for k, r in mine.items()}, digests,
                        lock_fd=lock_fd, recovered_keys=len(kept), lost_keys=len(records) - len(kept), damaged=damaged,
                        journal_lost_keys=journal_lost,
                        orphans_removed=orphans if whole else 0, orphans_kept=0 if whole else orphans)
    if rank == 0 and (recovery.lost_keys or damaged):
        log.warning("%s: %d journalled key(s) lost (block file missing or damaged), %d for journal damage; "
                    "damaged journals: %s", root, recovery.lost_keys, journal_lost, damaged or "none")
    if orphans and not whole:
        log.warning("%s: rank %d keeps %d unreferenced block file(s): a journal did not read whole", root, rank,
                    orphans)
    return recovery


def _keep_damaged_epoch(root: Path, epoch: int, dir_mode: int) -> None:
    """Move the journals of an epoch that did not read whole into ``quarantine/`` instead of removing them."""
    dst = root / "quarantine" / f"journal-{epoch:010d}.{time.time_ns()}"
    try:
        make_dirs(dst.parent, dir_mode)
        os.rename(epoch_dir(root, epoch), dst)
    except OSError as e:  # left where it is: the next open removes it
        log.warning("cannot keep the damaged journals of epoch %d in %s: %s", epoch, dst.parent, e.strerror)


def release_lock(recovery: Recovery) -> None:
    if recovery.lock_fd >= 0:
        os.close(recovery.lock_fd)
        recovery.lock_fd = -1


__all__ = ["DigestRefs", "Recovery", "damaged_blocks", "digest_refs", "open_directory", "release_lock",
           "remove_orphans", "share"]
