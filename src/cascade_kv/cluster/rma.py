"""One-sided reads of blocks out of peers' arenas, safe against the owner freeing or reusing the slot.

A reader knows where a block lies from the directory: owner rank, header offset,
size, generation and digest prefix (:class:`SlotRef`, built from
``SlotArena.location``). By the time it reads, the owner may have freed the
block, or freed it and written another block over the same bytes: the owner
never waits for readers. A read therefore answers ``True`` (``out`` holds
exactly the block) or ``False`` (stale: ask the directory again); it never
answers ``True`` with another block's bytes.

Why the check is sound (seqlock). Each read, in one passive-target epoch, does

    H1 = Get(header);  Flush;  Get(bytes -> out);  Flush;  H2 = Get(header)

and accepts only when H1 and H2 both carry the expected magic, generation,
size and digest prefix. The owner (:class:`~.slots.SlotArena`) keeps two rules: it writes a block's header *after* its
bytes, and it overwrites the header with a tombstone *before* any byte of the
range can change (``free`` tombstones before the range returns to the
allocator; ``write`` tombstones before copying, so a rewrite in place is
covered too). Generations are never reused, so once the expected header is
gone it never comes back. Then:

* H1 matching means the block's bytes were complete before the read began
  (header written after bytes).
* If any byte the reader copied had already been changed for a later block,
  that change came after the tombstone, so the header read after the copy (H2)
  cannot show the expected generation: the read is rejected. If H2 does match,
  no tombstone was written before H2, so nothing in the range changed during
  the copy.

The one way around it is a later block whose *bytes* reproduce the old header
(magic, generation, size and digest prefix) at exactly that offset; the
digest prefix makes that a deliberate forgery, not an accident. The check
costs two 40-byte Gets per block, where hashing the bytes (BLAKE3, ~7 GB/s
here) would halve a 14 GB/s Get.

Datatypes. Every Get names its origin buffer as ``[buf, MPI.BYTE]``, the target's type. A bare memoryview
is described by mpi4py as ``MPI_UNSIGNED_CHAR``; against a ``BYTE`` target Open MPI's osc/sm then takes a
slower, type-converting copy (a 16 MiB Get measured 2.1-2.2 ms that way, 1.3-1.5 ms as ``BYTE``).

Memory ordering. The argument needs the reader's three reads to happen in that
order, and the owner's stores to become visible in the order it made them.
Reader: the ``Flush`` between phases orders them. On osc/sm (one node) a Get
is a plain copy out of the shared mapping, complete when the call returns, and
``Flush``/``Unlock`` are a full memory barrier (``opal_atomic_mb``); on a
network component Flush is what completes the Gets. ``Win_sync`` is not needed:
osc/sm has MPI's unified memory model, where the owner's plain stores into its
window reach peers without it. Owner: it makes every header store under the
slot arena's lock. On x86-64 the lock's atomic instructions are full fences, so a
tombstone is visible before any later byte (glibc's non-temporal copies also
end in ``sfence``) and a block's bytes before its new header. On a weaker model
(ARMv8) the lock's release/acquire still orders a free's tombstone before the
next allocation's bytes, the case that matters; a block's own bytes are safe
because a reader learns its generation only after the owner told the directory,
an MPI call and so a barrier. Only a rewrite in place of a published block,
which the store never does, could then be read torn.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mpi4py import MPI

from .slots import HEADER_FIELDS, SLOT_HEADER, expected_fields, expected_fields_many
from .window import ARENA_OFFSET, ArenaWindow, epoch, lock_all


@dataclass(frozen=True, slots=True)
class SlotRef:
    """Where one block lies in a peer's arena, as a directory publishes it."""

    rank: int
    """The owner."""
    offset: int
    """Offset of the block's slot header in the owner's arena (``SlotArena.location()[0]``)."""
    nbytes: int
    generation: int
    """The incarnation of the slot that holds the block (``SlotArena.location()[2]``; never 0)."""
    digest16: bytes
    """First 16 bytes of the block id."""


