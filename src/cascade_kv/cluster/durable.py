"""Persistence of the distributed store: per-home key journals, the manifest, and recovery under any rank count.

Layout under ``disk_path`` (one directory every rank sees, Lustre on a cluster)::

    FORMAT                      "cascade-kv cluster blocks v1 hash=<alg>" (the single-node store refuses it)
    LOCK                        flock-ed by rank 0 of the job that has the directory open
    journal/MANIFEST            "cascade-kv cluster manifest v1 epoch=E ranks=N crc=..": which journals count
    journal/<E>/rank-<r>.log    records of the keys rank r homes (``home_of_key(k, N) == r``)
    blocks/ tmp/ quarantine/    the shared DiskTier, durable: every block fsynced before a key names it

A record is the single-node journal's (:mod:`cascade_kv.catalog`, written and read by its ``Journal``,
with its lossless dtype codec): put, delete, protect. Within an
epoch a key has one home, so each key's records are in one file, in the order its home applied them.

**Acknowledged means durable.** A put writes each new block file (fsync, rename, directory fsync)
before it binds; the key's home appends the record and fsyncs it *before* the change takes effect and
before it answers; a delete is journalled before the block's last reference goes, so a file is never
unlinked while a durable record still names it. A crash can tear only the unanswered last record.

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
import math
import os
import re
import shutil
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import catalog
from ..config import CascadeConfig
from ..errors import BlockNotFound, CapacityError, ConfigError, IntegrityError, PeerTimeout, StorageError
from ..ids import BlockId, Key, parse_block_name
from ..tiers.disk import DiskTier, lock_directory, make_dirs, unlink_quietly, write_atomically
from .directory import TIER_DISK, Directory, DirectoryState, KeyRecord, Location, dtype_of, dtype_text
from .homes import home_of_digest, home_of_key

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
MANIFEST_NAME = "MANIFEST"
_MANIFEST_RE = re.compile(r"cascade-kv cluster manifest v1 epoch=(\d+) ranks=(\d+) crc=([0-9a-f]{8})\n\Z")
_EPOCH_RE = re.compile(r"\d{10}\Z")
_SINGLE_NODE_JOURNAL = "journal.log"


def format_line(hash_algorithm: str) -> str:
    """The FORMAT marker of a cluster directory (a single-node store, which wants its own, refuses it)."""
    return f"cascade-kv cluster blocks v1 hash={hash_algorithm}\n"


@dataclass(frozen=True, slots=True)
class Manifest:
    """Which journals are current: those of ``epoch``, one per rank of a job of ``ranks`` ranks."""

    epoch: int
    ranks: int

    def encode(self) -> bytes:
        body = f"cascade-kv cluster manifest v1 epoch={self.epoch} ranks={self.ranks}"
        return f"{body} crc={zlib.crc32(body.encode()):08x}\n".encode()


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


# ------------------------------------------------------------------ paths
def epoch_dir(root: Path, epoch: int) -> Path:
    return root / JOURNAL_DIR / f"{epoch:010d}"


def journal_path(root: Path, epoch: int, rank: int) -> Path:
    return epoch_dir(root, epoch) / f"rank-{rank:06d}.log"


# ------------------------------------------------------------------ manifest
def read_manifest(root: Path) -> Manifest | None:
    """The current manifest; None for a directory no cluster job has committed to. A damaged one raises
    (it is replaced by rename, so a crash cannot damage it: something else did, and guessing loses keys)."""
    path = root / JOURNAL_DIR / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(e.errno, f"cannot read {path}: {e.strerror}", str(path)) from e
    m = _MANIFEST_RE.match(raw.decode("ascii", "replace"))
    if m is None or Manifest(int(m[1]), int(m[2])).encode() != raw or int(m[2]) < 1:
        raise StorageError(errno.EIO, f"{path} is damaged ({raw[:100]!r}); restore it or move {root} aside "
                           f"(nothing was changed)", str(path))
    return Manifest(int(m[1]), int(m[2]))


def write_manifest(root: Path, manifest: Manifest, file_mode: int) -> None:
    """Replace the manifest atomically and durably: temp file, fsync, rename, directory fsync."""
    write_atomically(root / JOURNAL_DIR, MANIFEST_NAME, manifest.encode(), file_mode)


# ------------------------------------------------------------------ journals
def read_epoch(root: Path, manifest: Manifest) -> tuple[dict[Key, catalog.KeyRecord], list[str], int]:
    """Every key of the manifest's epoch (read with the single-node journal's reader, which writes nothing),
    the journals with a damaged region (a torn tail is what a crash leaves: normal, not listed), and the
    number of keys that damage dropped. A journal the manifest names but that is not there raises: the
    switch happens only after every one was written, so it was removed or lost since, and carrying on
    would drop its keys for good."""
    records: dict[Key, catalog.KeyRecord] = {}
    damaged = []
    lost = 0
    for r in range(manifest.ranks):
        path = journal_path(root, manifest.epoch, r)
        replay = catalog.Journal(path).read()
        if not replay.exists:
            raise StorageError(errno.ENOENT, f"{path} is missing: the manifest names {manifest.ranks} journals of "
                               f"epoch {manifest.epoch}; restore it or move {root} aside (nothing was changed)",
                               str(path))
        records.update(replay.state)  # disjoint: within an epoch each key has one home
        lost += len(replay.lost) + replay.lost_unnamed
        if replay.damaged:
            damaged.append(f"{path} ({len(replay.damaged)} damaged region(s) at {[o for o, _ in replay.damaged]}, "
                           f"{len(replay.unidentified)} naming no key; {len(replay.lost)} key(s) dropped"
                           f"{f' + {replay.lost_unnamed} unnamed' if replay.lost_unnamed else ''})")
        if replay.repaired:
            log.warning("%s: %d record(s) with a damaged header repaired from their payload at %s", path,
                        len(replay.repaired), list(replay.repaired))
    return records, damaged, lost


def directory_record(r: catalog.KeyRecord) -> KeyRecord:
    return KeyRecord(r.block_id, dtype_text(r.dtype), r.shape, r.prefix)


def journal_record(key: Key, r: KeyRecord) -> catalog.KeyRecord:
    dtype = dtype_of(r.dtype)
    return catalog.KeyRecord(key, BlockId(r.digest), dtype.itemsize * math.prod(r.shape), dtype, r.shape, r.prefix)


# ------------------------------------------------------------------ recovery (pure)
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


def _check_format(root: Path, hash_algorithm: str) -> None:
    if (root / _SINGLE_NODE_JOURNAL).exists():
        raise ConfigError(f"{root} is a single-node store's directory (it has {_SINGLE_NODE_JOURNAL}); "
                          f"open it with Store(persist=True), or give the cluster its own disk_path")
    try:
        found = (root / "FORMAT").read_text()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(e.errno, f"cannot read {root / 'FORMAT'}: {e.strerror}", str(root)) from e
    if found != format_line(hash_algorithm):
        raise ConfigError(f"{root} holds blocks written as {found.strip()!r}; this store is configured for "
                          f"{format_line(hash_algorithm).strip()!r}")


def _write_format(root: Path, hash_algorithm: str, file_mode: int) -> None:
    if not (root / "FORMAT").exists():
        write_atomically(root, "FORMAT", format_line(hash_algorithm).encode(), file_mode)


def _epochs(root: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in (root / JOURNAL_DIR).iterdir() if _EPOCH_RE.match(p.name))
    except FileNotFoundError:
        return []


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
            _check_format(root, hash_algorithm)
            epochs = _epochs(root)
        except (OSError, ConfigError) as e:
            error, epochs = e, []
    try:
        _agree(comm, error, f"open {root}")
        # 1. read: every rank reads the manifest and every journal of its epoch; digest homes check their files
        next_epoch = comm.bcast(epochs[-1] + 1 if rank == 0 and epochs else 1 if rank == 0 else None, root=0)
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
                _write_format(root, hash_algorithm, file_mode)
                write_manifest(root, manifest, file_mode)
            except OSError as e:
                error = e
        agree_or_drop_journal(error, f"open {root}: switching the manifest to epoch {manifest.epoch}")
        if stopped("switched"):
            return None  # type: ignore[return-value]

        # 4. clean: old epochs, leftovers of interrupted writes, orphan block files (each rank a share)
        if rank == 0:
            for e in _epochs(root):
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
    (:class:`~.writes.Writes`, ``persist``). A part the store holds, not a mixin: it reads none of the
    store's fields."""

    def __init__(self, recovery: Recovery | None) -> None:
        self.recovery = recovery
        """What open recovered (None without persist)."""
        self.state = None if recovery is None else JournalledState(recovery.journal)
        """The directory share this rank serves, its journal open (None without persist: a plain one)."""

    @classmethod
    def open(cls, comm: object, rank: int, size: int, config: CascadeConfig, disk: DiskTier | None) -> Durability:
        """Collective: recover the shared directory (without persist, nothing to do)."""
        if not config.persist:
            return cls(None)
        assert disk is not None  # CascadeConfig: persist needs disk_path
        recovery = open_directory(comm, rank, size, disk, config.hash_algorithm, file_mode=disk.file_mode,
                                  dir_mode=disk.dir_mode)
        durability = cls(recovery)
        assert durability.state is not None
        durability.state.restore(recovery, rank)
        return durability

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
