"""cascade-kv itself: with every feature on, or with one of its novelties turned off.

The variants differ in one config field each (``dedup_enabled``, ``semantic_eviction``, ``locality_aware``),
so each novelty's effect is measured on its own, in the same run, on the same workload. One process opens
the single-node :class:`~cascade_kv.Store`; several ranks open one
:class:`~cascade_kv.DistributedStore` over the run's communicator (collective open and close). The host
tier holds ``setup.memory_bytes`` per rank; the disk tier lies in ``workdir/cascade-kv`` (shared by the
ranks) unless the experiment sets ``options["disk"] = False``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ... import __version__
from ...config import CascadeConfig
from ...store import Store
from ..ceilings import drop_page_cache
from .base import Backend, Setup


class CascadeKV(Backend):
    tier = "tiered"

    def __init__(self, *, dedup: bool = True, semantic_eviction: bool = True, promotion: bool = True,
                 replica_threshold: int | None = None) -> None:
        super().__init__()
        self.features: dict[str, object] = {"dedup_enabled": dedup, "semantic_eviction": semantic_eviction,
                                            "locality_aware": promotion}
        off = [label for label, on in (("dedup", dedup), ("semantic eviction", semantic_eviction),
                                       ("promotion", promotion)) if not on]
        self.name = "cascade-kv" + (f" (no {', no '.join(off)})" if off else "")
        if replica_threshold is not None:
            # another threshold beside the default's, the only difference (in a DistributedStore: reads from
            # peers before a local replica; a single Store makes no replicas)
            self.features["replica_threshold"] = replica_threshold
            self.name += f" (replica threshold {replica_threshold})"
        self.store: Any = None
        """The :class:`Store` or :class:`DistributedStore` (open between :meth:`open` and :meth:`close`)."""
        self._disk: Path | None = None
        self._distributed = False

    def _open(self, setup: Setup) -> None:
        self._disk = setup.workdir / "cascade-kv" if setup.options.get("disk", True) else None
        cfg = CascadeConfig(host_capacity=setup.memory_bytes, disk_path=self._disk,
                            o_direct=bool(setup.options.get("o_direct", False)), **self.features,
                            # an experiment may ask for other policy settings (the trace's rows do)
                            **{k: setup.options[k] for k in ("promotion_threshold", "replica_threshold",
                                                             "eviction_order")
                               if k in setup.options and k not in self.features})
        if setup.size > 1:
            # imports mpi4py.MPI: only multi-rank runs pay for it
            from ...cluster.store import DistributedStore

            self.store = DistributedStore(cfg, comm=setup.comm)
            self._distributed = True
        else:
            self.store = Store(cfg)

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        self.store.put_many(keys, blocks, is_prefix=False if prefix is None else list(prefix))

    def get_many(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
        self.store.get_many(keys, outs)

    def get_hits(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> list[bool]:
        self.check_batch(keys, outs)
        try:
            self.store.get_many(keys, outs)
            return [True] * len(keys)
        except KeyError:  # the store checks every key before it copies anything: nothing was read
            pass
        # a tiered store misses only a key never put (or deleted): one lookup, then one read of the others
        hits = self.contains_many(keys)
        found = [i for i, hit in enumerate(hits) if hit]
        if found:
            self.store.get_many([keys[i] for i in found], [outs[i] for i in found])
        return hits

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        if self._distributed:  # one request per home rank, not one round trip per key
            return [r is not None for r in self.store.directory.lookup_many(list(keys))]
        return [k in self.store for k in keys]

    def files(self) -> list[Path]:
        """The disk tier's block files (every rank's: the directory is shared)."""
        blocks = self._disk / "blocks" if self._disk is not None else None
        if blocks is None or not blocks.exists():
            return []
        return sorted(p for p in blocks.rglob("*") if p.is_file())

    def prepare_cold(self, keys: Sequence[str]) -> None:
        """Demote the blocks of ``keys`` to the disk tier, then drop the disk files from the page cache.
        Not collective: any rank may demote any keys."""
        if self._disk is None:
            raise ValueError(f"{self.name}: no disk tier in this run (options['disk'] is False)")
        self.store.demote(list(keys))
        drop_page_cache(self.files())

    def settle(self) -> None:
        self.store.settle()

    def tier_hits(self) -> dict[str, int]:
        return {t.name: t.hits for t in self.store.stats().tiers}

    def version(self) -> str:
        return __version__

    def close(self) -> None:
        """Collective on several ranks (the distributed store's close is)."""
        if self.store is None:
            return
        first = not self._distributed or self.store.rank == 0
        self.store.close()  # removes the block files (the store is not persistent)
        self.store = None
        if first and self._disk is not None:  # after a collective close: every rank's files are gone
            with contextlib.suppress(OSError):  # not empty: files this store did not write (left as found)
                self._disk.rmdir()