def remote_read(win: ArenaWindow, rank: int, offset: int, nbytes: int, generation: int, digest16: bytes,
                out: memoryview) -> bool:
    """Copy one block from ``rank``'s arena into ``out`` (exactly ``nbytes``, writable, C-contiguous).
    ``False``: the slot no longer holds that block (``out`` then holds garbage); ask the directory again.
    A location outside the owner's arena, generation 0 or a wrong-sized ``out`` raise ``ValueError``."""
    # written out rather than as a batch of one: a 4 KiB read is ~2 us of MPI, and the batch path's
    # bookkeeping would double it
    view = _checked(win, rank, offset, nbytes, out)
    want = expected_fields(generation, nbytes, digest16)
    first, again = bytearray(HEADER_FIELDS), bytearray(HEADER_FIELDS)
    disp = ARENA_OFFSET + offset
    with epoch(win, rank) as w:
        w.Get([first, MPI.BYTE], rank, (disp, HEADER_FIELDS, MPI.BYTE))
        w.Flush(rank)
        if nbytes:
            w.Get([view, MPI.BYTE], rank, (disp + SLOT_HEADER, nbytes, MPI.BYTE))
        w.Flush(rank)
        w.Get([again, MPI.BYTE], rank, (disp, HEADER_FIELDS, MPI.BYTE))
    return first == want and again == want  # the epoch's end completed the last Get


BATCH_TYPES_FROM = 4
"""A batch with at least this many blocks on one rank reads them with one ``Get`` per phase through a derived
datatype (``hindexed``) instead of one ``Get`` per block: measured here for 64 blocks, the headers phase takes
5 us instead of 45-52 us and the bytes of 4 KiB blocks 33 us instead of 43 us. Below it, the types' creation
costs more than the calls it saves."""
TYPED_BLOCK_MAX = 8 << 10
"""Blocks larger than this are read with a ``Get`` each even in a typed batch: a datatype's copy goes through
Open MPI's convertor (see "Datatypes" above). Measured here, 64 blocks in one epoch: 4 KiB typed 93 us, a Get
each 98 us; 16 KiB the same either way (~200 us); 64 KiB typed ~500 us, a Get each ~467 us."""


def remote_read_many(win: ArenaWindow, refs: Sequence[SlotRef], outs: Sequence[memoryview]) -> list[bool]:
    """:func:`remote_read` for many blocks on one or several ranks, in one ``Lock_all`` epoch: each of the
    three phases (headers, bytes, headers again) covers the whole batch, with one ``Flush_all`` between.
    The blocks a rank holds many of are read through derived datatypes (:data:`BATCH_TYPES_FROM`)."""
    if len(refs) != len(outs):
        raise ValueError(f"remote read: {len(refs)} locations, {len(outs)} buffers")
    if not refs:
        return []
    views = [_checked(win, ref.rank, ref.offset, ref.nbytes, out) for ref, out in zip(refs, outs)]
    f = HEADER_FIELDS
    by_rank: dict[int, list[int]] = {}
    for i, ref in enumerate(refs):
        by_rank.setdefault(ref.rank, []).append(i)
    # headers land rank by rank, so a rank's headers are one contiguous run of the buffers
    order = [i for idx in by_rank.values() for i in idx]
    want = expected_fields_many([(refs[i].generation, refs[i].nbytes, refs[i].digest16) for i in order])  # before any Get: a bad ref raises with nothing read
    first, again = memoryview(bytearray(len(refs) * f)), memoryview(bytearray(len(refs) * f))
    types: list[MPI.Datatype] = []
    try:
        plan = _plan(refs, views, by_rank, types)
        with lock_all(win) as w:
            _headers(w, refs, by_rank, plan, first)
            w.Flush_all()
            for rank, (_, typed, loose) in plan.items():
                if typed is not None:
                    w.Get([MPI.BOTTOM, 1, typed[0]], rank, (0, 1, typed[1]))
                for i in loose:
                    w.Get([views[i], MPI.BYTE], rank, (ARENA_OFFSET + refs[i].offset + SLOT_HEADER, refs[i].nbytes,
                                                      MPI.BYTE))
            w.Flush_all()
            _headers(w, refs, by_rank, plan, again)
    finally:
        for t in types:
            t.Free()
    if first == want and again == want:  # the common case: one comparison for the batch
        return [True] * len(refs)
    good = [False] * len(refs)
    for k, i in enumerate(order):
        span = slice(k * f, (k + 1) * f)
        good[i] = first[span] == want[span] and again[span] == want[span]
    return good


