"""Remote reads against their ceiling: a checked ``remote_read`` beside a bare mpi4py Get.

Rank 1 owns a slot-headed host tier on its arena window; rank 0 reads the same
blocks out of it both ways, into the same touched buffers, the two kinds taking
turns read by read so both see the same machine. Each size cycles through
enough blocks (64 MiB of them) that neither side's working set stays in the
last-level cache. The bare Get is the ceiling: one passive-target
epoch and one Get of the block's bytes, nothing checked. ``remote_read`` adds
the two header Gets and the Flushes of its seqlock check. Other ranks idle.

``python -m cascade_kv.bench.rma`` runs it as two local ranks (through the
project's own ``mpiexec``); under a launcher (``mpiexec -n 2 python -m
cascade_kv.bench.rma``, ``srun``) it runs in the ranks it was given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..config import format_size, parse_size
from ..hashing import Hasher
from ..ids import BlockId
from .ceilings import Contents, Spread, touch

if TYPE_CHECKING:
    from mpi4py import MPI

    from ..cluster.slots import SlotArena
    from ..cluster.window import ArenaWindow

MiB = 1 << 20
TARGET_RATIO = 0.8
_READER, _OWNER = 0, 1
_BYTES_PER_REP = 256 * MiB  # each pass reads at least this much (16 reads of 16 MiB, 65536 of 4 KiB)
_WORKING_SET = 64 * MiB  # per size, on each side: twice this machine's 32 MiB L3
_MAX_BLOCKS = 64


def _blocks_for(n: int) -> int:
    return max(1, min(_MAX_BLOCKS, _WORKING_SET // n))


def run_rma_bench(comm: MPI.Comm, sizes: Sequence[int] = (16 * MiB,), reps: int = 5) -> dict[str, object]:
    """Collective over ``comm`` (2 ranks or more). Every rank gets the figures: per size, the bare Get's
    and ``remote_read``'s bandwidth (GB/s; median and range over the single reads of ``reps`` passes),
    and the ratio of the medians."""
    # imported here and in _measure, not at the top: importing mpi4py.MPI initialises MPI, which
    # `python -m cascade_kv.bench.rma` started by hand must not do before it relaunches under mpiexec
    from ..cluster.slots import SLOT_HEADER, SlotArena
    from ..cluster.window import ArenaWindow

    if comm.Get_size() < 2:
        raise ValueError(f"rma bench: needs 2 ranks or more, got {comm.Get_size()}")
    if reps < 1 or any(n <= 0 or n % 8 for n in sizes):
        raise ValueError(f"rma bench: reps must be >= 1 and sizes positive multiples of 8, got {reps}, {sizes}")
    rank = comm.Get_rank()
    capacity = sum(_blocks_for(n) * (n + 2 * SLOT_HEADER) for n in sizes) if rank == _OWNER else 0
    with ArenaWindow(comm, capacity) as aw:
        tier = SlotArena(aw.capacity, aw.memory)
        try:
            where = comm.bcast(_publish(tier, sizes) if rank == _OWNER else None, root=_OWNER)
            figures = {}
            if rank == _READER:
                figures = {str(n): _measure(aw, n, seed, slots, reps)
                           for seed, (n, slots) in enumerate(zip(sizes, where))}
            figures = comm.bcast(figures, root=_READER)
            comm.Barrier()  # the owner keeps its blocks until the reader is done
        finally:
            tier.close()
    return {"ranks": comm.Get_size(), "reps": reps, "sizes": figures}


Slot = tuple[int, int, int, bytes]  # header offset, nbytes, generation, digest prefix: what a directory says


def _publish(tier: SlotArena, sizes: Sequence[int]) -> list[list[Slot]]:
    """The owner's side: store each size's blocks (contents seeded by the size's index); where they lie."""
    from ..cluster.slots import digest16_of

    hasher = Hasher("blake3")
    where = []
    for seed, n in enumerate(sizes):
        contents, slots = Contents(n, seed=seed), []
        for j in contents.new_ids(_blocks_for(n)):
            data = contents.fill(j, np.empty(n, np.uint8))
            bid = BlockId(hasher.digest(memoryview(data)))
            assert tier.allocate(bid, n)
            tier.write(bid, memoryview(data))
            slots.append((*tier.location(bid), digest16_of(bid)))
        where.append(slots)
    return where


def _measure(aw: ArenaWindow, n: int, seed: int, slots: list[Slot], reps: int) -> dict[str, object]:
    """The reader's side for one size: both kinds of read over the same blocks into the same buffers."""
    from mpi4py import MPI

    from ..cluster.rma import remote_read
    from ..cluster.slots import SLOT_HEADER
    from ..cluster.window import ARENA_OFFSET, epoch

    outs = [memoryview(touch(np.empty(n, np.uint8))) for _ in slots]
    count = max(2 * len(slots), _BYTES_PER_REP // n)  # even: both kinds read every block
    cycle = [(slots[k % len(slots)], outs[k % len(slots)]) for k in range(count)]

    def bare(slot: Slot, out: memoryview) -> bool:
        with epoch(aw, _OWNER) as win:
            win.Get([out, MPI.BYTE], _OWNER, (ARENA_OFFSET + slot[0] + SLOT_HEADER, n, MPI.BYTE))
        return True

    def checked(slot: Slot, out: memoryview) -> bool:
        offset, nbytes, generation, digest16 = slot
        return remote_read(aw, _OWNER, offset, nbytes, generation, digest16, out)

    # The two kinds take turns read by read, on neighbouring blocks (so neither reads what the other
    # just brought into the cache), and swap places every rep; the figure is the median over single
    # reads. A burst of load from a neighbour then lands on both kinds alike and moves neither median.
    # Timing whole passes of one kind, then the other, was rejected: on a shared two-core machine one
    # burst moved a single pass by 2x.
    kinds = {"bare_get": bare, "remote_read": checked}
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for rep in range(reps + 1):  # rep 0 warms up and is not kept
        order = list(kinds) if rep % 2 else list(kinds)[::-1]
        for k, (slot, out) in enumerate(cycle):
            name = order[k % 2]
            t0 = time.perf_counter()
            fresh = kinds[name](slot, out)
            dt = time.perf_counter() - t0
            if not fresh:
                raise RuntimeError("rma bench: remote_read of a block nobody touches answered stale")
            if rep:
                rates[name].append(n / dt / 1e9)
    contents = Contents(n, seed=seed)
    if not all([contents.check(j, np.frombuffer(out, np.uint8)) for j, out in enumerate(outs)]):  # all counted
        raise RuntimeError(f"rma bench: {contents.wrong} of {len(outs)} blocks of {format_size(n)} read back wrong")
    bare_rate, read_rate = Spread.of(rates["bare_get"]), Spread.of(rates["remote_read"])
    return {"bytes": n, "blocks": len(slots), "reads_per_rep": len(cycle),
            "bare_get_GBps": bare_rate.as_dict(), "remote_read_GBps": read_rate.as_dict(),
            "ratio": read_rate.median / bare_rate.median}


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cascade_kv.bench.rma", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="local ranks to start when no launcher started us")
    parser.add_argument("--sizes", default="16MiB", help="comma-separated block sizes (default 16MiB)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before local ranks are killed")
    args = parser.parse_args(argv)
    sizes = [parse_size(s.strip(), "--sizes") for s in args.sizes.split(",")]

    from ..cluster.launch import launched_as, run_mpi
    if launched_as() is None:  # started by hand: run again as local ranks, and pass their output on
        done = run_mpi(args.ranks, [sys.executable, "-m", "cascade_kv.bench.rma", *argv], args.timeout)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        return done.returncode

    from mpi4py import MPI
    result = run_rma_bench(MPI.COMM_WORLD, sizes, args.reps)
    if MPI.COMM_WORLD.Get_rank() == _READER:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"remote read, rank {_READER} <- rank {_OWNER}, {result['ranks']} ranks, median over the reads "
                  f"of {args.reps} passes "
                  f"(target: remote_read >= {TARGET_RATIO}x bare Get)")
            for fig in result["sizes"].values():  # type: ignore[union-attr]
                bare, checked = fig["bare_get_GBps"], fig["remote_read_GBps"]
                verdict = "ok" if fig["ratio"] >= TARGET_RATIO else "BELOW TARGET"
                print(f"  {format_size(fig['bytes']):>10}  bare Get {bare['median']:6.2f} GB/s "
                      f"[{bare['min']:.2f}-{bare['max']:.2f}]  remote_read {checked['median']:6.2f} GB/s "
                      f"[{checked['min']:.2f}-{checked['max']:.2f}]  ratio {fig['ratio']:.3f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
