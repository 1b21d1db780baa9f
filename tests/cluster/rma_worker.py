"""The rank side of tests/cluster/test_rma.py: ``mpiexec -n N python rma_worker.py SCENARIO``.

Each scenario checks its invariants on every rank, agrees on the verdict with a collective, and has
rank 0 print one ``RESULT {json}`` line for the test to read. Any exception aborts the whole job (a
rank left waiting in a collective would otherwise hang until the test's timeout).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import traceback

import numpy as np
from mpi4py import MPI

from cascade_kv.cluster.rma import BATCH_TYPES_FROM, SlotRef, remote_read, remote_read_many
from cascade_kv.cluster.slots import SlotArena, digest16_of
from cascade_kv.cluster.window import ARENA_OFFSET, ArenaWindow
from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId

MiB = 1 << 20
HASHER = Hasher("blake3")
comm = MPI.COMM_WORLD


def digest(data: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    return bytes(HASHER.digest(memoryview(data).cast("B")))


def put(tier: SlotArena, data: bytes, bid: BlockId | None = None) -> tuple[SlotRef, bytes]:
    """Store ``data`` (as a new block, or rewritten into ``bid``); its published location and digest."""
    if bid is None:
        bid = BlockId(digest(data))
        assert tier.allocate(bid, len(data)), f"no room for {len(data)} B"
    tier.write(bid, memoryview(data))
    offset, nbytes, generation = tier.location(bid)
    assert generation > 0 and nbytes == len(data)
    return SlotRef(comm.rank, offset, nbytes, generation, digest16_of(bid)), digest(data)


def read(aw: ArenaWindow, ref: SlotRef) -> tuple[bool, bytes]:
    out = bytearray(ref.nbytes)
    ok = remote_read(aw, ref.rank, ref.offset, ref.nbytes, ref.generation, ref.digest16, memoryview(out))
    return ok, bytes(out)


def osc_mappings() -> list[str]:
    """The window segments (osc/sm) this process still maps."""
    with open("/proc/self/maps") as f:
        return [line.split()[5] for line in f if "osc_sm" in line]


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


def mapped_shm_files() -> list[str]:
    """The /dev/shm files this process maps (Open MPI's shared-memory segments)."""
    with open("/proc/self/maps") as f:
        fields = [line.split() for line in f]
    return sorted({f[5] for f in fields if len(f) >= 6 and f[5].startswith("/dev/shm/")})


def close_checked(aw: ArenaWindow, shm_before: set[str]) -> dict[str, object]:
    """Close the window and report what it left: new /dev/shm entries of the window kind, live mappings."""
    aw.close()
    aw.close()  # idempotent
    new = sorted(n for n in shm_names() - shm_before if "osc" in n)
    return {"shm_left": comm.allgather(new), "osc_maps_left": comm.allgather(osc_mappings()),
            "shm_files": comm.allgather(mapped_shm_files())}


def agree(ok: bool) -> bool:
    return comm.allreduce(bool(ok), op=MPI.LAND)


# ------------------------------------------------------------------------------------------------ basic
def basic() -> dict[str, object]:
    """Rank 0 owns, rank 1 reads: round trips, then stale reads after free, reuse and rewrite."""
    assert comm.size == 2
    owner, reader = 0, 1
    rng = np.random.default_rng(7)
    shm_before = shm_names()
    aw = ArenaWindow(comm, 8 * MiB)
    osc_while_open = osc_mappings()
    tier = SlotArena(aw.capacity, aw.memory)
    checks: dict[str, object] = {"osc_mapped_while_open": bool(osc_while_open)}

    sizes = [0, 1, 63, 64, 4096, 100_000, MiB + 3]
    published = comm.bcast([put(tier, rng.bytes(n)) for n in sizes] if comm.rank == owner else None, root=owner)
    if comm.rank == reader:
        checks["layout"] = aw.describe(owner).arena_offset == ARENA_OFFSET and aw.describe(owner).capacity == 8 * MiB
        results = [read(aw, ref) for ref, _ in published]
        checks["single_ok"] = all(ok and digest(out) == d for (ok, out), (_, d) in zip(results, published))
        outs = [np.full(ref.nbytes, 0xA5, dtype=np.uint8) for ref, _ in published]
        oks = remote_read_many(aw, [ref for ref, _ in published], [memoryview(o) for o in outs])
        checks["many_ok"] = all(oks) and all(digest(o) == d for o, (_, d) in zip(outs, published))
        ref4k = published[4][0]
        typed = np.zeros(1024, dtype=np.float32)
        checks["typed_out"] = (remote_read(aw, owner, ref4k.offset, 4096, ref4k.generation, ref4k.digest16,
                                           memoryview(typed)) and digest(typed) == published[4][1])
        forged = SlotRef(owner, ref4k.offset, 4096, ref4k.generation, bytes(16))
        checks["wrong_digest_refused"] = remote_read_many(aw, [forged], [memoryview(bytearray(4096))]) == [False]
        wrong_size = SlotRef(owner, ref4k.offset, 4095, ref4k.generation, ref4k.digest16)
        checks["wrong_size_refused"] = remote_read_many(aw, [wrong_size], [memoryview(bytearray(4095))]) == [False]
        for bad, buf in [(SlotRef(owner, 8 * MiB - 64, 1, 1, bytes(16)), bytearray(1)),
                         (SlotRef(owner, 0, 10, 1, bytes(16)), bytearray(9)),
                         (SlotRef(owner, 0, 10, 0, bytes(16)), bytearray(10)),
                         (SlotRef(5, 0, 10, 1, bytes(16)), bytearray(10))]:
            try:
                remote_read_many(aw, [bad], [memoryview(buf)])
                checks[f"raises {bad}"] = False
            except ValueError:
                pass
        checks["threads_share_the_window"] = threaded_reads(aw, published)
        # a reader may read its own rank's window too
        own, own_digest = put(tier, rng.bytes(5000))
        ok, out = read(aw, own)
        checks["self_read"] = ok and digest(out) == own_digest
    comm.Barrier()

    # stale 1: the owner frees a block; the reader still has its location
    freed_ref, _ = published[5]
    if comm.rank == owner:
        tier.free(_id_at(tier, freed_ref))
    comm.Barrier()
    if comm.rank == reader:
        checks["freed_refused"] = read(aw, freed_ref)[0] is False

    # stale 2: the owner frees a block and puts another of the same size in its very slot
    old_ref, old_digest = published[4]
    new = None
    if comm.rank == owner:
        tier.free(_id_at(tier, old_ref))
        new = put(tier, rng.bytes(4096))
        checks["slot_reused"] = new[0].offset == old_ref.offset
    new_ref, new_digest = comm.bcast(new, root=owner)
    if comm.rank == reader:
        ok, out = read(aw, old_ref)
        checks["reused_refused"] = ok is False
        checks["reused_never_other_bytes"] = not ok or digest(out) == old_digest
        ok, out = read(aw, new_ref)
        checks["new_block_ok"] = ok and digest(out) == new_digest
    comm.Barrier()

    # stale 3: the owner rewrites a block in place (new bytes, same id): the old generation is gone
    rewritten = None
    if comm.rank == owner:
        rewritten = put(tier, rng.bytes(4096), bid=_id_at(tier, new_ref))
    re_ref, re_digest = comm.bcast(rewritten, root=owner)
    if comm.rank == reader:
        checks["rewrite_new_generation"] = re_ref.generation > new_ref.generation and re_ref.offset == new_ref.offset
        checks["rewrite_old_refused"] = read(aw, new_ref)[0] is False
        ok, out = read(aw, re_ref)
        checks["rewrite_new_ok"] = ok and digest(out) == re_digest

    # allocated, not yet written: generation 0, nothing readable there
    pending = None
    if comm.rank == owner:
        bid = BlockId(digest(b"pending"))
        assert tier.allocate(bid, 64)
        pending = tier.location(bid)
    offset, _, generation = comm.bcast(pending, root=owner)
    checks["pending_generation_zero"] = generation == 0
    if comm.rank == reader:
        guesses = [remote_read(aw, owner, offset, 64, g, digest16_of(BlockId(digest(b"pending"))),
                               memoryview(bytearray(64))) for g in range(1, 50)]
        checks["pending_unreadable"] = not any(guesses)

    if comm.rank == reader:
        checks.update(interleaved(aw, tier, rng))

    # close refuses (on every rank) while a view of the arena is alive, then succeeds
    held = tier.view(next(iter(tier.block_ids()))) if comm.rank == owner else None
    tier.close()
    try:
        aw.close()
        checks["close_refused_with_view"] = False
    except BufferError:
        checks["close_refused_with_view"] = True
    del held
    left = close_checked(aw, shm_before)
    return {**{f"rank {r}: {k}": v for r, c in enumerate(comm.allgather(checks)) for k, v in c.items()}, **left}


def threaded_reads(aw: ArenaWindow, published: list[tuple[SlotRef, bytes]]) -> bool:
    """Four threads read at once, single and batched (MPI allows a process one epoch per target at a
    time: the window must make them take turns, not fail)."""
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200):
                # 3 blocks: a Get each; 6: the typed batch (rma.BATCH_TYPES_FROM)
                picks = [published[int(i)] for i in rng.integers(len(published), size=int(rng.choice([3, 6])))]
                outs = [bytearray(ref.nbytes) for ref, _ in picks]
                if rng.random() < 0.5:
                    oks = remote_read_many(aw, [ref for ref, _ in picks], [memoryview(o) for o in outs])
                else:
                    oks = [remote_read(aw, ref.rank, ref.offset, ref.nbytes, ref.generation, ref.digest16,
                                       memoryview(o)) for (ref, _), o in zip(picks, outs)]
                if not all(oks) or any(digest(o) != d for o, (_, d) in zip(outs, picks)):
                    failures.append("wrong read")
        except Exception as e:  # reported through the check below
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return not failures


