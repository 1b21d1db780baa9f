"""torch tensors on the distributed store, over 2 real ranks: a bfloat16 tensor put on rank 0 is read on
rank 1 into a bfloat16 tensor (straight into its memory, and through a staging copy into a transposed
one), its dtype's stand-in crosses the directory's wire codec intact, and an out of another dtype is
refused there as on one node.

Also the MPI program itself (``python -m mpi4py test_torch.py SCENARIO``), as ``test_lookup.py``.
Verdicts are reached on values gathered from every rank, so every rank fails or passes together.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

TIMEOUT = 10.0


def test_a_bfloat16_tensor_crosses_ranks() -> None:
    pytest.importorskip("torch", reason="the test extra (torch) is not installed (pip install '.[test]')")
    from .conftest import run_scenario

    run_scenario(__file__, 2, "bf16", 120)


# ------------------------------------------------------------------ the scenario (run under mpiexec)
def _bf16(torch):
    """The same pseudo-random bfloat16 tensor on every rank."""
    g = torch.Generator().manual_seed(10)
    return torch.randn(16, 64, generator=g).to(torch.bfloat16)


def _bf16_across_ranks(comm) -> None:
    from mpi_program import agree  # this folder is on sys.path when the file runs as a program

    import torch

    from cascade_kv import InvalidArgument
    from cascade_kv.cluster.store import DistributedStore
    from cascade_kv.tensors import TORCH_DTYPE

    rank = comm.Get_rank()
    t = _bf16(torch)
    store = DistributedStore(comm=comm, timeout=TIMEOUT, host_capacity=1 << 20)
    try:
        if rank == 0:
            store.put_many([f"kv{i}" for i in range(4)], [t + i for i in range(4)])  # homed on both ranks
        comm.Barrier()
        ok = True
        if rank == 1:
            for i in range(4):
                want = t + i
                out = torch.empty(16, 64, dtype=torch.bfloat16)
                ptr = out.data_ptr()
                ok &= store.get(f"kv{i}", out) is out and out.data_ptr() == ptr and torch.equal(out, want)
                transposed = torch.zeros(64, 16, dtype=torch.bfloat16).t()
                ok &= store.get(f"kv{i}", transposed) is transposed and torch.equal(transposed, want)
                got = store.get(f"kv{i}")
                ok &= got.dtype == np.uint16 and got.dtype.metadata == {TORCH_DTYPE: "bfloat16"}
                ok &= torch.equal(torch.from_numpy(got).view(torch.bfloat16), want)
                wrong = torch.full((16, 64), 7.0, dtype=torch.float16)
                try:
                    store.get(f"kv{i}", wrong)
                    ok = False
                except InvalidArgument:
                    ok &= bool((wrong == 7.0).all())
        agree(comm, ok, "bf16 read on rank 1")
    finally:
        store.close()


def _main() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if sys.argv[1] == "bf16":
        _bf16_across_ranks(comm)
    print(f"rank {comm.Get_rank()}: ok", flush=True)


if __name__ == "__main__":
    _main()
    sys.exit(0)
