"""Each rank's host arena as an MPI window, and the epochs that scope one-sided access to it.

The window is made by ``MPI.Win.Allocate``, not by ``Win.Create`` over an arena
the tier mapped itself: only memory MPI allocates can go to Open MPI's osc/sm
component on one node, where a passive-target Get is a plain copy out of a
shared mapping and so progresses while the owner computes. Over memory from
``Win.Create`` a Get waits for the owner to enter MPI.

Layout of every rank's window (displacement unit 1 byte)::

    0              one page: window header (magic, layout version, arena capacity); at 64 the owner's
                   room (largest free hole, evictable bytes), rewritten as it changes; at 128 the count
                   of bounded collective waits the owner has entered; rest zero
    BINDINGS_OFFSET  the binding versions of the keys this rank is home for: BINDING_BUCKETS pairs of
                   u64 (version, its complement), see :meth:`ArenaWindow.bump_binding`
    arena_offset   the arena: ``capacity`` bytes, rounded up to whole pages, handed to a SlotArena

The header page lets a peer check what a displacement points into (:meth:`ArenaWindow.describe`);
page rounding keeps every rank's arena page aligned, since osc/sm lays the ranks' memory end to end
in one shared segment.

Every epoch is a ``with``: ``with epoch(aw, rank) as win: win.Get(...)``; a bare Lock/Unlock pair
would leave the target locked if the Get raised, and every later epoch on it would hang.
"""
from __future__ import annotations

import mmap
import struct
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from mpi4py import MPI

from ..errors import PeerTimeout

_PAGE = mmap.PAGESIZE
_MAGIC = int.from_bytes(b"CKVARENA", "little")
_VERSION = 2
_WINDOW_HEADER = struct.Struct("<QQQQ")  # magic, version, arena capacity, arena offset
_ROOM = struct.Struct("<QQ")  # largest free hole, evictable bytes: what a peer with victims to place reads
_ROOM_OFFSET = 64  # its own cache line in the header page
_ARRIVALS = struct.Struct("<Q")  # bounded collective waits this rank has entered (see ArenaWindow.arrive)
_ARRIVALS_OFFSET = 128