class Interfering:
    """A window that runs ``action`` right after its ``after``-th Get: the owner freeing or rewriting the
    slot in the middle of a read, made deterministic (the rank reads its own window, so it is the owner)."""

    def __init__(self, win: MPI.Win, after: int, action) -> None:
        self._win, self._after, self._action, self._gets = win, after, action, 0

    def __getattr__(self, name: str):
        return getattr(self._win, name)

    def Get(self, *args) -> None:  # MPI's name
        self._win.Get(*args)
        self._gets += 1
        if self._gets == self._after:
            self._action()


def interleaved(aw: ArenaWindow, tier: SlotArena, rng: np.random.Generator) -> dict[str, bool]:
    """The owner acts between the phases of a read (a single read's Gets: 1 header, 2 bytes, 3 header)."""
    checks = {}

    def race(after: int, action: str, many: bool = False, n: int = 2) -> list[tuple[bool, bool]]:
        """Read ``n`` fresh blocks (the first one alone unless ``many``) while ``action`` hits the first
        after Get number ``after``; per block read: (answered True, bytes were that block's)."""
        blocks = [put(tier, rng.bytes(4096)) for _ in range(n)]
        first = _id_at(tier, blocks[0][0])

        def act() -> None:
            if action == "reuse":  # free, and another block of the same size takes the very slot
                tier.free(first)
                assert put(tier, rng.bytes(4096))[0].offset == blocks[0][0].offset
            elif action == "rewrite":  # same id, other bytes
                put(tier, rng.bytes(4096), bid=first)
            elif action == "free":
                tier.free(first)

        real = aw.win
        aw.win = Interfering(real, after, act)
        try:
            todo = blocks if many else blocks[:1]
            outs = [bytearray(4096) for _ in todo]
            oks = remote_read_many(aw, [ref for ref, _ in todo], [memoryview(o) for o in outs]) if many else \
                [remote_read(aw, comm.rank, todo[0][0].offset, 4096, todo[0][0].generation, todo[0][0].digest16,
                             memoryview(outs[0]))]
        finally:
            aw.win = real
        return [(ok, digest(o) == d) for ok, o, (_, d) in zip(oks, outs, todo)]

    checks["race: nothing happens -> read"] = race(2, "none") == [(True, True)]
    checks["race: reuse after bytes copied -> refused"] = race(2, "reuse") == [(False, True)]
    checks["race: reuse after first header -> refused"] = race(1, "reuse") == [(False, False)]
    checks["race: rewrite after bytes copied -> refused"] = race(2, "rewrite") == [(False, True)]
    checks["race: free after bytes copied -> refused"] = race(2, "free") == [(False, True)]
    # a batch of two: Gets 1-2 headers, 3-4 bytes, 5-6 headers; the first block is reused after its bytes
    checks["race: batch, one reused -> only it refused"] = race(3, "reuse", many=True) == [(False, True), (True, True)]
    # a batch read through derived datatypes (rma.BATCH_TYPES_FROM blocks on one rank): Get 1 all headers,
    # 2 all bytes, 3 all headers again
    n = BATCH_TYPES_FROM + 1
    checks["race: typed batch, one reused after bytes -> only it refused"] = (
        race(2, "reuse", many=True, n=n) == [(False, True)] + [(True, True)] * (n - 1))
    checks["race: typed batch, one freed after headers -> only it refused"] = (
        race(1, "free", many=True, n=n) == [(False, True)] + [(True, True)] * (n - 1))
    return checks