def _plan(refs: Sequence[SlotRef], views: list[memoryview], by_rank: dict[int, list[int]],
          types: list[MPI.Datatype]) -> dict[int, tuple[MPI.Datatype | None, tuple[MPI.Datatype, MPI.Datatype] | None,
                                                      list[int]]]:
    """Per rank: the headers' target type (None: a Get each), the bytes' (origin, target) types for the blocks
    read through them, and the blocks read with a Get each. Every type made is appended to ``types``."""
    plan = {}
    for rank, idx in by_rank.items():
        if len(idx) < BATCH_TYPES_FROM:
            plan[rank] = (None, None, [i for i in idx if refs[i].nbytes])
            continue
        header = MPI.BYTE.Create_hindexed_block(HEADER_FIELDS, [ARENA_OFFSET + refs[i].offset for i in idx])
        types.append(header)
        header.Commit()
        small = [i for i in idx if 0 < refs[i].nbytes <= TYPED_BLOCK_MAX]
        typed = None
        if len(small) >= BATCH_TYPES_FROM:
            lengths = [refs[i].nbytes for i in small]
            origin = MPI.BYTE.Create_hindexed(lengths, [MPI.Get_address(views[i]) for i in small])
            types.append(origin)
            target = MPI.BYTE.Create_hindexed(lengths, [ARENA_OFFSET + refs[i].offset + SLOT_HEADER for i in small])
            types.append(target)
            origin.Commit()
            target.Commit()
            typed = (origin, target)
            loose = [i for i in idx if refs[i].nbytes > TYPED_BLOCK_MAX]
        else:
            loose = [i for i in idx if refs[i].nbytes]
        plan[rank] = (header, typed, loose)
    return plan


def _headers(w: MPI.Win, refs: Sequence[SlotRef], by_rank: dict[int, list[int]], plan: dict, into: memoryview) -> None:
    f, k = HEADER_FIELDS, 0
    for rank, idx in by_rank.items():
        header = plan[rank][0]
        if header is not None:
            w.Get([into[k * f:(k + len(idx)) * f], MPI.BYTE], rank, (0, 1, header))
        else:
            for j, i in enumerate(idx):
                w.Get([into[(k + j) * f:(k + j + 1) * f], MPI.BYTE], rank, (ARENA_OFFSET + refs[i].offset, f, MPI.BYTE))
        k += len(idx)


def _checked(aw: ArenaWindow, rank: int, offset: int, nbytes: int, out: memoryview) -> memoryview:
    """``out`` as flat bytes, after checking that the slot lies inside its owner's arena: a Get outside a
    window is undefined behaviour in MPI (on osc/sm, a copy out of whatever memory lies there)."""
    if not 0 <= rank < aw.size:
        raise ValueError(f"remote read: rank {rank} is not in a communicator of {aw.size}")
    cap = aw.capacities[rank]
    if offset < 0 or nbytes < 0 or offset + SLOT_HEADER + nbytes > cap:
        raise ValueError(f"remote read: slot at {offset} + {SLOT_HEADER} + {nbytes} B lies outside "
                         f"rank {rank}'s {cap} B arena")
    view = out if type(out) is memoryview else memoryview(out)
    if view.readonly:
        raise ValueError("remote read: output buffer is read-only")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # raises TypeError for a buffer that is not C-contiguous
    if view.nbytes != nbytes:
        raise ValueError(f"remote read: block is {nbytes} B, buffer is {view.nbytes} B")
    return view
