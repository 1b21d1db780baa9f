"""``cascade serve`` and ``cascade stats``: the daemon in the foreground, and a look at a running one.

Under ``mpiexec -n N`` / ``srun`` every rank serves its node: together they are one
:class:`~cascade_kv.cluster.store.DistributedStore`, so a client on any node sees the whole cluster's cache.
Alone, the daemon serves a single-node store whose arena its clients map (the zero-copy path).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from ..config import CascadeConfig, format_size
from ..errors import CascadeError, ConfigError

log = logging.getLogger("cascade_kv.serve")

_STOP = {signal.SIGTERM, signal.SIGINT}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", type=Path,
                   help="the Unix socket to listen on (default $CASCADE_SOCKET, else $XDG_RUNTIME_DIR/cascade-kv/"
                        "cascade.sock, else /tmp/cascade-kv-UID/cascade.sock; the directory is made 0700, the socket "
                        "0600). Under MPI, {rank} and {local_rank} are replaced; several ranks on one node without "
                        "them get .LOCAL_RANK appended")
    p.add_argument("--metrics-port", metavar="N", type=int,
                   help="serve Prometheus metrics on http://127.0.0.1:N/metrics (0: any free port, printed)")
    p.add_argument("--metrics-addr", metavar="ADDR", default="127.0.0.1",
                   help="address for --metrics-port (default %(default)s: this host only)")
    hints = typing.get_type_hints(CascadeConfig)
    for f in dataclasses.fields(CascadeConfig):
        flag = "--" + f.name.replace("_", "-")
        doc = f"CascadeConfig.{f.name} (env CASCADE_{f.name.upper()}; default {f.default!r})"
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        else:
            p.add_argument(flag, dest=f.name, metavar="VALUE", default=None, help=doc)


def config_from_args(args: argparse.Namespace) -> CascadeConfig:
    """``CASCADE_*`` variables, then the flags given (flags win)."""
    overrides: dict[str, Any] = {}
    for f in dataclasses.fields(CascadeConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in ("promotion_threshold", "replica_threshold"):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"--{f.name.replace('_', '-')}: expected an int, got {value!r}") from None
        overrides[f.name] = value
    return CascadeConfig.from_env(**overrides)


def _rank_path(path: Path, comm: Any) -> Path:
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    lrank, lsize = local.Get_rank(), local.Get_size()
    local.Free()
    text = str(path)
    if "{rank}" in text or "{local_rank}" in text:
        return Path(text.replace("{rank}", str(comm.Get_rank())).replace("{local_rank}", str(lrank)))
    return path if lsize == 1 else path.with_name(f"{path.name}.{lrank}")


def run_serve(args: argparse.Namespace) -> int:
    """The daemon: serve until SIGTERM or SIGINT, then stop cleanly (exit 0)."""
    from ..cluster.launch import job_size  # imports no MPI unless the launcher names no job size
    from .backends import GenericBackend, LocalBackend
    from .served import ServedStore
    from .server import Server, default_socket_path

    logging.basicConfig(level=logging.INFO, format="cascade serve: %(message)s", stream=sys.stderr)
    # blocked before any thread starts, so every thread inherits the mask and the main thread alone takes them
    # in sigwait: it sleeps in the kernel until then (no polling loop) and stops the daemon in order
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
    try:
        cfg = config_from_args(args)
        path = args.socket if args.socket is not None else default_socket_path()
        rank = None
        if job_size() > 1:
            from ..cluster.store import DistributedStore

            store = DistributedStore(cfg)
            rank = store.rank
            path = _rank_path(path, store.comm)
            backend: Any = GenericBackend(store)
        else:
            backend = LocalBackend(ServedStore(cfg))
        try:
            server = Server(backend, path, rank=rank).start(
                None if args.metrics_port is None else args.metrics_port)
        except BaseException:
            backend.close()
            raise
    except CascadeError as e:
        print(f"cascade serve: {e}", file=sys.stderr)
        return 2
    where = f"rank {rank}: " if rank is not None else ""
    disk = f", disk tier {cfg.disk_path}" + (" (persistent)" if cfg.persist else "") if cfg.disk_path else ""
    metrics = "" if server.metrics_port is None else f", metrics on http://{args.metrics_addr}:{server.metrics_port}/metrics"
    print(f"cascade serve: {where}listening on {server.path} (pid {os.getpid()}, host tier "
          f"{format_size(int(cfg.host_capacity))}{disk}{metrics})", flush=True)
    try:
        sig = signal.sigwait(_STOP)
        log.info("%s%s: stopping", where, signal.Signals(sig).name)
    finally:
        server.stop()
    print(f"cascade serve: {where}stopped", flush=True)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .client import connect
    from .render import render_stats

    try:
        with connect(args.socket, timeout=args.timeout) as c:
            stats = c.stats(all_namespaces=True)
            service = c.service_stats()
    except CascadeError as e:
        print(f"cascade stats: {e}", file=sys.stderr)
        return 2
    if args.json:
        from ..stats import stats_to_dict

        print(json.dumps({"store": stats_to_dict(stats), "service": service}, indent=2))
        return 0
    Console().print(*render_stats(stats, service))
    return 0


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", type=Path, help="the daemon's socket (default as for cascade serve)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=10.0, help="give up after this long")