def _id_at(tier: SlotArena, ref: SlotRef) -> BlockId:
    """The block the owner holds at a published location."""
    (bid,) = [b for b in tier.block_ids() if tier.location(b)[0] == ref.offset]
    return bid


# ------------------------------------------------------------------------------------------------ stress
STRESS_ENOUGH = {"ok": 600, "stale": 1000, "batches": 200, "published": 4000}
"""What the reader must have seen before it stops the owner: every kind of outcome, many times over (about
what 2 s of churn gave on a 2-core machine, when the run was timed)."""
STRESS_MAX_OPS = 50_000
"""The owner stops here even if the reader never had enough (the test's assertions then say what fell short)."""


def stress() -> dict[str, object]:
    """Rank 0 frees, reallocates and rewrites slots without pause; rank 1 reads known locations in a
    loop, old and new. Every read that answers True must hold exactly the bytes published with it.

    The run ends by counts, not by a clock: the reader stops the owner (a message) once it has seen
    :data:`STRESS_ENOUGH` of each outcome, so a slow or busy machine runs longer instead of failing."""
    assert comm.size == 2
    owner, reader = 0, 1
    shm_before = shm_names()
    aw = ArenaWindow(comm, 32 * MiB)  # 4 live blocks of at most 2 MiB: room for any fragmentation
    tier = SlotArena(aw.capacity, aw.memory)
    stats = {"ok": 0, "stale": 0, "torn": 0, "batches": 0, "owner_ops": 0}
    sizes = [256 * 1024, MiB, 2 * MiB]
    # Both ranks draw the same payloads up front: the owner's loop is then only free / allocate / copy /
    # publish, racing the reader as often as it can, and the reader checks a read by comparing it with
    # the payload named in the message (as strong as a digest, and faster)
    rng = np.random.default_rng(11)
    pool = {n: [np.frombuffer(rng.bytes(n), dtype=np.uint8) for _ in range(8)] for n in sizes}
    if comm.rank == owner:
        serial = iter(range(1, 1 << 62))

        def publish(bid: BlockId, which: tuple[int, int]) -> None:
            tier.write(bid, memoryview(pool[which[0]][which[1]]))
            offset, nbytes, generation = tier.location(bid)
            comm.send((SlotRef(owner, offset, nbytes, generation, digest16_of(bid)), which), dest=reader, tag=1)

        def fresh() -> BlockId:
            which = (sizes[int(rng.integers(len(sizes)))], int(rng.integers(8)))
            # serial ids (dedup off): one payload may live twice
            bid = BlockId(digest(pool[which[0]][which[1]]) + next(serial).to_bytes(8, "big"))
            assert tier.allocate(bid, which[0]), f"no room for {which[0]} B"
            publish(bid, which)
            return bid

        live = [fresh() for _ in range(4)]
        while stats["owner_ops"] < STRESS_MAX_OPS and not comm.iprobe(source=reader, tag=2):
            i = int(rng.integers(len(live)))
            if rng.random() < 0.3:  # rewrite in place: same id, other bytes, new generation
                publish(live[i], (tier.size_of(live[i]), int(rng.integers(8))))
            else:  # free and reuse: the best-fit allocator hands the same slot (or part of it) back
                tier.free(live[i])
                live[i] = fresh()
            stats["owner_ops"] += 1
        comm.send(None, dest=reader, tag=1)
        comm.recv(source=reader, tag=2)  # the reader's stop, sent once whether it came first or not
    else:
        rng = np.random.default_rng(12)
        known: list[tuple[SlotRef, tuple[int, int]]] = []
        bufs = {n: np.empty(n, dtype=np.uint8) for n in sizes}
        done = stopped = False
        published = 0
        while not done:
            while comm.iprobe(source=owner, tag=1):
                msg = comm.recv(source=owner, tag=1)
                if msg is None:
                    done = True  # the owner stopped: reads from now on could no longer race
                else:
                    known.append(msg)
                    published += 1
            seen = {**stats, "published": published}
            if not stopped and all(seen[k] >= n for k, n in STRESS_ENOUGH.items()):
                comm.send("stop", dest=owner, tag=2)
                stopped = True
            known = known[-64:]
            if not known:
                continue
            if rng.random() < 0.2 and len(known) >= 4:
                picks = [known[int(j)] for j in rng.integers(len(known), size=4)]
                outs = [np.empty(ref.nbytes, dtype=np.uint8) for ref, _ in picks]
                oks = remote_read_many(aw, [ref for ref, _ in picks], [memoryview(o) for o in outs])
                stats["batches"] += 1
                results = [(ok, o, d) for ok, o, (_, d) in zip(oks, outs, picks)]
            else:  # mostly the newest locations: those are the ones a free can hit mid-read
                ref, d = known[-1 - int(rng.integers(min(len(known), 4)))]
                out = bufs[ref.nbytes]
                ok = remote_read(aw, owner, ref.offset, ref.nbytes, ref.generation, ref.digest16, memoryview(out))
                results = [(ok, out, d)]
            for ok, out, (n, j) in results:
                if not ok:
                    stats["stale"] += 1
                elif np.array_equal(out, pool[n][j]):
                    stats["ok"] += 1
                else:
                    stats["torn"] += 1
        if not stopped:  # the owner stopped on its own (STRESS_MAX_OPS) and still waits for this
            comm.send("stop", dest=owner, tag=2)
    comm.Barrier()
    tier.close()
    totals = {k: comm.allreduce(v) for k, v in stats.items()}
    totals.update(close_checked(aw, shm_before))
    return totals