def _round_page(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


BINDING_BUCKETS = 4096
"""Buckets of key-binding versions a rank publishes for the keys it is home for. A key's bucket is a hash of
the key (:func:`~.bindings.route`); its version moves whenever a key of that bucket is bound, rebound or
unbound there. A reader that remembers a key's record with the version it read before asking for it knows,
by reading the version again one-sidedly, that no key of the bucket changed since: the record still holds,
and the home need not be asked (:mod:`.bindings`). More buckets make a change to one key invalidate fewer
others' records, at 16 B each in every rank's window (64 KiB here)."""
BINDING = struct.Struct("<QQ")
"""One bucket: its version, then the version's complement. A Get is a plain copy, not an atomic read: a read
torn by the owner's update shows a pair that does not complement, and is not taken for a version."""
BINDINGS_OFFSET = _PAGE
"""Displacement of the binding versions in every rank's window."""
ARENA_OFFSET = _PAGE + _round_page(BINDING_BUCKETS * BINDING.size)
"""Displacement of the arena in every rank's window (the header page and the binding versions come first)."""
_U64_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class WindowInfo:
    """What a rank's window header says (read one-sidedly by :meth:`ArenaWindow.describe`)."""

    rank: int
    version: int
    capacity: int
    arena_offset: int


class _Epoch:
    """What both epoch kinds share: take the process's turn on the window, open the epoch, and on exit
    close it and give the turn back, even when the body raises. Subclasses say how to lock and unlock."""

    __slots__ = ("_aw",)

    def __init__(self, aw: ArenaWindow) -> None:
        self._aw = aw

    def _lock(self, win: MPI.Win) -> None:
        raise NotImplementedError

    def _unlock(self, win: MPI.Win) -> None:
        raise NotImplementedError

    def __enter__(self) -> MPI.Win:
        win = self._aw.win
        self._aw.access.acquire()
        try:
            self._lock(win)
        except BaseException:
            self._aw.access.release()
            raise
        return win

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._unlock(self._aw.win)
        finally:
            self._aw.access.release()


class epoch(_Epoch):  # lower case: it reads as the statement it scopes, `with epoch(win, rank):`
    """A passive-target access epoch on one target of an arena window: ``Lock`` on entry, ``Unlock``
    on exit, even when the body raises; yields the ``MPI.Win``. ``shared=False`` locks exclusively.

    Epochs of one process on one window take turns (:attr:`ArenaWindow.access`): MPI forbids a process
    two epochs at once on the same target, and Open MPI answers a second thread's ``Lock`` with
    MPI_ERR_RMA_SYNC. One ``Lock_all`` epoch held for the window's life, shared by every thread, was
    rejected for now: it would let threads copy in parallel, but epochs would no longer be scoped.

    A class rather than ``@contextmanager``: it is entered once per remote read, and a generator-based
    manager costs a few microseconds, as much as a 4 KiB Get."""

    __slots__ = ("_rank", "_type")

    def __init__(self, aw: ArenaWindow, rank: int, *, shared: bool = True) -> None:
        super().__init__(aw)
        self._rank = rank
        self._type = MPI.LOCK_SHARED if shared else MPI.LOCK_EXCLUSIVE

    def _lock(self, win: MPI.Win) -> None:
        win.Lock(self._rank, self._type)

    def _unlock(self, win: MPI.Win) -> None:
        win.Unlock(self._rank)


class lock_all(_Epoch):
    """A shared passive-target epoch on every rank at once (``Lock_all``/``Unlock_all``), for batches
    that read from several ranks: one epoch, many Gets, ``Flush_all`` where the order matters. Takes
    turns with the process's other epochs on the window, as :class:`epoch` does."""

    __slots__ = ()

    def _lock(self, win: MPI.Win) -> None:
        win.Lock_all()

    def _unlock(self, win: MPI.Win) -> None:
        win.Unlock_all()


def _hints(same_size: bool) -> MPI.Info:
    """Creation hints. Open MPI 5 acts on ``alloc_shared_noncontig`` and echoes only that one back;
    the others are standard MPI hints that cost nothing where they are ignored. ``no_locks`` is not
    set: passive-target epochs are the point of the window."""
    info = MPI.Info.Create()
    info.Set("alloc_shared_noncontig", "false")  # one segment, ranks end to end (each rounded to pages)
    info.Set("same_disp_unit", "true")
    info.Set("same_size", "true" if same_size else "false")
    info.Set("accumulate_ordering", "none")  # no accumulates are ever issued on this window
    return info


class ArenaWindow:
    """This rank's host arena, exposed to every rank of ``comm`` as one MPI window.

    Creation and :meth:`close` are collective over ``comm``. Ranks may ask for different capacities.
    """

    def __init__(self, comm: MPI.Comm, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"arena window: capacity must be an int >= 0, got {capacity!r}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.capacity = capacity
        self.capacities: tuple[int, ...] = tuple(comm.allgather(capacity))
        """Every rank's arena capacity, so a reader bounds-checks a location without asking its owner."""
        self.access = threading.Lock()
        """Held by this process's open epoch on the window (see :class:`epoch`)."""
        info = _hints(same_size=len(set(self.capacities)) == 1)
        try:
            self.win: MPI.Win = MPI.Win.Allocate(ARENA_OFFSET + _round_page(capacity), 1, info, comm)
        finally:
            info.Free()
        self._buffer: MPI.buffer | None = self.win.tomemory()
        whole = memoryview(self._buffer)  # type: ignore[arg-type]  # mpi4py buffer: writable bytes
        _WINDOW_HEADER.pack_into(whole, 0, _MAGIC, _VERSION, capacity, ARENA_OFFSET)
        whole.release()
        self._room: memoryview | None = memoryview(self._buffer)[_ROOM_OFFSET:_ROOM_OFFSET + _ROOM.size]  # type: ignore[arg-type]
        self._bindings: memoryview | None = self._bindings_view()
        self._bindings[1::2] = memoryview(bytes(b"\xff" * 8 * BINDING_BUCKETS)).cast("Q")  # version 0, complemented
        self._arrivals = 0
        self._memory: memoryview | None = self._arena_view()
        comm.Barrier()  # every header is written before any peer can describe() it

    def _whole(self) -> memoryview:
        """The window's memory, header page included (its buffer goes at :meth:`close`)."""
        if self._buffer is None:
            raise ValueError("arena window is closed")
        return memoryview(self._buffer)  # type: ignore[arg-type]  # mpi4py buffer: writable bytes

    def _bindings_view(self) -> memoryview:
        return self._whole()[BINDINGS_OFFSET:BINDINGS_OFFSET + BINDING_BUCKETS * BINDING.size].cast("Q")

    def bump_binding(self, bucket: int) -> None:
        """A key of ``bucket`` homed here was bound, rebound or unbound: move the bucket's version. Called by
        the directory under its lock, so bumps of one bucket never interleave, and *before* the lookup that
        could see the change is answered. The version is written before its complement: a reader between the
        two stores sees a pair that does not complement."""
        b = self._bindings
        if b is None:
            return  # closing: no reader is left to tell
        version = (b[2 * bucket] + 1) & _U64_MASK
        b[2 * bucket] = version
        b[2 * bucket + 1] = version ^ _U64_MASK

    def binding(self, bucket: int) -> int | None:
        """This rank's version of ``bucket`` (a local read; None while an update is half written)."""
        if self._bindings is None:
            raise ValueError("arena window is closed")
        version, check = self._bindings[2 * bucket], self._bindings[2 * bucket + 1]
        return version if version ^ check == _U64_MASK else None

    def _reopen_views(self) -> None:
        """After a close that did not free the window: its views again, so it stays usable."""
        self._memory = self._arena_view()
        self._room = self._whole()[_ROOM_OFFSET:_ROOM_OFFSET + _ROOM.size]
        self._bindings = self._bindings_view()

    def _arena_view(self) -> memoryview:
        return self._whole()[ARENA_OFFSET:ARENA_OFFSET + self.capacity]

    @property
    def memory(self) -> memoryview:
        """The arena's bytes (writable, page aligned): pass as ``SlotArena(capacity, buffer)``."""
        if self._memory is None:
            raise ValueError("arena window is closed")
        return self._memory

    @property
    def closed(self) -> bool:
        return self._memory is None

    def set_room(self, largest_hole: int, evictable: int) -> None:
        """Publish this rank's room for peers choosing where to move a victim. Advisory: a peer may read
        it mid-update or stale, and the rank it picks still checks when asked to take the block."""
        if self._room is not None:
            _ROOM.pack_into(self._room, 0, largest_hole, evictable)

    def room(self) -> tuple[int, int]:
        """This rank's ``(largest free hole, evictable bytes)`` as published (a local read, for checks)."""
        if self._room is None:
            raise ValueError("arena window is closed")
        return _ROOM.unpack_from(self._room, 0)

    def rooms(self) -> list[tuple[int, int]]:
        """Every rank's ``(largest free hole, evictable bytes)``: one 16-byte Get per rank, one epoch."""
        buf = bytearray(_ROOM.size * self.size)
        view = memoryview(buf)
        with lock_all(self) as win:
            for r in range(self.size):
                win.Get([view[r * _ROOM.size:(r + 1) * _ROOM.size], MPI.BYTE], r, (_ROOM_OFFSET, _ROOM.size, MPI.BYTE))
        return [_ROOM.unpack_from(buf, r * _ROOM.size) for r in range(self.size)]

    def arrive(self) -> int:
        """Count one more bounded collective wait entered by this rank (a barrier, :meth:`close`) and publish
        the count in the header page; the count. Every rank enters the same waits in the same order, so a
        rank that timed out names the ranks whose count is lower (:meth:`missing`): they did not arrive."""
        with self._whole() as whole:
            _ARRIVALS.pack_into(whole, _ARRIVALS_OFFSET, self._arrivals + 1)
        self._arrivals += 1
        return self._arrivals

    def missing(self, count: int) -> list[int]:
        """The ranks that have not yet entered the ``count``-th bounded wait: one 8-byte Get per rank, read
        one-sidedly, so a rank stuck elsewhere (even holding the GIL) is still read on osc/sm."""
        buf = bytearray(_ARRIVALS.size * self.size)
        view = memoryview(buf)
        with lock_all(self) as win:
            for r in range(self.size):
                win.Get([view[r * _ARRIVALS.size:(r + 1) * _ARRIVALS.size], MPI.BYTE], r,
                        (_ARRIVALS_OFFSET, _ARRIVALS.size, MPI.BYTE))
        return [r for r in range(self.size) if _ARRIVALS.unpack_from(buf, r * _ARRIVALS.size)[0] < count]

    def describe(self, rank: int) -> WindowInfo:
        """Read ``rank``'s window header one-sidedly (a check of the layout, not a hot path)."""
        buf = bytearray(_WINDOW_HEADER.size)
        with epoch(self, rank) as win:
            win.Get([buf, MPI.BYTE], rank, (0, len(buf), MPI.BYTE))
        magic, version, capacity, offset = _WINDOW_HEADER.unpack(buf)
        if magic != _MAGIC:
            raise ValueError(f"arena window: rank {rank}'s window holds no arena header (magic {magic:#x})")
        return WindowInfo(rank, version, capacity, offset)

    def close(self, timeout: float | None = None) -> None:
        """Free the window on every rank (collective; a second call does nothing).

        The arena built on :attr:`memory` must be closed first, and no view of it kept: freeing unmaps
        the memory, and a view that outlived it would crash the process on its next access. A rank that
        still holds one makes every rank raise ``BufferError`` instead, with the window left open.
        ``timeout`` (seconds) bounds the wait for the other ranks: past it,
        :class:`~cascade_kv.errors.PeerTimeout` (a ``TimeoutError``) naming the ranks that did not arrive,
        and the window stays allocated (a leak, where the alternative is waiting forever for a rank that died)."""
        if self._memory is None:
            return
        arrival = self.arrive()
        # Every view of the arena, however derived (numpy arrays, memoryview slices), holds the one
        # buffer our memoryview took from mpi4py's, and with it a reference to that object: once ours
        # is released, a count above the baseline means a view is still alive. memoryview.release()
        # alone was rejected: numpy's frombuffer does not keep an export on the view it was given.
        try:
            if self._room is not None:
                self._room.release()
                self._room = None
            if self._bindings is not None:
                self._bindings.release()
                self._bindings = None
            self._memory.release()
            held = sys.getrefcount(self._buffer) > 2  # the attribute, and getrefcount's argument
        except BufferError:  # something holds a buffer taken from our view itself
            held = True
        # decided together: a rank that skipped Win.Free would leave the others waiting in it forever
        mine = np.zeros(self.size, np.int8)
        mine[self.rank] = held
        every = np.empty_like(mine)
        request = self.comm.Iallreduce(mine, every, MPI.MAX)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not request.Test():
            if deadline is not None and time.monotonic() > deadline:
                self._reopen_views()
                raise PeerTimeout(f"arena window: rank {self.rank} waited {timeout:g} s in close(); rank(s) "
                                  f"{self.missing(arrival)} did not arrive; the window stays allocated")
            time.sleep(1e-3)
        holders = every.tolist()
        if any(holders):
            self._reopen_views()  # the window stays open and usable
            raise BufferError(f"arena window: ranks {[r for r, h in enumerate(holders) if h]} still hold views "
                              "of their arena; close the slot arena and drop its views before the window")
        self._memory = None
        self._buffer = None
        self.win.Free()

    def __enter__(self) -> ArenaWindow:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<ArenaWindow rank {self.rank}/{self.size} {state}>"
