"""A session that leaves shared memory or temporary files behind fails, whatever its tests say.

Open MPI 5 leaves a 16 MiB segment in /dev/shm for every process that started MPI without a launcher, and a
program that forgets its temporary directory leaves it in /tmp: no single test sees either, since both show
only after the process that made them is gone. So the session watches:

- /dev/shm: every entry added while it ran (one already there is never reported), and in particular Open
  MPI's shared-memory segments, which this session's processes (they inherit the variable) make in a folder
  of its own under /dev/shm: what is left there is certainly theirs.
- its own TMPDIR, which every process it starts inherits: what is left there (bar pytest's own folders).

Another program on this machine can add to /dev/shm while the tests run: the failure names what it found,
and the folder of this session's Open MPI segments tells which of it is this session's for certain.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
_SESSION_PREFIX = "cascade-pytest-"  # this session's folders, in /dev/shm and in the temporary directory
_SM_BACKING = "OMPI_MCA_btl_sm_backing_directory"


def _remove_dead_sessions_folders() -> None:
    """A session killed outright (SIGKILL, a CI timeout) cannot remove its segment folder: the next session
    does, once no process of that pid lives (the pid is the folder's name; a reused pid only delays it)."""
    for folder in SHM.glob(f"{_SESSION_PREFIX}*") if SHM.is_dir() else ():
        pid = folder.name[len(_SESSION_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


class _Watch:
    def __init__(self) -> None:
        _remove_dead_sessions_folders()
        tag = f"{_SESSION_PREFIX}{os.getpid()}"
        self.shm_before = _names(SHM)
        self.segments: Path | None = None
        if SHM.is_dir() and _SM_BACKING not in os.environ:
            self.segments = SHM / tag
            self.segments.mkdir(exist_ok=True)
            os.environ[_SM_BACKING] = str(self.segments)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.saved_tmpdir = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(self.tmp)
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again

    def leftovers(self) -> list[str]:
        others = _mapped(exclude=os.getpid())  # segments of jobs still running beside this session
        found = [f"/dev/shm/{name}" for name in sorted(_names(SHM) - self.shm_before)
                 if not name.startswith(_SESSION_PREFIX)  # this session's folder, or another session's
                 and f"/dev/shm/{name}" not in others]
        if self.segments is not None:
            found += [f"{p} (an Open MPI segment of this session's)" for p in sorted(self.segments.iterdir())]
        found += [str(p) for p in sorted(self.tmp.iterdir()) if not _expected_in_tmp(p)]
        return found

    def close(self) -> None:
        if self.segments is not None:
            os.environ.pop(_SM_BACKING, None)
            shutil.rmtree(self.segments, ignore_errors=True)
        if self.saved_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = self.saved_tmpdir
        tempfile.tempdir = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _names(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _mapped(exclude: int) -> set[str]:
    """The /dev/shm files that a living process other than ``exclude`` maps."""
    found: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if maps.parent.name == str(exclude):
            continue
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        found.update(line.split(None, 5)[5] for line in text.splitlines() if " /dev/shm/" in line)
    return found


def _expected_in_tmp(path: Path) -> bool:
    """Nothing to report: pytest's own folders (tmp_path), and the folders without files that Open MPI 5 leaves in TMPDIR for a
    process that started MPI without a launcher (``ompi.<host>.<uid>/jf.0/<job>/``; not avoidable from here)."""
    if path.name.startswith("pytest-of-"):
        return True
    return path.name.startswith("ompi.") and path.is_dir() and not any(p.is_file() for p in path.rglob("*"))


_watch: _Watch | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _watch
    _watch = _Watch()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _watch
    if _watch is None:
        return
    watch, _watch = _watch, None
    try:
        left = watch.leftovers()
    finally:
        watch.close()
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["the test session left these behind (removed now where they were in its own folders):", *left]
    if reporter is not None:
        reporter.write_sep("=", "leftovers", red=True)
        for line in lines:
            reporter.write_line(line)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def hasher():
    """The store's default digest (BLAKE3): what the tier suites and the slot tests write blocks under."""
    from cascade_kv.hashing import Hasher

    return Hasher("blake3")


@pytest.fixture
def rng():
    """A seeded numpy generator: the same bytes every run."""
    import numpy as np

    return np.random.default_rng(0xCA5CADE)


@pytest.fixture
def leftovers_of(tmp_path_factory: pytest.TempPathFactory):
    """``leftovers_of(cmd, env=None, timeout=120)``: run ``cmd`` (it must exit 0) with a TMPDIR and an Open MPI
    segment folder of its own, and return what it left in either (Open MPI's file-less session folders aside).
    Without a launcher's variables in ``env`` (default: this process's, less the segment folder), the command
    starts MPI as a singleton, the case that used to leave a segment in /dev/shm."""
    import subprocess

    def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> list[str]:
        tmp = tmp_path_factory.mktemp("tmpdir")
        segments = Path(tempfile.mkdtemp(prefix=f"{_SESSION_PREFIX}{os.getpid()}-", dir=SHM))
        try:
            full = dict(os.environ if env is None else env, TMPDIR=str(tmp), **{_SM_BACKING: str(segments)})
            done = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout, check=False)
            assert done.returncode == 0, done
            return [str(p) for p in [*segments.iterdir(), *tmp.iterdir()] if not _expected_in_tmp(p)]
        finally:
            shutil.rmtree(segments, ignore_errors=True)

    return run
