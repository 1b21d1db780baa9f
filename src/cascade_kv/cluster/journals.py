"""The on-disk layout of a persistent distributed store: the FORMAT marker, the manifest, the epochs of per-home
journals, and the conversion between journal and directory records.

Layout under ``disk_path`` (one directory every rank sees, Lustre on a cluster)::

    FORMAT                      "cascade-kv cluster blocks v1 hash=<alg>" (the single-node store refuses it)
    LOCK                        flock-ed by rank 0 of the job that has the directory open
    journal/MANIFEST            "cascade-kv cluster manifest v1 epoch=E ranks=N crc=..": which journals count
    journal/<E>/rank-<r>.log    records of the keys rank r homes (``home_of_key(k, N) == r``)
    blocks/ tmp/ quarantine/    the shared DiskTier, durable: every block fsynced before a key names it

A record is the single-node journal's (:mod:`cascade_kv.catalog`, written and read by its ``Journal``,
with its lossless dtype codec): put, delete, protect. Within an
epoch a key has one home, so each key's records are in one file, in the order its home applied them.

This module reads and writes those files; :mod:`.recovery` decides, at open, what they mean.
"""
from __future__ import annotations

import errno
import logging
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from .. import catalog
from ..errors import ConfigError, StorageError
from ..ids import BlockId, Key
from ..tiers.disk import write_atomically
from .directory.records import KeyRecord, dtype_of, dtype_text

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
MANIFEST_NAME = "MANIFEST"
_MANIFEST_RE = re.compile(r"cascade-kv cluster manifest v1 epoch=(\d+) ranks=(\d+) crc=([0-9a-f]{8})\n\Z")
_EPOCH_RE = re.compile(r"\d{10}\Z")
_SINGLE_NODE_JOURNAL = "journal.log"


def format_line(hash_algorithm: str) -> str:
    """The FORMAT marker of a cluster directory (a single-node store, which wants its own, refuses it)."""
    return f"cascade-kv cluster blocks v1 hash={hash_algorithm}\n"


def check_format(root: Path, hash_algorithm: str) -> None:
    """Refuse a single-node store's directory, or one whose blocks were hashed otherwise (ConfigError)."""
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


def write_format(root: Path, hash_algorithm: str, file_mode: int) -> None:
    if not (root / "FORMAT").exists():
        write_atomically(root, "FORMAT", format_line(hash_algorithm).encode(), file_mode)


@dataclass(frozen=True, slots=True)
class Manifest:
    """Which journals are current: those of ``epoch``, one per rank of a job of ``ranks`` ranks."""

    epoch: int
    ranks: int

    def encode(self) -> bytes:
        body = f"cascade-kv cluster manifest v1 epoch={self.epoch} ranks={self.ranks}"
        return f"{body} crc={zlib.crc32(body.encode()):08x}\n".encode()


# ------------------------------------------------------------------ paths
def epoch_dir(root: Path, epoch: int) -> Path:
    return root / JOURNAL_DIR / f"{epoch:010d}"


def journal_path(root: Path, epoch: int, rank: int) -> Path:
    return epoch_dir(root, epoch) / f"rank-{rank:06d}.log"


def epochs(root: Path) -> list[int]:
    """The epochs that have a journal directory (the current one, and any an interrupted open left), in order."""
    try:
        return sorted(int(p.name) for p in (root / JOURNAL_DIR).iterdir() if _EPOCH_RE.match(p.name))
    except FileNotFoundError:
        return []


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


__all__ = ["JOURNAL_DIR", "MANIFEST_NAME", "Manifest", "check_format", "directory_record", "epoch_dir", "epochs",
           "format_line", "journal_path", "journal_record", "read_epoch", "read_manifest", "write_format",
           "write_manifest"]
