"""The store contract (:mod:`cascade_kv.contract`) on :class:`~cascade_kv.DistributedStore`, on 1 and 2 ranks.

Each outer test starts an MPI job (``mpi_main.py``) whose rank 0 runs ``TestDistributedStore`` with pytest and
whose other ranks open and close their stores in step; the outer test fails with the inner output if any
inner test fails. Collected outside such a job, ``TestDistributedStore`` skips.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .conformance import StoreContract
from .mpi_main import JOB_ENV

MPI_MAIN = Path(__file__).resolve().parent / "mpi_main.py"


@pytest.mark.parametrize("ranks,transport", [(1, "sm"), (2, "sm"), (2, "tcp")])
def test_the_contract_holds_on_ranks(ranks, transport, monkeypatch):
    from cluster.conftest import run_ranks  # tests/ is on sys.path (rootdir-relative test packages)

    if transport == "tcp":
        # Separate nodes emulated: no shared memory between the ranks, one-sided reads through Open MPI's
        # TCP transport, and every idle service asleep in the kernel (woken over UDP) between calls.
        monkeypatch.setenv("OMPI_MCA_btl", "tcp,self")
        monkeypatch.setenv("OMPI_MCA_osc", "rdma")
    out = run_ranks(ranks, [sys.executable, str(MPI_MAIN)], timeout=180)
    assert " passed" in out and " failed" not in out, out


class TestDistributedStore(StoreContract):
    @pytest.fixture
    def open_store(self):
        if not os.environ.get(JOB_ENV):
            pytest.skip("runs inside the MPI job of test_the_contract_holds_on_ranks")
        from .mpi_main import leader_store

        return leader_store
