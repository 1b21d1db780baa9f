"""HDF5 through h5py: one dataset per block, ``read_direct`` into the caller's buffer (the seed's baseline).

One process keeps its file open for the whole run. Several ranks: h5py's wheels are built without parallel
HDF5, so there is no shared file every rank writes at once. Each rank writes its own file,
``workdir/hdf5/rank-R.h5``, and a reader looks for a key in its own file first, then in the other ranks'
files in rank order. HDF5 lets one process write a file that others have open only under SWMR, and SWMR
cannot create datasets once it is on (it only appends to existing ones): with a dataset per block it is
of no use. So each rank opens its own file once, for writing, and keeps it open; it flushes it after every
``put_many`` (HDF5 writes its metadata then). Another rank's file is opened read-only once, when first read,
and kept open while that file does not change: a reader that finds its size or modification time changed
since it opened it (the writer has flushed new datasets, which the reader's cached metadata does not
know) opens it again. A lock file beside each ``.h5`` (``flock``: exclusive for the writer while it writes
and flushes, shared for readers while they read) keeps a reader from seeing half-written metadata, and
HDF5's own file locking is turned off so the two do not meet. A key put by two ranks is read from the
first file that has it (the suite never puts different bytes under one key from two ranks).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .base import BENCH_EXTRA, Backend, Setup, Unavailable

try:
    import h5py
    _MISSING = ""
except ImportError as e:  # Hdf5() raises Unavailable: the suite prints it as the skip reason
    h5py = None
    _MISSING = f"h5py not installed ({e}): {BENCH_EXTRA}"


def dataset_name(key: str) -> str:
    """A dataset name for ``key``: no ``/`` (a group separator), never ``.`` alone."""
    return "k" + quote(key, safe="-_.")


@contextlib.contextmanager
def _flock(lock: Any, mode: int) -> Iterator[None]:
    fcntl.flock(lock, mode)
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def _fingerprint(path: Path) -> tuple[int, int, int]:
    """What changes when a writer flushes the file (or replaces it)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class Hdf5(Backend):
    name = "hdf5"
    tier = "disk"

    def __init__(self) -> None:
        super().__init__()
        if h5py is None:
            raise Unavailable(_MISSING)
        self._dir: Path | None = None
        self._rank = 0
        self._size = 1
        self._comm: Any = None
        self._file: Any = None  # this rank's file, open for writing for the whole run
        self._readers: dict[int, tuple[Any, tuple[int, int, int]]] = {}  # other ranks' files: handle, fingerprint
        self._locks: dict[int, Any] = {}  # rank -> its open lock file (several ranks only)

    def _path(self, rank: int) -> Path:
        assert self._dir is not None, "open() first"
        return self._dir / f"rank-{rank}.h5"

    def _open(self, setup: Setup) -> None:
        self._dir = setup.workdir / "hdf5"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._rank, self._size = setup.rank, setup.size
        self._comm = setup.comm if setup.size > 1 else None
        if self._comm is None:
            self._file = h5py.File(self._path(0), "w")
            return
        failed: Exception | None = None
        try:
            self._path(self._rank).with_suffix(".lock").touch()
            self._file = h5py.File(self._path(self._rank), "w", locking=False)
            self._file.flush()  # a reader may open it before this rank's first put
        except Exception as e:  # noqa: BLE001 - raised below, once every rank knows: none waits for this file
            failed = e
        # also the barrier after which every rank's file exists, before anyone looks in it
        errors = [m for m in self._comm.allgather(None if failed is None else f"{type(failed).__name__}: {failed}")
                  if m is not None]
        if failed is not None:
            raise failed
        if errors:
            raise RuntimeError(f"hdf5: another rank could not create its file: {errors[0]}")

    @contextlib.contextmanager
    def _opened(self, rank: int, write: bool) -> Iterator[Any]:
        """Rank ``rank``'s file, for one batch (see the module docstring)."""
        if self._comm is None:
            yield self._file
            return
        lock = self._locks.get(rank)
        if lock is None:
            lock = self._locks[rank] = open(self._path(rank).with_suffix(".lock"), "a+b")
        with _flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH):
            if rank == self._rank:
                yield self._file
                if write:
                    self._file.flush()  # under the lock: readers see whole metadata
                return
            yield self._reader(rank)

    def _reader(self, rank: int) -> Any:
        """Rank ``rank``'s file, read-only: the handle opened before, unless the file changed since."""
        path = self._path(rank)
        now = _fingerprint(path)
        handle, seen = self._readers.get(rank, (None, None))
        if handle is not None and seen == now:
            return handle
        if handle is not None:
            handle.close()
        handle = h5py.File(path, "r", locking=False)
        self._readers[rank] = handle, now
        return handle

    def _search_order(self) -> list[int]:
        return [self._rank] + [r for r in range(self._size) if r != self._rank]

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        with self._opened(self._rank, write=True) as f:
            for key, block in zip(keys, blocks, strict=True):
                name = dataset_name(key)
                ds = f.get(name)
                if ds is not None and (ds.shape != block.shape or ds.dtype != block.dtype):
                    del f[name]
                    ds = None
                if ds is None:
                    f.create_dataset(name, data=block)
                else:  # overwrite in place: HDF5 never reclaims a deleted dataset's space
                    ds.write_direct(block)

    def get_hits(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> list[bool]:
        self.check_batch(keys, outs)
        missing = dict(enumerate(keys))
        for rank in self._search_order():
            with self._opened(rank, write=False) as f:
                for i, key in list(missing.items()):
                    ds = f.get(dataset_name(key))
                    if ds is None:
                        continue
                    if ds.shape != outs[i].shape:
                        raise ValueError(f"hdf5: {key!r} holds {ds.shape}, the buffer is {outs[i].shape}")
                    ds.read_direct(outs[i])
                    del missing[i]
            if not missing:
                break
        return [i not in missing for i in range(len(keys))]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        found = [False] * len(keys)
        for rank in self._search_order():
            with self._opened(rank, write=False) as f:
                for i, key in enumerate(keys):
                    found[i] = found[i] or dataset_name(key) in f
            if all(found):
                break
        return found

    def files(self) -> list[Path]:
        """Every rank's ``.h5`` file."""
        if self._dir is None or not self._dir.exists():
            return []
        if self._file is not None:  # the suite reads the files cold: what is still in HDF5's buffers would be missed
            with self._opened(self._rank, write=True):  # under the writer's lock: a flush rewrites metadata
                self._file.flush()
        return sorted(self._dir.glob("*.h5"))

    def version(self) -> str:
        return f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}"

    def close(self) -> None:
        """Collective on several ranks: no rank removes its file while another may still be reading it."""
        if self._dir is None:
            return
        for handle, _ in self._readers.values():
            handle.close()
        self._readers.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        for lock in self._locks.values():
            lock.close()
        self._locks.clear()
        if self._comm is not None:
            self._comm.Barrier()
        mine = self._path(self._rank)
        mine.unlink(missing_ok=True)
        mine.with_suffix(".lock").unlink(missing_ok=True)
        if self._comm is not None:
            self._comm.Barrier()
        if self._comm is None or self._comm.Get_rank() == 0:
            with contextlib.suppress(OSError):  # not empty: files this instance did not write (left as found)
                self._dir.rmdir()
        self._dir = None
