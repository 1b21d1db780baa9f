"""What needs no MPI ranks about the distributed store: importing the package must not initialise MPI.

Everything that runs a ``DistributedStore`` lives in ``test_store.py`` and goes through mpiexec, even on one
rank (``MPI.COMM_SELF``): importing ``mpi4py.MPI`` in the pytest process would initialise MPI there, and a
singleton start costs as much as an mpiexec start (about a second) without being what users run.
"""
from __future__ import annotations

import subprocess
import sys


def test_importing_cascade_kv_initialises_no_mpi() -> None:
    # ``from cascade_kv import DistributedStore`` resolves lazily (checked under mpiexec in test_store.py)
    probe = "import sys, cascade_kv; print('mpi4py.MPI' in sys.modules, 'DistributedStore' in cascade_kv.__all__)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split() == ["False", "True"], done.stdout + done.stderr
