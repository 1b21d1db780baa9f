"""``cascade bench rma``'s cascade-kv rows again, with Open MPI kept off shared memory: the row
``cascade-kv (TCP)``, the twin of ``cascade-kv``.

The remote peers reach the process that holds their memory over loopback TCP (Mooncake's transfer engine,
``lmcache_server``) or a Unix socket (Redis); cascade-kv's ranks reach each other through Open MPI, which on
one node moves one-sided reads through shared memory (``osc/sm``). So the experiment also runs cascade-kv's
measurements with Open MPI forced onto TCP, ``btl tcp,self`` and ``osc rdma`` (which carries one-sided calls
over that btl), the transport the peers use. Open MPI picks its transport when MPI starts, so one job cannot
measure both: rank 0 of the rma job starts a second job of as many ranks (``python -m`` this module) with
those settings, and takes its figures back; the other ranks wait in a sleeping barrier meanwhile. The twin's
bare ``Get`` and ``Send/Recv`` ceilings are measured in its job too, over TCP (named ``... (TCP)``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .core import Measure, Result, Run, SystemResult

TWIN = "cascade-kv (TCP)"
TCP_MCA = {"OMPI_MCA_btl": "tcp,self", "OMPI_MCA_osc": "rdma"}
"""Open MPI's settings for the twin's job (the issue's ``--mca btl tcp,self --mca osc rdma``)."""
SUFFIX = " (TCP)"
TIMEOUT = 1800.0  # seconds for the whole twin job (the full sizes take a few minutes on 2 cores)
_JOB_VARIABLES = ("OMPI_", "PMIX_", "PRTE_", "OPAL_")
"""Prefixes of what the running job's launcher set for its ranks: the twin's launcher must not inherit them."""


def transport(environ: dict[str, str] | None = None) -> str:
    """How this job's ranks reach each other, in words (from the Open MPI settings in the environment)."""
    env = os.environ if environ is None else environ
    btl, osc = env.get("OMPI_MCA_btl"), env.get("OMPI_MCA_osc")
    if btl is None and osc in (None, "^ucx"):
        return "Open MPI's default on one node: shared memory (btl sm, osc sm)"
    return f"Open MPI with btl {btl or '(default)'}, osc {osc or '(default)'}"


def twin_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the twin's launcher: this process's, less its job's launcher variables, plus
    :data:`TCP_MCA`."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith(_JOB_VARIABLES)}
    return {**env, **TCP_MCA}


def measure(r: Run, res: Result, block: int | None) -> None:
    """Run the twin job from rank 0 and add its row and ceilings to ``res`` (collective over ``r``)."""
    if r.size < 2:
        res.skipped[TWIN] = "cascade-kv's remote tier needs 2 ranks: run with --ranks 2"
        return

    def twin() -> dict[str, Any] | None:
        if r.rank != 0:
            return None
        from ...cluster.launch import run_mpi

        out = r.root / "cascade-kv-tcp.json"
        settings = json.dumps({"quick": r.quick, "block": block, "root": str(r.root / "cascade-kv-tcp")})
        done = run_mpi(r.size, [sys.executable, "-m", __name__, str(out), settings], TIMEOUT,
                       env=twin_environment())
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"the twin job over TCP exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
        got = json.loads(out.read_text())
        out.unlink()
        return got

    got = r.allgather(r.together(twin, f"{TWIN}: a second job of {r.size} ranks, over TCP"))[0]
    assert got is not None  # rank 0's, which together() raised on every rank if it failed
    for part in ("skipped", "failed"):
        if "cascade-kv" in got[part]:
            getattr(res, part)[TWIN] = got[part]["cascade-kv"]
    if got["row"] is not None:
        row = res.systems[TWIN] = SystemResult(TWIN, setup_seconds=got["row"]["setup_seconds"],
                                               values=got["row"]["values"])
        for key, samples in got["row"]["measures"].items():
            row.measure(key, "GB/s").samples.extend(samples)
    for key, samples in got["ceilings"].items():
        res.ceilings[key + SUFFIX] = Measure("GB/s", samples)
    if r.rank == 0:  # the twin's reads count among the experiment's reads checked
        counted = r.new_contents(8, seed=0)
        counted.checked, counted.wrong = got["checked"], got["wrong"]


def _main(argv: list[str]) -> int:
    """One rank of the twin job: cascade-kv's rows of rma, written by rank 0 to ``argv[0]`` as JSON."""
    out, settings = Path(argv[0]), json.loads(argv[1])
    from mpi4py import MPI

    from . import rma

    comm = MPI.COMM_WORLD
    root = Path(settings["root"])
    if comm.Get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    run = Run(comm, quick=settings["quick"], root=root, systems=["cascade-kv"], tick=lambda _: None,
              options={"block": settings["block"]})
    res = Result("rma", TWIN, comm.Get_size())
    rma.cascade_rows(run, res, rma.Sizes(run.quick, settings["block"]))
    checked, wrong = run.counted_reads()
    if comm.Get_rank() == 0:
        mine = res.systems.get("cascade-kv")
        row = None if mine is None else {
            "setup_seconds": mine.setup_seconds, "values": {**mine.values, "transport": transport()},
            "measures": {k: m.samples for k, m in mine.measures.items()}}
        out.write_text(json.dumps({"row": row, "ceilings": {k: m.samples for k, m in res.ceilings.items()},
                                   "skipped": res.skipped, "failed": res.failed, "checked": checked,
                                   "wrong": wrong}, default=str))
        with_files = list(root.iterdir()) if root.exists() else []
        if not with_files:
            root.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
