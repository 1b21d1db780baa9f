"""POSIX files: one file per block, read with ``readinto`` a preallocated buffer (the raw-disk ceiling).

Every rank's instance uses the same directory, ``workdir/posix``, and names a file by its key, so any rank
reads any block without asking anyone. A put is ``open(O_TRUNC)`` + ``os.write``: no temporary file and
rename (a store would need one so that no reader sees half a block; the suite orders its writes before the
reads, and the ceiling is the least a file-per-block store can do). Nothing is fsynced, as in every other
system measured.
"""
from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .base import Backend, Setup

_MAX_NAME = 200  # file names stay well under NAME_MAX (255 bytes); longer keys are named by their digest


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
    if got != view.nbytes:  # a longer file is not looked for: puts truncate, and the suite checks every byte
        raise ValueError(f"{path}: {got} B on disk, the buffer holds {view.nbytes} B")


class PosixFiles(Backend):
    name = "posix"
    tier = "disk"

    def __init__(self) -> None:
        super().__init__()
        self._dir: Path | None = None
        self._comm = None
        self._written: set[Path] = set()  # this rank's files: close removes them

    def _open(self, setup: Setup) -> None:
        self._dir = setup.workdir / "posix"
        self._dir.mkdir(parents=True, exist_ok=True)  # every rank at once: exist_ok settles the race
        self._comm = setup.comm if setup.size > 1 else None

    def _path(self, key: str) -> Path:
        assert self._dir is not None, "open() first"
        return self._dir / file_name(key)

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        for key, block in zip(keys, blocks, strict=True):
            path = self._path(key)
            view = memoryview(block).cast("B")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                done = 0
                while done < view.nbytes:  # os.write may write less than asked (over 2 GiB, signals)
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)
            self._written.add(path)

    def get_many(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
        for key, out in zip(keys, outs, strict=True):
            try:
                read_exactly(self._path(key), out)
            except KeyError:
                raise KeyError(key) from None

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._path(k).exists() for k in keys]

    def files(self) -> list[Path]:
        """Every rank's block files (the directory is shared)."""
        if self._dir is None or not self._dir.exists():
            return []
        return sorted(p for p in self._dir.iterdir() if p.is_file())

    def version(self) -> str:
        return f"{platform.system()} {platform.release()}"

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
