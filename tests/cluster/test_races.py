"""Races the model test finds only now and then, forced here in one order, deterministically.

A read from the shared disk tier that loses the race against a delete on another rank: the reader got
the block's disk location, then the other rank's delete freed the digest at its home and unlinked the
file, then the reader opened it. Before the fix the read raised IntegrityError("block file ... is
missing"), as if the file were damaged; a read racing a delete is a miss (BlockNotFound), and a read
racing a delete and a new put of the same bytes returns them. The interleaving is forced by holding
the reader inside its disk read (a wrapped ``read_into``) until the other rank says it is done, with
messages, no sleeps.

A protected put on a rank whose arena is taken whole by another thread's put in flight (its copies stay
pinned until the directory lists them, so none of them is a victim). Before the fix the second put
asked a peer for room, the peer answered yes (it had a hole already), and the put looped on that
answer forever: a hole on a peer helps only a protected victim that can move there, and there was
none, so nothing counted the loop down. Seen as a rank that never reached the model test's barrier
(4 ranks x 5000 steps, 1 run in 4-8): a put_many of three protected blocks whose first two, pinned,
left the rank's arena in holes too small for the third, asking peers for room 20000 times a second.
Forced here, in the two-thread form, by holding the first put inside its ``publish_many`` (its copies
pinned) until the second is done.

Run by pytest on 2 ranks, or by hand: ``cascade launch -n 2 python -m mpi4py tests/cluster/test_races.py
[SCENARIO]``.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np


def test_a_disk_read_racing_a_delete_is_a_miss_and_racing_a_new_put_reads_it() -> None:
    from .conftest import run_scenario  # here: this file is also run as a plain MPI program, outside the package

    run_scenario(__file__, 2, "disk-read-vs-delete", timeout=90)


def test_a_protected_put_on_an_arena_pinned_by_another_put_fails_at_once_and_succeeds_after() -> None:
    from .conftest import run_scenario

    run_scenario(__file__, 2, "protected-put-vs-pinned-arena", timeout=90)


def _scenario(comm, scratch: Path) -> None:
    from cascade_kv import BlockNotFound, CascadeConfig, DistributedStore

    rank = comm.Get_rank()
    value = np.arange(4096, dtype=np.uint8)
    cfg = CascadeConfig(host_capacity="1MiB", disk_path=scratch / "disk", replica_threshold=100)
    with DistributedStore(cfg, comm=comm, timeout=20) as store:
        for case, then_put in (("gone", False), ("back", True)):
            key = f"k-{case}"
            if rank == 0:
                store.put(key, value)
                store.demote([key])  # disk only: a read on rank 1 goes to the shared file
            store.barrier()
            if rank == 1:
                original = store.disk.read_into
                held = []

                def read_into(block_id, out, original=original, held=held):
                    if not held:  # the first read: let rank 0 delete (and maybe put again) before the open
                        held.append(True)
                        comm.send("go", dest=0, tag=7)
                        assert comm.recv(source=0, tag=8) == "done"
                    return original(block_id, out)

                store.disk.read_into = read_into
                try:
                    if then_put:
                        got = store.get(key)  # the same bytes are back under the key: the read finds them
                        assert np.array_equal(got, value), "a racing re-put returned other bytes"
                    else:
                        try:
                            store.get(key)
                        except BlockNotFound:
                            pass  # the delete won: a miss, not an IntegrityError
                        else:
                            raise AssertionError("a get after the delete's unlink returned a value")
                finally:
                    store.disk.read_into = original
                assert held, "the disk read was never reached: the race was not forced"
            else:
                assert comm.recv(source=1, tag=7) == "go"
                store.delete(key)  # frees the digest at its home and unlinks the shared file
                assert not store.disk.path(store._hasher.digest(memoryview(value))).exists()
                if then_put:
                    store.put(key, value)
                    store.demote([key])  # back on disk only, in a new file of the same name
                comm.send("done", dest=1, tag=8)
            store.barrier()
            stats = store.cluster_stats()
            assert stats.integrity_errors == 0 and stats.quarantined == 0, stats


ASKS_ALLOWED = 8
"""Requests for a peer's room one put may make here before the scenario calls its loop unbounded (the fixed
store makes none: with no victim to move, a peer's hole is no use)."""


