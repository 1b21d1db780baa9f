"""The directory's state machine and records, and the persistence modules built on them, import without MPI:
``mpi4py.MPI`` initialises MPI when it is imported, and these are used and unit-tested in plain processes
(``test_directory_state.py``, ``test_durable.py``). Only the client (``directory.rpc``) needs MPI; the package
loads its names on first use. Each probe runs in a fresh interpreter: the pytest process may have MPI already."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cascade_kv.cluster.directory as directory_package

NO_MPI_MODULES = ["cascade_kv.cluster.directory.state", "cascade_kv.cluster.directory.records",
                  "cascade_kv.cluster.directory.codec", "cascade_kv.cluster.directory",
                  "cascade_kv.cluster.journals", "cascade_kv.cluster.recovery", "cascade_kv.cluster.durable"]


@pytest.mark.parametrize("module", NO_MPI_MODULES)
def test_importing_initialises_no_mpi(module):
    probe = (f"import sys, importlib; importlib.import_module({module!r}); "
             f"print('mpi4py.MPI' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stdout + done.stderr


def test_the_state_and_records_import_through_the_package_without_mpi():
    probe = ("import sys; from cascade_kv.cluster.directory import DirectoryState, KeyRecord, Location, TIER_DISK; "
             "DirectoryState(); print('mpi4py.MPI' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stdout + done.stderr


def test_every_lazily_loaded_name_is_defined_by_rpc():
    # resolving one here would start MPI in the pytest process: check the names against rpc's source instead
    rpc = ast.parse(Path(directory_package.__file__).with_name("rpc.py").read_text())
    defined = {t.id for node in rpc.body if isinstance(node, ast.Assign) for t in node.targets
               if isinstance(t, ast.Name)} | {node.name for node in rpc.body if isinstance(node, ast.ClassDef)}
    lazy = directory_package._RPC_NAMES
    assert lazy <= defined, sorted(lazy - defined)
    assert {n for n in defined if n.startswith("OP_")} | {"OPS", "Directory"} == lazy
    assert lazy <= set(directory_package.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        directory_package.no_such_name  # noqa: B018
