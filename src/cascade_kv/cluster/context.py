"""What every part of the distributed store shares on one rank (:class:`RankContext`).

The store's parts (:mod:`.writes`, :mod:`.reads`, :mod:`.eviction`, :mod:`.replication`, :mod:`.handlers`,
:mod:`.diskio`) are objects that each do one job and call each other through plain methods; this is the
state none of them owns. A mixin sharing private fields (as ``Durability`` was) was rejected: a reader
could not tell which part reads or changes a field.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI

from ..config import CascadeConfig
from .arena import Arena
from .counters import Counters
from .directory.rpc import Directory
from .service import Service
from .window import ArenaWindow


@dataclass(frozen=True, slots=True)
class RankContext:
    config: CascadeConfig
    comm: MPI.Comm
    rank: int
    size: int
    service: Service
    """Requests to other ranks; its ``timeout`` bounds every wait on a peer."""
    window: ArenaWindow
    """This rank's window: peers read it one-sidedly; every rank's room is published in its header page."""
    arena: Arena
    """The copies this rank's window holds; its ``lock`` also guards ``counters``."""
    directory: Directory
    counters: Counters
    """This rank's totals over every namespace (update them under ``arena.lock``)."""

    @property
    def timeout(self) -> float:
        return self.service.timeout


__all__ = ["RankContext"]