# ------------------------------------------------------------------------------------------------ many
def many() -> dict[str, object]:
    """Every rank owns blocks; every rank reads every other rank's blocks in one Lock_all epoch, before
    and after each owner frees half of its own."""
    rng = np.random.default_rng(100 + comm.rank)
    shm_before = shm_names()
    aw = ArenaWindow(comm, (2 + comm.rank) * MiB)  # ranks may differ in capacity
    tier = SlotArena(aw.capacity, aw.memory)
    mine = [put(tier, rng.bytes(int(n))) for n in rng.integers(0, 200_000, size=6)]
    everyone = [p for r, blocks in enumerate(comm.allgather(mine)) if r != comm.rank for p in blocks]
    infos_ok = all(aw.describe(r).capacity == (2 + r) * MiB for r in range(comm.size))

    def read_all() -> list[bool]:
        outs = [np.empty(ref.nbytes, dtype=np.uint8) for ref, _ in everyone]
        oks = remote_read_many(aw, [ref for ref, _ in everyone], [memoryview(o) for o in outs])
        bad = sum(ok and digest(o) != d for ok, o, (_, d) in zip(oks, outs, everyone))
        assert bad == 0, f"rank {comm.rank}: {bad} reads answered True with the wrong bytes"
        return oks

    before = read_all()
    comm.Barrier()
    for ref, _ in mine[::2]:
        tier.free(_id_at(tier, ref))
    comm.Barrier()
    after = read_all()
    freed = {(ref.rank, ref.offset) for r, blocks in enumerate(comm.allgather(mine)) for ref, _ in blocks[::2]}
    expect_after = [(ref.rank, ref.offset) not in freed for ref, _ in everyone]
    comm.Barrier()
    tier.close()
    result: dict[str, object] = {
        "all_read_before": agree(all(before)),
        "after_matches_frees": agree(after == expect_after),
        "describe_ok": agree(infos_ok),
        "reads_per_rank": len(everyone),
    }
    result.update(close_checked(aw, shm_before))
    return result


def main() -> None:
    scenario = sys.argv[1]
    try:
        if scenario == "basic":
            result = basic()
        elif scenario == "stress":
            result = stress()
        elif scenario == "many":
            result = many()
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
        raise
    if comm.rank == 0:
        print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
