"""``stats()`` reads counts kept as the store changes (O(1)); they must equal a recount of every key and block.

Random sequences of every call that changes what a namespace holds (puts and batches with dedup hits and
overwrites, deletes, protect and unprotect, demotions, reads that promote, copies that fail their digest
check, drops at a full last tier), over several namespaces and configurations; after each step the kept
counts of the whole store and of every namespace equal ``Store._walk_stats``.
"""
from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cascade_kv import CascadeConfig, CascadeError, Store

from .conftest import HOST, KIB, block

SIZES = [512, 4 * KIB, 8 * KIB, 20 * KIB]
KEYS = ["a", "b", "c", "d", "e", "f"]
SPACES = [None, "t1", "t2"]

keys = st.sampled_from(KEYS)
spaces = st.sampled_from(SPACES)
contents = st.tuples(st.sampled_from(SIZES), st.integers(0, 2))  # (nbytes, seed): equal pairs dedup


class CountsMatchTheWalk(RuleBasedStateMachine):
    """Calls that may fail (no room, a protected key to demote, a key not there) are made anyway: a
    refused call must leave the counts as right as an accepted one."""

    disk = True
    disk_capacity: int | None = 2 * HOST  # bounded: demotions into it drop its LRU blocks
    dedup = True

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cascade-counts-") if self.disk else None
        self.store = Store(CascadeConfig(host_capacity=HOST, disk_path=self.dir, disk_capacity=self.disk_capacity,
                                         promotion_threshold=1, dedup_enabled=self.dedup))
        self.views = {name: self.store if name is None else self.store.namespace(name) for name in SPACES}

    def teardown(self) -> None:
        self.store.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _try(self, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except CascadeError:
            pass  # refused: nothing changed, which the invariant checks as well

    @rule(space=spaces, key=keys, content=contents, prefix=st.booleans())
    def put(self, space, key, content, prefix):
        self._try(self.views[space].put, key, block(*content), is_prefix=prefix)

    @rule(space=spaces, batch=st.lists(st.tuples(keys, contents, st.booleans()), min_size=1, max_size=4))
    def put_many(self, space, batch):
        self._try(self.views[space].put_many, [k for k, _, _ in batch], [block(*c) for _, c, _ in batch],
                  is_prefix=[p for _, _, p in batch])

    @rule(space=spaces, ks=st.lists(keys, min_size=1, max_size=3, unique=True))
    def delete(self, space, ks):
        view = self.views[space]
        self._try(view.delete_many, [k for k in ks if k in view])

    @rule(space=spaces, key=keys, on=st.booleans())
    def protect(self, space, key, on):
        view = self.views[space]
        self._try(view.protect if on else view.unprotect, key)

    @rule(key=keys)
    def demote(self, key):
        if self.disk:
            self._try(self.store.demote, [key])

    @rule(space=spaces, ks=st.lists(keys, min_size=1, max_size=3))
    def get(self, space, ks):
        view = self.views[space]
        self._try(view.get_many, [k for k in ks if k in view])  # reads from disk queue promotions
        self.store.settle()

    @rule(key=keys, tier=st.sampled_from([0, 1]))
    def a_copy_fails_its_check(self, key, tier):
        """What a read does on a copy that fails its digest check (the block is lost without another copy)."""
        s = self.store
        with s._ctx.lock:
            e = s._ctx.keys.get(key)
            if e is not None and s._ctx.blocks[e.block_id].where >> tier & 1:
                s._placement.bad_copy(s._ctx.blocks[e.block_id], tier)

    @invariant()
    def counts_equal_the_walk(self):
        s = self.store
        assert s._stats(None) == s._walk_stats(None)
        for name in SPACES:
            space = s._default if name is None else s._ctx.spaces[name]
            assert s._stats(space) == s._walk_stats(space), name


class MemoryOnly(CountsMatchTheWalk):
    disk = False
    disk_capacity = None


class DedupOff(CountsMatchTheWalk):
    dedup = False


SETTINGS = settings(max_examples=60, stateful_step_count=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestCountsMatchTheWalk = CountsMatchTheWalk.TestCase
TestCountsMatchTheWalk.settings = SETTINGS
TestMemoryOnly = MemoryOnly.TestCase
TestMemoryOnly.settings = SETTINGS
TestDedupOff = DedupOff.TestCase
TestDedupOff.settings = settings(SETTINGS, max_examples=30)
