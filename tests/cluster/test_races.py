"""Races the model test finds only now and then, forced here in one order, deterministically.

A read from the shared disk tier that loses the race against a delete on another rank: the reader got
the block's disk location, then the other rank's delete freed the digest at its home and unlinked the
file, then the reader opened it. Before the fix the read raised IntegrityError("block file ... is
missing"), as if the file were damaged; a read racing a delete is a miss (BlockNotFound), and a read
racing a delete and a new put of the same bytes returns them. The interleaving is forced by holding
the reader inside its disk read (a wrapped ``read_into``) until the other rank says it is done, with
messages, no sleeps.

Run by pytest on 2 ranks, or by hand: ``cascade launch -n 2 python -m mpi4py tests/cluster/test_races.py``.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def test_a_disk_read_racing_a_delete_is_a_miss_and_racing_a_new_put_reads_it() -> None:
    from .conftest import run_scenario  # here: this file is also run as a plain MPI program, outside the package

    run_scenario(__file__, 2, "disk-read-vs-delete", timeout=90)


def _scenario(comm, scratch: Path) -> None:
    from cascade_kv import BlockNotFound, CascadeConfig, DistributedStore

    rank = comm.Get_rank()
    value = np.arange(4096, dtype=np.uint8)
    cfg = CascadeConfig(host_capacity="1MiB", disk_path=scratch / "disk", promotion_threshold=100)
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


def _main() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    scratch = Path(comm.bcast(tempfile.mkdtemp(prefix="cascade-races-") if rank == 0 else None))
    try:
        _scenario(comm, scratch)
        comm.Barrier()
    finally:
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] != "disk-read-vs-delete":
        sys.exit(f"unknown scenario {sys.argv[1]!r}")
    _main()
