"""POSIX files: one file per block, read with ``readinto`` a preallocated buffer (the raw-disk ceiling).

Every rank's instance uses the same directory, ``workdir/posix``, and names a file by its key, so any rank
reads any block without asking anyone. A put is ``open(O_TRUNC)`` + ``os.write``: no temporary file and
rename (a store would need one so that no reader sees half a block; the suite orders its writes before the
reads, and the ceiling is the least a file-per-block store can do). Nothing is fsynced, as in every other
system measured.

``options["o_direct"]`` (``--o-direct``) opens every file with ``O_DIRECT``, as cascade-kv's disk tier and
LMCache's disk backend then do: reads and writes bypass the page cache. ``O_DIRECT`` moves whole 4 KiB-aligned
pieces between aligned memory; a caller's buffer that is aligned (address and size) is read into as it is,
any other goes through one page-aligned bounce buffer (a copy, as the other systems pay), and a write pads
its last piece and truncates the file back to the block's size.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .base import Backend, Setup, Unavailable

_MAX_NAME = 200  # file names stay well under NAME_MAX (255 bytes); longer keys are named by their digest
DIRECT_ALIGN = 4096  # O_DIRECT's unit for offsets, sizes and memory addresses (the page; any block device's)


def file_name(key: str) -> str:
    """A file name for ``key``: the key percent-encoded (readable in ``ls``), or its digest when too long."""
    name = quote(key, safe="-_.")
    if name.startswith("."):  # ".", ".." and hidden names
        name = "%2E" + name[1:]
    return name if len(name) <= _MAX_NAME else "h-" + hashlib.blake2b(key.encode()).hexdigest()


def read_exactly(path: str | os.PathLike[str], out: np.ndarray) -> None:
    """``readinto`` ``out`` from ``path``; a missing file is a ``KeyError``, a size mismatch a ``ValueError``."""
    view = memoryview(out).cast("B")
    try:
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(view)  # one read(2) for blocks under 2 GiB; loop only for a short read
            while got < view.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError:
        raise KeyError(os.fspath(path)) from None
    _check_size(path, got, view.nbytes)


def _check_size(path: str | os.PathLike[str], got: int, want: int) -> None:
    if got != want:  # a longer file is not looked for: puts truncate, and the suite checks every byte
        raise ValueError(f"{path}: {got} B on disk, the buffer holds {want} B")


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:  # os.write may write less than asked (over 2 GiB, signals)
        done += os.write(fd, view[done:])


def _aligned(view: memoryview) -> bool:
    address = np.frombuffer(view, np.uint8).ctypes.data
    return address % DIRECT_ALIGN == 0 and view.nbytes % DIRECT_ALIGN == 0


class DirectIO:
    """Whole files read and written with ``O_DIRECT`` (see the module docstring), through one bounce buffer."""

    def __init__(self) -> None:
        self._bounce = memoryview(b"")

    def bounce(self, nbytes: int) -> memoryview:
        """A page-aligned buffer of ``nbytes`` rounded up to :data:`DIRECT_ALIGN` (kept for the next call)."""
        padded = -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN
        if self._bounce.nbytes < padded:
            self._bounce = memoryview(mmap.mmap(-1, padded))  # anonymous mappings are page aligned
        return self._bounce[:padded]

    def read(self, path: str | os.PathLike[str], out: np.ndarray) -> None:
        """As :func:`read_exactly`, bypassing the page cache."""
        view = memoryview(out).cast("B")
        target = view if _aligned(view) else self.bounce(view.nbytes + 1)  # +1: a longer file reads short
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except FileNotFoundError:
            raise KeyError(os.fspath(path)) from None
        try:
            got = 0
            while got < target.nbytes:
                n = os.readv(fd, [target[got:]])
                if not n:
                    break
                got += n
        finally:
            os.close(fd)
        _check_size(path, got, view.nbytes)
        if target is not view:
            view[:] = target[:got]

    def write(self, fd: int, block: np.ndarray) -> None:
        """Write ``block`` to ``fd`` (opened with ``O_DIRECT``), padded to whole pieces, then truncated."""
        view = memoryview(block).cast("B")
        source = view if _aligned(view) else self.bounce(view.nbytes)
        if source is not view:
            source[:view.nbytes] = view
            source[view.nbytes:] = bytes(source.nbytes - view.nbytes)
        _write_all(fd, source)
        if source.nbytes != view.nbytes:
            os.ftruncate(fd, view.nbytes)


class PosixFiles(Backend):
    name = "posix"
    tier = "disk"

    def __init__(self) -> None:
        super().__init__()
        self._dir: Path | None = None
        self._comm = None
        self._written: set[Path] = set()  # this rank's files: close removes them
        self._direct: DirectIO | None = None  # options["o_direct"]: every file through O_DIRECT

    def _open(self, setup: Setup) -> None:
        self._dir = setup.workdir / "posix"
        self._dir.mkdir(parents=True, exist_ok=True)  # every rank at once: exist_ok settles the race
        self._comm = setup.comm if setup.size > 1 else None
        if setup.options.get("o_direct"):
            self._direct = DirectIO()
            _probe_direct(self._dir / f".o_direct-{setup.rank}")

    def _path(self, key: str) -> Path:
        assert self._dir is not None, "open() first"
        return self._dir / file_name(key)

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        for key, block in zip(keys, blocks, strict=True):
            path = self._path(key)
            direct = os.O_DIRECT if self._direct is not None else 0
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
            self._written.add(path)
            try:
                if self._direct is not None:
                    self._direct.write(fd, block)
                else:
                    _write_all(fd, memoryview(block).cast("B"))
            finally:
                os.close(fd)

    def get_hits(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> list[bool]:
        self.check_batch(keys, outs)
        read = self._direct.read if self._direct is not None else read_exactly
        hits = []
        for key, out in zip(keys, outs):
            try:
                read(self._path(key), out)
                hits.append(True)
            except KeyError:
                hits.append(False)
        return hits

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._path(k).exists() for k in keys]

    def files(self) -> list[Path]:
        """Every rank's block files (the directory is shared)."""
        if self._dir is None or not self._dir.exists():
            return []
        return sorted(p for p in self._dir.iterdir() if p.is_file())

    def version(self) -> str:
        return f"{platform.system()} {platform.release()}" + (", O_DIRECT" if self._direct is not None else "")

    def close(self) -> None:
        """Collective on several ranks: no rank removes files another may still be reading."""
        if self._dir is None:
            return
        if self._comm is not None:
            self._comm.Barrier()
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written.clear()
        if self._comm is not None:
            self._comm.Barrier()
        if self._comm is None or self._comm.Get_rank() == 0:
            try:
                self._dir.rmdir()
            except OSError:  # not empty: files this instance did not write (left as found)
                pass
        self._dir = None


def _probe_direct(path: Path) -> None:
    """Unavailable where ``O_DIRECT`` cannot be used: not on this platform, or not on this file system (tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        raise Unavailable("posix: --o-direct asked for, but this platform has no O_DIRECT")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as e:
        raise Unavailable(f"posix: --o-direct asked for, but {path.parent} refuses O_DIRECT ({e})") from e
    finally:
        path.unlink(missing_ok=True)
