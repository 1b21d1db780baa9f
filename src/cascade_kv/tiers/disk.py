"""Tier 5: a directory of content-addressed block files (Lustre ``$SCRATCH`` on a cluster).

Layout under ``root``::

    blocks/ab/abcdef...          one file per block, named by its digest (hex), raw bytes only
    tmp/                         files being written; renamed into blocks/ when complete
    quarantine/                  copies that failed their digest check (or were found damaged or
                                 unaccounted for when a persistent store reopened), kept for inspection

A file holds the block's bytes and nothing else, so a raw ``readinto`` of it
is the exact ceiling of a read, and the name is the checksum. A write goes to
``tmp/`` and is renamed into place, so no reader ever sees half a block.
Reads go straight into the caller's buffer with ``readv``.

Files are private: created ``0600`` in ``0700`` directories (``0640``/``0750`` with
``group_access``), set with ``fchmod``/``chmod`` so the umask cannot widen or narrow them.
Directories that already exist keep their mode (a site may have set it on purpose).
A temporary file has an unpredictable name and is created with ``O_EXCL|O_NOFOLLOW``
relative to a descriptor of ``tmp/`` opened with ``O_NOFOLLOW`` and checked to be a
directory owned by this user, so a link planted in or as ``tmp/`` cannot redirect a
write outside the tier. With ``durable=True`` every rename (into ``blocks/`` or
``quarantine/``) is followed by an fsync of the directories it changed, so it
survives power loss, not just a killed process.

Integrity: every read checks the file's size; the bytes are hashed on the first
read of a file and again whenever its identity changed (inode, size, mtime or
ctime: any write, truncate, replace or ``utime`` through the file system changes
one of them). A file whose ctime is too close to the moment it was verified is
"racy" (a write in the same clock tick would leave ctime unchanged; the margin is 100 ms, or
two seconds where timestamps have whole seconds only) and is hashed
again, as git does for its index. ``verify="always"`` hashes every read.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import IntegrityError, StorageError
from ..hashing import Hasher
from ..ids import BlockId, block_name, digest_of, parse_block_name
from ..memcopy import in_parts
from .base import Tier, TierTraits

log = logging.getLogger(__name__)

_DIRECT_ALIGN = 4096
_PAGE_ALIGN = mmap.PAGESIZE  # a large read's parts start at page boundaries: no page read by two threads
_BOUNCE = 8 << 20  # O_DIRECT staging buffer per thread
_RACY_NS = 100_000_000  # a ctime within 100 ms of verification may hide a same-tick write
_COARSE_RACY_NS = 2_000_000_000  # file systems that keep whole seconds (some Lustre, NFS setups)

_Signature = tuple[int, int, int, int]  # (inode, size, mtime_ns, ctime_ns)

PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700
GROUP_FILE, GROUP_DIR = 0o640, 0o750
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def modes(group_access: bool) -> tuple[int, int]:
    """(file mode, directory mode) for files a store creates."""
    return (GROUP_FILE, GROUP_DIR) if group_access else (PRIVATE_FILE, PRIVATE_DIR)


def _racy_ns(ctime_ns: int) -> int:
    """How close to its verification a ctime must not be. A ctime with no sub-second part comes from a
    file system with one-second timestamps, where a same-second write leaves ctime unchanged."""
    return _COARSE_RACY_NS if ctime_ns % 1_000_000_000 == 0 else _RACY_NS


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DiskTier(Tier):
    """One file per block under ``root/blocks``; see the module docstring for the format."""

    traits = TierTraits(name="disk", memory=False, persistent=True, addressable=False)

    def __init__(self, root: str | os.PathLike[str], hasher: Hasher, *, capacity: int | None = None,
                 durable: bool = False, o_direct: bool = False, verify: str = "auto",
                 group_access: bool = False) -> None:
        self.root = Path(root)
        self._blocks = self.root / "blocks"
        self._tmp = self.root / "tmp"
        self._quarantine = self.root / "quarantine"
        self.file_mode, self.dir_mode = modes(group_access)
        """Modes of the files and directories this tier (and a persistent store on it) creates."""
        try:
            for d in (self._blocks, self._tmp):
                make_dirs(d, self.dir_mode)
            with self._tmp_dir():
                pass  # refuse a tmp/ that is a link or someone else's now, not at the first write
        except OSError as e:
            raise StorageError(e.errno, f"disk tier: cannot create {self.root}: {e.strerror}", str(self.root)) from e
        if o_direct and not hasattr(os, "O_DIRECT"):
            raise StorageError(errno.ENOTSUP, "disk tier: O_DIRECT is not available on this platform")
        self._hasher = hasher
        self._capacity = capacity
        self._durable = durable
        self._direct = os.O_DIRECT if o_direct else 0
        self._verify_always = verify == "always"
        self._sizes: dict[BlockId, int] = {}
        self._used = 0
        self._verified: dict[BlockId, tuple[_Signature, int]] = {}  # block -> (signature, verified at ns)
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread O_DIRECT bounce buffer
        self.hashed_reads = 0
        """Reads whose bytes were hashed (first read of a file, changed file, or verify='always')."""

    # -- accounting ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        return self._capacity

    @property
    def used(self) -> int:
        return self._used

    def allocate(self, block_id: BlockId, nbytes: int) -> bool:
        with self._lock:
            if block_id in self._sizes:
                raise KeyError(f"block {block_name(block_id)[:16]} already allocated in disk tier")
            if self._capacity is not None and self._used + nbytes > self._capacity:
                return False
            self._sizes[block_id] = nbytes
            self._used += nbytes
            return True

    def _release(self, block_id: BlockId) -> None:
        with self._lock:
            self._used -= self._sizes.pop(block_id)
            self._verified.pop(block_id, None)

    def contains(self, block_id: BlockId) -> bool:
        return block_id in self._sizes

    def size_of(self, block_id: BlockId) -> int:
        return self._sizes[block_id]

    def block_ids(self) -> Iterator[BlockId]:
        with self._lock:
            return iter(list(self._sizes))

    def path(self, block_id: BlockId) -> Path:
        name = block_name(block_id)
        return self._blocks / name[:2] / name

    # -- data ---------------------------------------------------------------------------------
    def write(self, block_id: BlockId, src: memoryview) -> None:
        nbytes = self._sizes[block_id]
        if src.nbytes != nbytes:
            raise ValueError(f"disk tier: block is {nbytes} B, source is {src.nbytes} B")
        src = src.cast("B") if src.format != "B" or src.ndim != 1 else src
        final = self.path(block_id)
        try:
            with self._tmp_dir() as tmp_fd:
                make_dirs(final.parent, self.dir_mode)
                fd, tmp = create_exclusive(tmp_fd, f"{final.name}.", self.file_mode, self._direct)
                try:
                    try:
                        if self._direct:
                            self._write_direct(fd, src)
                        else:
                            _write_all(fd, src)
                        if self._durable:
                            os.fsync(fd)
                    finally:
                        os.close(fd)
                except BaseException:
                    unlink_quietly(tmp, tmp_fd)
                    raise
                try:
                    os.rename(tmp, final, src_dir_fd=tmp_fd)  # atomic: readers see the old state or the whole block
                except OSError:
                    unlink_quietly(tmp, tmp_fd)
                    raise
                if self._durable:
                    fsync_dir(final.parent)
        except OSError as e:
            raise StorageError(e.errno, f"disk tier: cannot write block to {final}: {e.strerror}",
                               str(final)) from e

    @contextlib.contextmanager
    def _tmp_dir(self) -> Iterator[int]:
        """A descriptor of ``tmp/`` (not a link, a directory, ours) that temporary files are created under."""
        fd = os.open(self._tmp, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW | CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise OSError(errno.EPERM, f"{self._tmp} belongs to uid {st.st_uid}, not to this user")
            yield fd
        finally:
            os.close(fd)

    def read_into(self, block_id: BlockId, out: memoryview) -> None:
        nbytes = self._sizes[block_id]
        if out.nbytes != nbytes:
            raise ValueError(f"disk tier: block is {nbytes} B, buffer is {out.nbytes} B")
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        path = self.path(block_id)
        try:
            fd = os.open(path, os.O_RDONLY | self._direct)
        except FileNotFoundError:
            raise IntegrityError(f"disk tier: block file {path} is missing") from None
        except OSError as e:
            raise StorageError(e.errno, f"disk tier: cannot open {path}: {e.strerror}", str(path)) from e
        try:
            st = os.fstat(fd)
            if st.st_size != nbytes:
                raise IntegrityError(f"disk tier: {path} holds {st.st_size} B, block is {nbytes} B (truncated or replaced)")
            sig = _signature(st)
            trusted = self._trusts(block_id, sig)
            got = self._read_direct(fd, out) if self._direct else _read_all(fd, out)
        except OSError as e:
            raise StorageError(e.errno, f"disk tier: cannot read {path}: {e.strerror}", str(path)) from e
        finally:
            os.close(fd)
        if got != nbytes:
            raise IntegrityError(f"disk tier: {path} ended after {got} of {nbytes} B (truncated while read)")
        if trusted:
            return
        verified_at = time.time_ns()
        self.hashed_reads += 1
        if self._hasher.digest(out) != digest_of(block_id):
            raise IntegrityError(f"disk tier: {path} does not match its digest (corrupted)")
        with self._lock:
            if block_id in self._sizes:
                self._verified[block_id] = (sig, verified_at)

    def _trusts(self, block_id: BlockId, sig: _Signature) -> bool:
        known = self._verified.get(block_id)
        return (not self._verify_always and known is not None and known[0] == sig
                and sig[3] < known[1] - _racy_ns(sig[3]))

    def trusted(self, block_id: BlockId) -> bool:
        try:
            return self._trusts(block_id, _signature(os.stat(self.path(block_id))))
        except OSError:
            return False

    def free(self, block_id: BlockId) -> None:
        self._release(block_id)
        unlink_quietly(self.path(block_id))

    def untrack(self, block_id: BlockId) -> None:
        """Stop tracking a block whose file another process removed, leaving the path alone: unlinking it
        here could remove a new file of the same name that the other process wrote since (one directory
        shared by the ranks of a job)."""
        if block_id in self._sizes:
            self._release(block_id)

    # -- recovery -----------------------------------------------------------------------------
    def adopt(self, block_id: BlockId, expected: int | None = None) -> int | None:
        """Track a block file already present (written by an earlier run); its size, or ``None`` if
        there is none. A file that is not a regular file (or cannot be examined) reads as size -1, and
        one whose size is not ``expected`` (when given) is not tracked either: both are damaged.

        Adopted files are not trusted: their first read is hashed."""
        try:
            st = os.lstat(self.path(block_id))
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("disk tier: cannot examine %s: %s", self.path(block_id), e.strerror)
            return -1
        if not stat.S_ISREG(st.st_mode):
            return -1
        size = st.st_size
        if expected is not None and size != expected:
            return size
        with self._lock:
            if block_id not in self._sizes:
                self._sizes[block_id] = size
                self._used += size
        return size

    def scan(self) -> Iterator[BlockId]:
        """Block ids of every well-named file under ``blocks/`` (tracked or not)."""
        for sub in self._blocks.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    try:
                        yield parse_block_name(f.name)
                    except ValueError:
                        continue

    def remove_untracked(self, block_id: BlockId) -> None:
        """Delete a block file that no tracked block refers to (an orphan of a crash)."""
        if block_id in self._sizes:  # a real check, not an assert: deleting a live block's file loses it
            raise ValueError(f"disk tier: block {block_name(block_id)[:16]} is tracked; free() it instead")
        unlink_quietly(self.path(block_id))

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes; how many were removed."""
        n = 0
        try:
            with self._tmp_dir() as tmp_fd:
                for name in os.listdir(tmp_fd):
                    unlink_quietly(name, tmp_fd)
                    n += 1
        except OSError as e:  # leftovers only cost space: never fail an open over them
            log.warning("disk tier: cannot clean %s: %s", self._tmp, e.strerror)
        return n

    def quarantine(self, block_id: BlockId) -> Path | None:
        """Move a bad copy aside (never deleted: someone will want to look at it) and stop tracking it."""
        self._release(block_id)
        return self.quarantine_untracked(block_id, unlink_on_failure=True)

    def quarantine_untracked(self, block_id: BlockId, *, unlink_on_failure: bool = False) -> Path | None:
        """Move an untracked block file aside; where it went, or ``None`` if it is gone or could not move
        (then it is deleted with ``unlink_on_failure``: a bad copy must not be read again; otherwise left)."""
        src = self.path(block_id)
        return self.move_aside(src, unlink_on_failure=unlink_on_failure)

    def move_aside(self, src: Path, *, unlink_on_failure: bool = False) -> Path | None:
        """Rename ``src`` (a file under ``root``) into ``quarantine/``; where it went, or ``None``."""
        dst = self._quarantine / f"{src.name}.{time.time_ns()}"
        try:
            make_dirs(self._quarantine, self.dir_mode)
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("disk tier: cannot move %s to %s: %s", src, self._quarantine, e.strerror)
            if unlink_on_failure:
                unlink_quietly(src)
            return None
        if self._durable:
            try:
                fsync_dir(self._quarantine)
                fsync_dir(src.parent)
            except OSError as e:  # the rename happened; only its durability is in doubt
                log.warning("disk tier: cannot fsync after moving %s aside: %s", src, e.strerror)
        return dst

    def close(self) -> None:
        """A scratch (non-durable) tier removes the directories it made once they are empty."""
        if self._durable:
            return
        try:
            subdirs = [d for d in self._blocks.iterdir() if d.is_dir()]
        except OSError:  # gone already: another store sharing the directory (another rank) removed it
            subdirs = []
        for d in [*subdirs, self._blocks, self._tmp]:
            try:
                d.rmdir()
            except OSError:
                pass  # not empty (another store's files, or blocks not freed): leave it

    # -- O_DIRECT -----------------------------------------------------------------------------
    def _bounce(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(mmap.mmap(-1, _BOUNCE))  # page aligned
        return buf

    def _write_direct(self, fd: int, src: memoryview) -> None:
        bounce = self._bounce()
        for off in range(0, src.nbytes, _BOUNCE):
            n = min(_BOUNCE, src.nbytes - off)
            bounce[:n] = src[off:off + n]
            padded = -(-n // _DIRECT_ALIGN) * _DIRECT_ALIGN
            bounce[n:padded] = bytes(padded - n)
            _write_all(fd, bounce[:padded])
        os.ftruncate(fd, src.nbytes)  # drop the padding of the last chunk

    def _read_direct(self, fd: int, out: memoryview) -> int:
        bounce = self._bounce()
        got = 0
        while got < out.nbytes:
            n = os.readv(fd, [bounce])  # O_DIRECT needs an aligned buffer: the caller's rarely is
            if n == 0:
                break
            n = min(n, out.nbytes - got)
            out[got:got + n] = bounce[:n]
            got += n
        return got


def _write_all(fd: int, buf: memoryview) -> None:
    off = 0
    while off < buf.nbytes:
        off += os.write(fd, buf[off:])


def _read_all(fd: int, out: memoryview) -> int:
    """Read the file into ``out``; the bytes read (fewer: the file ended early). A large block is read in
    parts at once (:func:`~cascade_kv.memcopy.in_parts`), as the copy of a block from memory is: one
    thread reading a page-cache hit copies at one core's speed (16 MiB blocks, ``cascade bench``: 4.6 GB/s
    read whole, 6.5 in two parts, against 9-10 for the best of the ceiling's ways)."""
    return sum(in_parts(out.nbytes, _PAGE_ALIGN, lambda a, b: _read_range(fd, out[a:b], a)))


def _read_range(fd: int, out: memoryview, offset: int) -> int:
    got = 0
    while got < out.nbytes:
        n = os.preadv(fd, [out[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def fsync_dir(path: Path) -> None:
    """Make the renames and creations in directory ``path`` durable (power loss, not only a crash)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and any missing parents with exactly ``mode``; existing directories keep theirs."""
    missing = []
    p = Path(path)
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made meanwhile by someone else: theirs, keep its mode
        os.chmod(d, mode)  # mkdir's mode is filtered by the umask


def create_exclusive(dir_fd: int, prefix: str, mode: int, extra_flags: int = 0) -> tuple[int, str]:
    """Create a new file ``prefix<random>.tmp`` under ``dir_fd``, write only, with exactly ``mode``.

    The name is unpredictable and ``O_EXCL|O_NOFOLLOW`` refuse anything already there, so a file or link
    planted in advance is never written through (a predictable name was rejected: it let a link in
    ``tmp/`` redirect the write outside the tier)."""
    name = f"{prefix}{secrets.token_hex(8)}.tmp"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC | extra_flags, mode,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask filtered the mode given to open
    except BaseException:
        os.close(fd)
        unlink_quietly(name, dir_fd)
        raise
    return fd, name


def unlink_quietly(path: Path | str, dir_fd: int | None = None) -> None:
    """Remove a file we no longer need. Failing to (a read-only or failing disk) must not fail the
    operation that no longer needs it: the file is an orphan, removed when a persistent store reopens."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror)


def write_atomically(directory: Path, name: str, data: bytes, mode: int) -> None:
    """Replace ``directory/name`` by ``data``, atomically and durably: a temporary file made by
    :func:`create_exclusive`, fsync, rename over the name, fsync of the directory. Readers see the old
    file or the new one whole; the temporary file is removed if anything fails (OSError)."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
    try:
        fd, tmp = create_exclusive(dir_fd, f"{name}.", mode)
        try:
            try:
                _write_all(fd, memoryview(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            unlink_quietly(tmp, dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_directory(root: Path, mode: int) -> int:
    """Take the exclusive ``flock`` of ``root/LOCK`` (made with exactly ``mode``, never through a link) and
    return its descriptor; closing it, or the process ending, releases the lock. StorageError when the
    file cannot be opened or another process holds the lock; a file system without ``flock`` (some Lustre
    mounts) is only warned about."""
    lock = root / "LOCK"
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, mode)
            os.fchmod(fd, mode)  # the umask filtered the mode given to open
        except FileExistsError:
            fd = os.open(lock, os.O_RDWR | NOFOLLOW | CLOEXEC)
    except OSError as e:
        raise StorageError(e.errno, f"cannot open {lock}: {e.strerror}", str(lock)) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageError(errno.EBUSY, f"{root} is in use by another persistent store or job (its LOCK "
                           f"file is held)", str(root)) from None
    except OSError as e:  # Lustre mounted without flock: nothing to lock with; say so and go on
        log.warning("cannot lock %s (%s); make sure no other store or job opens it", root, e.strerror)
    return fd