def _pinned_arena(comm, scratch: Path) -> None:
    from cascade_kv import CapacityError, CascadeConfig, DistributedStore
    from cascade_kv.cluster.slots import SLOT_HEADER

    rank = comm.Get_rank()
    n = 8192
    a1, a2, b, small = (np.full(n if i < 3 else 3072, i + 1, np.uint8) for i in range(4))
    # two blocks of n bytes fill an arena exactly: its one spare header is the empty tier's own
    cfg = CascadeConfig(host_capacity=2 * (n + SLOT_HEADER), disk_path=scratch / "disk", replica_threshold=100)
    with DistributedStore(cfg, comm=comm, timeout=20) as store:
        if rank == 1:
            store.put("small", small)  # unprotected: rank 1 has evictable bytes, and a hole for a whole block
        store.barrier()
        if rank == 0:
            held, go = threading.Event(), threading.Event()
            publish_many = store.directory.publish_many
            failed: list[BaseException] = []

            def put_first() -> None:
                try:
                    store.put_many(["a1", "a2"], [a1, a2], is_prefix=True)
                except BaseException as e:
                    failed.append(e)
                    held.set()

            first = threading.Thread(target=put_first, name="first-put")

            def publish_held(published, publish_many=publish_many):
                if threading.current_thread() is first:  # both copies are in the arena, pinned: hold them there
                    held.set()
                    assert go.wait(60), "the scenario never let the first put go"
                return publish_many(published)

            ask_for_room = store.eviction.ask_for_room
            asks = []

            def ask_counted(need, ask_for_room=ask_for_room):
                asks.append(need)
                if len(asks) > ASKS_ALLOWED:
                    raise AssertionError(f"a protected put asked peers for room {len(asks)} times with no victim "
                                         f"to move there: an unbounded loop")
                return ask_for_room(need)

            store.directory.publish_many = publish_held
            store.eviction.ask_for_room = ask_counted
            try:
                first.start()
                assert held.wait(60) and not failed, f"the first put never reached publish_many: {failed!r}"
                assert store.arena.tier.largest_hole < n, "the first put's copies do not fill the arena"
                try:
                    store.put("b", b, is_prefix=True)
                except CapacityError:
                    pass  # no copy here may go (both are being written): refused at once
                else:
                    raise AssertionError("a protected put found room in an arena pinned whole by another put")
                assert not asks, f"asked peers for room {len(asks)} time(s) with no victim to move there"
            finally:
                go.set()
                first.join()
                assert not failed, f"the first put failed: {failed!r}"
                del store.directory.publish_many, store.eviction.ask_for_room  # the classes' own methods again
            assert "b" not in store
            store.put("b", b, is_prefix=True)  # the copies are listed now: one of them moves to rank 1
        store.barrier()
        for key, want in (("a1", a1), ("a2", a2), ("b", b), ("small", small)):
            assert np.array_equal(store.get(key), want), key
        assert store.info("b").prefix
        store.barrier()
        assert not store.arena.check(idle=True), store.arena.check(idle=True)


SCENARIOS = {"disk-read-vs-delete": _scenario, "protected-put-vs-pinned-arena": _pinned_arena}


if __name__ == "__main__":
    from mpi_program import run_phases  # this file's folder is on sys.path when it runs as a program

    names = sys.argv[1:] or list(SCENARIOS)
    for name in names:
        if name not in SCENARIOS:
            sys.exit(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    run_phases([(name, SCENARIOS[name]) for name in names], prefix="cascade-races-")
