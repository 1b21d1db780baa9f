"""What every part of the single-node store shares (:class:`StoreContext`).

The store's parts (:mod:`.puts`, :mod:`.reads`, :mod:`.keys`, :mod:`.placement`, :mod:`.promoter`,
:mod:`.persistence`) are objects that each do one job and call each other through plain methods; this is
the state none of them owns: the tiers, the key and block tables, the one lock that guards them all, the
totals and the namespaces. Mixins sharing about twenty private fields (``Store(Persistence, Placement)``, as
it was) were rejected for the reason :mod:`cascade_kv.cluster.context` gives: a reader could not tell
which part reads or changes a field. What one part alone changes (placement's per-tier protected bytes,
the promoter's queue) lives in that part.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .blocks import Block, Entry
from .config import CascadeConfig
from .errors import ConfigError, StoreClosed
from .hashing import Hasher
from .ids import BlockId, SpacedKey, StoreKey
from .namespace import Space
from .policy import Policy
from .stats import Counters
from .tiers import Tier

WAIT_SLICE = 1.0  # seconds between re-checks while waiting on another thread's in-flight block
SMALL_COPY = 64 << 10  # a block up to this is copied under the lock: releasing and retaking it costs more


class StoreContext:
    """The single-node store's shared state. Every field but ``closed`` is set once, here; the tables
    and counters change, always under ``lock``."""

    __slots__ = ("config", "hasher", "tiers", "disk", "durable", "memory", "memory_mask", "policy", "lock", "cond",
                 "closed", "keys", "blocks", "counters", "default", "spaces", "write_order")

    def __init__(self, config: CascadeConfig, hasher: Hasher, tiers: list[Tier]) -> None:
        self.config = config
        self.hasher = hasher
        self.tiers = tiers
        """Fastest first. The parts see only their order and traits."""
        self.disk: int | None = next((i for i, t in enumerate(tiers) if t.traits.persistent), None)
        """Index of the persistent tier (None without ``disk_path``)."""
        if config.persist and self.disk is None:
            raise ConfigError("persist=True needs a disk tier (disk_path) to journal and keep the blocks in")
        self.durable: int | None = self.disk if config.persist else None
        """persist: the disk tier's index, whose copies the journal relies on (None without persist)."""
        self.memory = [i for i, t in enumerate(tiers) if t.traits.memory]
        self.memory_mask = sum(1 << i for i in self.memory)
        # credits rank copies in memory; the last tier (disk) stays LRU, where a victim is dropped
        self.policy = Policy([t.capacity if t.traits.memory else None for t in tiers],
                             semantic=config.semantic_eviction, order=config.eviction_order,
                             promotion_threshold=config.promotion_threshold, promote=config.locality_aware)
        self.lock = threading.Lock()
        """Guards every table, block and counter; bulk copies run outside it on pinned blocks."""
        self.cond = threading.Condition(self.lock)
        """Waits for another thread's block (pending, moving, rising, pinned) or the promoter."""
        self.closed = False
        self.keys: dict[StoreKey, Entry] = {}
        """Every namespace's keys (a named one's are :class:`~cascade_kv.ids.SpacedKey`)."""
        self.blocks: dict[BlockId, Block] = {}
        self.counters = Counters.for_tiers(len(tiers))
        """Totals: every namespace's."""
        self.default = Space(None, Counters.for_tiers(len(tiers)))
        """The store's own API's namespace."""
        self.spaces: dict[str, Space] = {}
        """Named namespaces, made by ``namespace()`` or found at reopen."""
        self.write_order: contextlib.AbstractContextManager[object] = (
            threading.Lock() if config.persist else contextlib.nullcontext())
        """persist: the journal and the commit of user mutations happen in one order."""

    def check_open(self) -> None:
        if self.closed:
            raise StoreClosed("the store is closed")

    def counts(self, b: Block) -> tuple[Counters, Counters]:
        """The totals and the counters of ``b``'s namespace: an event on a block counts in both."""
        return self.counters, (b.space if b.space is not None else self.default).counters

    def durable_copy(self, t: int) -> bool:
        """Whether tier ``t`` holds the copies a persistent store's journal relies on (they cannot
        go while the block lives: a reopened store would lose the key)."""
        return t == self.durable

    def must_be_in_memory(self, prefix: bool) -> bool:
        """Whether a block of a key put with ``is_prefix=prefix`` must have a copy in a memory tier."""
        return prefix and self.config.semantic_eviction

    @contextlib.contextmanager
    def unlocked(self) -> Iterator[None]:
        """The body runs without the lock (a bulk copy of a pinned block); the lock is held again on the
        way out, error or not, as every caller expects."""
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()

    def space_named(self, name: str) -> Space:
        """The named namespace's state, made on first use (lock held)."""
        space = self.spaces.get(name)
        if space is None:
            space = self.spaces[name] = Space(name, Counters.for_tiers(len(self.tiers)))
        return space

    def space_of(self, key: StoreKey) -> Space:
        return self.space_named(key.space) if isinstance(key, SpacedKey) else self.default


__all__ = ["SMALL_COPY", "StoreContext", "WAIT_SLICE"]
