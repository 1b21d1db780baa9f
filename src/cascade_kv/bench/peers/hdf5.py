"""HDF5 through h5py: one dataset per block, ``read_direct`` into the caller's buffer (the seed's baseline).

One process keeps its file open for the whole run. Several ranks: h5py's wheels are built without parallel
HDF5, so there is no shared file every rank writes at once. Each rank writes its own file,
``workdir/hdf5/rank-R.h5``, and a reader looks for a key in its own file first, then in the other ranks'
files in rank order. HDF5 lets one process write a file that others have open only under SWMR, and SWMR
cannot create datasets once it is on (it only appends to existing ones): with a dataset per block it is
of no use. So a writer opens its file for one ``put_many`` and closes it (HDF5 writes its metadata then), and
a reader opens a file read-only for one ``get_many`` or ``contains_many``; a lock file beside each ``.h5``
(``flock``: exclusive for the writer, shared for readers) keeps them apart, and HDF5's own file locking is
turned off so the two do not meet. The opens and closes are part of what several ranks pay to share data
through HDF5 files, and are timed. A key put by two ranks is read from the first file that has it (the
suite never puts different bytes under one key from two ranks).
"""
from __future__ import annotations

import contextlib
import fcntl
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
def _flock(path: Path, mode: int) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        self._file: Any = None  # one process: the file, open for the whole run

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
            h5py.File(self._path(self._rank), "w", locking=False).close()
            self._path(self._rank).with_suffix(".lock").touch()
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
        if self._file is not None:
            yield self._file
            return
        path = self._path(rank)
        with (_flock(path.with_suffix(".lock"), fcntl.LOCK_EX if write else fcntl.LOCK_SH),
              h5py.File(path, "a" if write else "r", locking=False) as f):
            yield f

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

    def get_many(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
        if len(keys) != len(outs):
            raise ValueError(f"get_many: {len(keys)} keys but {len(outs)} buffers")
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
                return
        raise KeyError(next(iter(missing.values())))

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
        if self._file is not None:
            self._file.flush()  # the suite reads the files cold: what is still in HDF5's buffers would be missed
        return sorted(self._dir.glob("*.h5"))

    def version(self) -> str:
        return f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}"

    def close(self) -> None:
        """Collective on several ranks: no rank removes its file while another may still be reading it."""
        if self._dir is None:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
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
