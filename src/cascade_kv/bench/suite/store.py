"""``cascade bench store`` (and plain ``cascade bench``, the main job): the store against this machine's own
ceilings, every figure beside the best way the machine does the same operation, measured in the same run.

On one rank it is the single-node workload (:mod:`cascade_kv.bench.single`: host and disk reads of large
blocks, puts, small blocks one call and one batch at a time, and a mixed workload larger than the host
tier); on N ranks the distributed one (:mod:`cascade_kv.bench.cluster`: a get from another rank's memory,
the directory's round trip, a deduplicated put, a hot prefix, idle ranks, small remote gets). Either way it
is one experiment of the suite: one :class:`~.core.Result`, judged by the same rule as every other.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console

from ...config import format_size
from .core import Result, Run

DEFAULT_SYSTEMS = ("cascade-kv",)


def problem(options: dict[str, Any], ranks: int) -> str | None:
    """What is wrong with the sizes of a run (``--block-size``, ``--host-capacity``), or ``None`` (the CLI checks
    ``--dir`` for every experiment)."""
    if ranks > 1:
        from ..cluster import ClusterSizes as Sizes  # in a rank of the job: MPI is started
    else:
        from ..single import Sizes  # type: ignore[assignment]
    sizes = Sizes.for_run(quick=bool(options.get("quick")), block=options.get("block"),
                          host_capacity=options.get("host_capacity"))
    if sizes.block < 4096 or sizes.block % 8:
        return f"--block-size must be at least 4 KiB and a multiple of 8 bytes, got {sizes.block}"
    if sizes.host_capacity < 4 * sizes.block:
        return (f"--host-capacity ({format_size(sizes.host_capacity)}) must hold at least 4 blocks of "
                f"{format_size(sizes.block)}")
    return None


def run(r: Run) -> Result:
    if r.size == 1:
        from ..single import run_single
        return run_single(r)
    from ..cluster import run_cluster  # imports mpi4py.MPI: only in a job of several ranks
    return run_cluster(r)


def render_more(res: Result, console: Console) -> None:
    """The tables beside the figures: the mixed workload (one rank), the idle ranks' CPU and round trips
    (several ranks)."""
    if res.ranks == 1:
        from ..single import render_more as more
    else:
        from ..cluster import render_more as more  # type: ignore[no-redef]
    more(res, console)
