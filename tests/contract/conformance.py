"""The conformance suite of the store contract (:mod:`cascade_kv.contract`), one class for every implementation.

To test an implementation, subclass :class:`StoreContract` and provide ONE fixture, ``open_store``: a factory
``open_store(**config_overrides)`` returning a context manager that yields an open store built with those
:class:`~cascade_kv.CascadeConfig` fields (e.g. ``host_capacity="4MiB"``, ``disk_path=...``,
``dedup_enabled=False``) and closes it on exit (closing a store the test closed already must be harmless).
That is all: every test below then runs against it. ``tests/contract/test_store.py`` is the smallest example;
the service client's is ``tests/contract/test_client.py``. Optional parts of the contract are read from the
store's own ``supports_*`` / ``stats_scope`` attributes, so a test skips (never bends) where the contract lets
an implementation differ.

Tests never depend on each other or on the order they run in, and open small stores (a few MiB), so that
an implementation whose stores are costly to open (an MPI window per store) still runs the suite in seconds.
"""
from __future__ import annotations

import contextlib
import stat
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cascade_kv import (BlockNotFound, CapacityError, CascadeError, ConfigError, InvalidArgument, InvalidArgumentType,
                        StoreClosed)
from cascade_kv.contract import KVNamespace, KVStore, missing_members

KIB, MIB = 1 << 10, 1 << 20
HOST = "4MiB"  # every store of the suite: small, so that opening one costs little anywhere
OpenStore = Callable[..., contextlib.AbstractContextManager]

ROUND_TRIP = {  # name -> value: every kind of array a caller may hand the store
    "float16-2d": np.arange(24, dtype=np.float16).reshape(4, 6),
    "float32-0d": np.array(3.5, dtype=np.float32),
    "int8-empty": np.zeros(0, dtype=np.int8),
    "float64-empty-3d": np.zeros((3, 0, 2)),
    "bool": np.array([True, False, True]),
    "complex128": np.array([1 + 2j, -3j]),
    "uint64-big-endian": np.arange(5, dtype=">u8"),
    "float32-big-endian-2d": np.arange(6, dtype=">f4").reshape(2, 3),
    "structured": np.array([(1, 2.5), (3, -1.0)], dtype=[("a", "<i4"), ("b", ">f8")]),
    "nested-structured": np.zeros(2, dtype=[("x", "<u2", (3,)), ("y", [("p", "i1"), ("q", "<f4")])]),
    "bytes-S5": np.array([b"ab", b"cdefg"], dtype="S5"),
    "unicode-U3": np.array(["ab", "xyz"], dtype="<U3"),
    "void-V4": np.zeros(3, dtype="V4"),
    "datetime64": np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    "float16-256KiB": np.random.default_rng(0).standard_normal((128, 1024)).astype(np.float16),
}


def value(seed: int, nbytes: int = 4 * KIB, dtype: object = np.uint8) -> np.ndarray:
    """``nbytes`` pseudo-random bytes (the same for the same seed), viewed as ``dtype``."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).view(np.dtype(dtype))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (byte-wise: NaNs and odd bool bytes compare exactly)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def contents(store: KVNamespace) -> dict[object, tuple[np.dtype, tuple[int, ...], bool, bytes]]:
    """Every key's dtype, shape, prefix flag and bytes: what a failed call must leave as it was."""
    out = {}
    for k in store.keys():
        i = store.info(k)
        out[k] = (i.dtype, i.shape, i.prefix, store.get(k).tobytes())
    return out


def raises(exc: type[BaseException], call: Callable[[], object]) -> BaseException:
    """``call()`` raises ``exc``, and that error is one of the family's."""
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, CascadeError), f"{type(info.value).__name__} is not a CascadeError: {info.value}"
    return info.value


class StoreContract:
    """The contract's tests. A subclass provides the ``open_store`` fixture (see the module docstring)."""

    @pytest.fixture
    def open_store(self) -> OpenStore:
        raise NotImplementedError("a StoreContract subclass provides the open_store fixture")

    @pytest.fixture
    def make(self, open_store: OpenStore) -> OpenStore:
        """``open_store`` with the suite's small host arena unless a test asks for another."""
        return lambda **overrides: open_store(**{"host_capacity": HOST, **overrides})

    @pytest.fixture
    def store(self, make: OpenStore) -> Iterator[KVStore]:
        with make() as s:
            yield s

    @pytest.fixture
    def disk_store(self, make: OpenStore, tmp_path: Path) -> Iterator[KVStore]:
        with make(disk_path=tmp_path / "disk") as s:
            yield s

    # ------------------------------------------------------------------ the protocol itself
    def test_satisfies_the_protocol(self, store):
        assert missing_members(store) == []
        assert isinstance(store, KVStore)
        assert isinstance(store.namespace("ns"), KVNamespace)
        assert store.stats_scope in ("store", "rank")
        assert store.ignored_config <= set(type(store.config).__dataclass_fields__)

    # ------------------------------------------------------------------ round trips
    @pytest.mark.parametrize("name", list(ROUND_TRIP))
    def test_round_trip(self, store, name):
        a = ROUND_TRIP[name]
        store.put(name, a)
        got = store.get(name)
        assert same(got, a), (got, a)
        out = np.empty_like(a)
        assert store.get(name, out) is out and same(out, a)
        i = store.info(name)
        assert (i.dtype, i.shape, i.nbytes, i.prefix) == (a.dtype, a.shape, a.nbytes, False)

    # one test method run by every implementation's subclass (each its own executor): that is the design here
    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors])
    @given(a=hnp.arrays(hnp.scalar_dtypes() | hnp.byte_string_dtypes() | hnp.unicode_string_dtypes(),
                        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
           key=st.text(max_size=8) | st.binary(max_size=8))
    def test_round_trip_of_any_array(self, store, a, key):
        store.put(key, a)
        assert same(store.get(key), a)

    def test_non_contiguous_values_and_array_likes_are_stored_as_arrays(self, store):
        base = np.arange(60, dtype=np.int32).reshape(6, 10)
        store.put_many(["t", "s", "l"], [base.T, base[::2, 1::3], [[1, 2], [3, 4]]])
        assert same(store.get("t"), np.ascontiguousarray(base.T))
        assert same(store.get("s"), np.ascontiguousarray(base[::2, 1::3]))
        assert same(store.get("l"), np.array([[1, 2], [3, 4]]))

    def test_put_replaces_the_value_of_an_existing_key(self, store):
        store.put("k", value(1))
        store.put("k", value(2, 64, np.float32))
        assert same(store.get("k"), value(2, 64, np.float32)) and len(store) == 1

    def test_a_key_given_twice_in_a_put_takes_its_last_value_and_flag(self, store):
        store.put_many(["k", "x", "k"], [value(1), value(2), value(3)], is_prefix=[False, False, True])
        assert same(store.get("k"), value(3)) and store.info("k").prefix
        assert sorted(store.keys()) == ["k", "x"]
        assert store.stats().puts == 2  # one per distinct key

    def test_str_and_bytes_keys_are_different_keys(self, store):
        store.put_many(["k", b"k"], [value(1), value(2)])
        assert same(store.get("k"), value(1)) and same(store.get(b"k"), value(2))
        store.delete(b"k")
        assert "k" in store and b"k" not in store and store.keys() == ["k"]

    # ------------------------------------------------------------------ all or nothing
    @pytest.mark.parametrize("bad", ["value", "key", "lengths", "flags", "keys-as-one-str"])
    def test_a_bad_item_stores_nothing_of_the_batch(self, store, bad):
        store.put_many(["old", "kept"], [value(0), value(1)], is_prefix=[True, False])
        before, puts = contents(store), store.stats().puts
        keys, arrays, flags = ["old", "new", "other"], [value(5), value(6), value(7)], False
        if bad == "value":
            arrays[2], exc = np.array([object()]), InvalidArgumentType
        elif bad == "key":
            keys[2], exc = 3, InvalidArgumentType
        elif bad == "lengths":
            arrays, exc = arrays[:2], InvalidArgument
        elif bad == "flags":
            flags, exc = [True, False], InvalidArgument
        else:
            keys, arrays, exc = "abc", arrays, InvalidArgumentType
        raises(exc, lambda: store.put_many(keys, arrays, is_prefix=flags))
        assert contents(store) == before and store.stats().puts == puts

    @pytest.mark.parametrize("bad", [None, "text", b"raw", 7, {"a": 1}, np.array([None, 1], dtype=object)])
    def test_values_with_no_bytes_to_store_are_refused(self, store, bad):
        raises(InvalidArgumentType, lambda: store.put("k", bad))
        assert "k" not in store

    def test_a_value_bigger_than_every_tier_is_refused_and_changes_nothing(self, make, tmp_path):
        for overrides in ({}, {"disk_path": tmp_path / "d", "disk_capacity": "2MiB"}):
            with make(host_capacity="1MiB", **overrides) as store:
                store.put_many(["a", "b"], [value(1), value(2)], is_prefix=[True, False])
                before = contents(store)
                e = raises(CapacityError, lambda: store.put_many(["a", "big"], [value(3), value(4, 3 * MIB)]))
                assert isinstance(e, MemoryError)
                assert contents(store) == before

    def test_a_protected_value_bigger_than_memory_is_refused_even_with_a_disk(self, make, tmp_path):
        with make(host_capacity="1MiB", disk_path=tmp_path / "d") as store:
            store.put("a", value(1))
            raises(CapacityError, lambda: store.put("big", value(2, 2 * MIB), is_prefix=True))
            assert store.keys() == ["a"]
            store.put("big", value(2, 2 * MIB))  # unprotected, it may live on disk
            assert same(store.get("big"), value(2, 2 * MIB))

    # ------------------------------------------------------------------ reads
    def test_get_of_a_missing_key_is_block_not_found_a_key_error(self, store):
        e = raises(BlockNotFound, lambda: store.get("nope"))
        assert isinstance(e, KeyError)

    def test_get_many_returns_the_outs_given_and_new_arrays_elsewhere(self, store):
        a, b = value(1, 64, np.float32), value(2, 32, np.int16).reshape(4, 4)
        store.put_many(["a", "b"], [a, b])
        out = np.empty_like(a)
        got = store.get_many(["a", "b", "a"], [out, None, None])
        assert got[0] is out and same(out, a) and same(got[1], b) and same(got[2], a)
        assert all(same(x, y) for x, y in zip(store.get_many(["b", "a"]), [b, a]))
        assert store.get_many([]) == []

    def test_a_non_contiguous_out_is_filled(self, store):
        a = np.arange(12, dtype=np.int64).reshape(3, 4)
        store.put("a", a)
        out = np.zeros((4, 3), dtype=np.int64).T
        assert store.get("a", out) is out and np.array_equal(out, a)

    @pytest.mark.parametrize("bad", ["dtype", "shape", "read-only", "missing-key", "lengths", "outs-one-array"])
    def test_get_many_checks_every_key_and_out_before_writing_any(self, store, bad):
        a, b = value(1, 64, np.float32), value(2, 64, np.float32)
        store.put_many(["a", "b"], [a, b])
        before, gets = contents(store), store.stats().gets
        outs = [np.full_like(a, 7), np.full_like(b, 7)]
        keys, exc = ["a", "b"], InvalidArgument
        if bad == "dtype":
            outs[1] = np.full(16, 7, dtype=np.int32)
        elif bad == "shape":
            outs[1] = np.full((4, 4), 7, dtype=np.float32)
        elif bad == "read-only":
            outs[1].flags.writeable = False
        elif bad == "missing-key":
            keys, exc = ["a", "nope"], BlockNotFound
        elif bad == "outs-one-array":
            keys, outs, exc = ["a"], np.full_like(a, 7), InvalidArgumentType
        else:
            outs = outs + [np.full_like(a, 7)]
        raises(exc, lambda: store.get_many(keys, outs))
        assert all((o == 7).all() for o in outs), "a buffer was written by a call that failed"
        assert contents(store) == before and store.stats().gets == gets + len(before)  # contents() read each once

    def test_an_out_that_is_not_an_array_is_refused(self, store):
        store.put("a", value(1))
        # errors.py names InvalidArgumentType for it, arrays.check_out raises InvalidArgument: either is the family's
        raises((InvalidArgument, InvalidArgumentType), lambda: store.get("a", bytearray(4 * KIB)))

    # ------------------------------------------------------------------ keys of the wrong type
    @pytest.mark.parametrize("key", [1, 2.5, None, ("a",), bytearray(b"a")])
    def test_a_key_that_is_not_str_or_bytes_is_refused_everywhere(self, store, key):
        store.put("a", value(1))
        for call in (lambda: store.put(key, value(1)), lambda: store.get(key), lambda: store.get_many([key]),
                     lambda: store.delete(key), lambda: store.delete_many(["a", key]), lambda: store.protect(key),
                     lambda: store.unprotect(key), lambda: store.info(key), lambda: store.contains(key),
                     lambda: store.lookup(["a", key])):
            raises(InvalidArgumentType, call)
        assert (key in store) is False
        assert store.keys() == ["a"]

    @pytest.mark.parametrize("call", ["get_many", "delete_many", "lookup", "demote"])
    def test_one_key_where_a_sequence_is_expected_is_refused(self, disk_store, call):
        disk_store.put_many(["a", "b"], [value(1), value(2)])
        raises(InvalidArgumentType, lambda: getattr(disk_store, call)("ab"))
        assert sorted(disk_store.keys()) == ["a", "b"]

    # ------------------------------------------------------------------ deletes
    def test_delete_removes_the_key_only(self, store):
        store.put_many(["a", "b"], [value(1), value(2)])
        store.delete("a")
        raises(BlockNotFound, lambda: store.get("a"))
        assert store.keys() == ["b"] and same(store.get("b"), value(2))
        raises(BlockNotFound, lambda: store.delete("a"))

    def test_delete_many_with_a_missing_key_removes_nothing(self, store):
        store.put_many(["a", "b", "c"], [value(1), value(2), value(3)])
        before = contents(store)
        raises(BlockNotFound, lambda: store.delete_many(["a", "nope", "b"]))
        assert contents(store) == before
        store.delete_many(["a", "b", "a"])  # a key given twice is removed once
        assert store.keys() == ["c"] and store.stats().deletes == 2

    def test_deleted_bytes_can_be_put_again(self, store):
        store.put("a", value(1))
        store.delete("a")
        store.put("b", value(1))
        assert same(store.get("b"), value(1))

    # ------------------------------------------------------------------ protection and info
    def test_protect_unprotect_and_the_prefix_flag(self, store):
        store.put("p", value(1), is_prefix=True)
        store.put("u", value(2))
        assert store.info("p").prefix and not store.info("u").prefix
        store.unprotect("p")
        store.protect("u")
        assert not store.info("p").prefix and store.info("u").prefix
        store.protect("u")  # twice: nothing more
        assert store.info("u").prefix
        for call in (store.protect, store.unprotect, store.info):
            raises(BlockNotFound, lambda: call("nope"))

    def test_info_describes_the_value(self, store):
        a = value(1, 96, np.float32).reshape(4, 6)
        store.put("a", a)
        i = store.info("a")
        assert (i.dtype, i.shape, i.nbytes, i.prefix, i.shared_by) == (a.dtype, a.shape, 96, False, 1)
        assert isinstance(i.digest, str) and int(i.digest, 16) >= 0
        assert i.tiers and all(isinstance(t, str) for t in i.tiers)

    def test_equal_bytes_share_one_block_and_are_counted_as_dedup_hits(self, store):
        store.put("a", value(1))
        hits, saved = store.stats().dedup_hits, store.stats().dedup_bytes_saved
        store.put("b", value(1).view(np.int32).reshape(32, 32))  # same bytes, another dtype and shape
        assert store.info("a").digest == store.info("b").digest
        assert store.info("a").shared_by == store.info("b").shared_by == 2
        s = store.stats()
        assert (s.dedup_hits, s.dedup_bytes_saved) == (hits + 1, saved + 4 * KIB)
        assert same(store.get("b"), value(1).view(np.int32).reshape(32, 32))
        store.delete("a")
        assert store.info("b").shared_by == 1 and same(store.get("b"), value(1).view(np.int32).reshape(32, 32))

    def test_dedup_disabled_stores_equal_bytes_apart(self, make):
        with make(dedup_enabled=False) as store:
            store.put_many(["a", "b"], [value(1), value(1)])
            store.put("c", value(1))
            assert store.info("a").digest == store.info("c").digest  # still the content address
            assert store.info("a").shared_by == store.info("c").shared_by == 1
            assert store.stats().dedup_hits == 0
            store.delete("a")
            assert same(store.get("b"), value(1)) and same(store.get("c"), value(1))

    # ------------------------------------------------------------------ listing
    def test_keys_len_in_and_contains(self, store):
        assert store.keys() == [] and len(store) == 0 and "a" not in store and not store.contains("a")
        store.put_many(["a", b"b", ""], [value(1), value(2), value(3)])
        assert sorted(store.keys(), key=repr) == sorted(["a", b"b", ""], key=repr) and len(store) == 3
        assert "a" in store and b"b" in store and "" in store and store.contains(b"b")
        assert b"a" not in store and 5 not in store and None not in store

    # ------------------------------------------------------------------ lookup
    def test_lookup_counts_the_leading_stored_keys(self, store):
        chain = [f"block-{i}" for i in range(6)]
        assert store.lookup(chain) == 0 and store.lookup([]) == 0
        store.put_many(chain[:4], [value(i) for i in range(4)])
        assert store.lookup(chain) == 4 and store.lookup(chain[:3]) == 3 and store.lookup(chain[4:]) == 0
        store.delete("block-1")
        assert store.lookup(chain) == 1
        store.put("block-5", value(5))
        assert store.lookup(chain) == 1 and store.lookup(["block-0", "block-0", "block-2"]) == 3

    def test_lookup_reads_nothing(self, store):
        store.put("a", value(1))
        before = store.stats()
        assert store.lookup(["a", "b"]) == 1
        after = store.stats()
        assert (after.gets, after.misses) == (before.gets, before.misses)

    # ------------------------------------------------------------------ stats
    def test_operation_counters_move_as_documented(self, store):
        s0 = store.stats()
        store.put_many(["a", "b"], [value(1), value(2)])
        store.put("c", value(1))  # a dedup hit
        store.get_many(["a", "b"])
        store.get("c")
        raises(BlockNotFound, lambda: store.get("nope"))
        store.delete_many(["a", "c"])
        s = store.stats()
        assert (s.puts - s0.puts, s.gets - s0.gets, s.misses - s0.misses, s.deletes - s0.deletes,
                s.dedup_hits - s0.dedup_hits) == (3, 3, 1, 2, 1)
        if store.stats_scope == "store":
            assert (s.keys, s.blocks, s.logical_bytes, s.unique_bytes) == (1, 1, 4 * KIB, 4 * KIB)
        assert store.stats(all_namespaces=True).puts >= s.puts

    def test_protected_blocks_are_counted_and_kept_in_memory(self, make, tmp_path):
        with make(host_capacity="1MiB", disk_path=tmp_path / "d") as store:
            store.put("p", value(0, 64 * KIB), is_prefix=True)
            store.put_many([f"u{i}" for i in range(40)], [value(i + 1, 64 * KIB) for i in range(40)])  # 2.5x memory
            assert all(same(store.get(f"u{i}"), value(i + 1, 64 * KIB)) for i in range(40))
            assert store.info("p").tiers[0] != "disk"
            if store.stats_scope == "store":
                s = store.stats()
                assert s.protected_blocks == s.protected_in_memory == 1

    def test_without_a_disk_pressure_may_drop_unprotected_values_but_never_corrupts_one(self, make):
        with make(host_capacity="1MiB") as store:
            store.put("p", value(0, 64 * KIB), is_prefix=True)
            for i in range(40):
                store.put(f"u{i}", value(i + 1, 64 * KIB))
            listed = set(store.keys())
            for i in range(40):
                try:
                    assert same(store.get(f"u{i}"), value(i + 1, 64 * KIB))
                except BlockNotFound:
                    pass  # dropped: the contract allows it for unprotected data (the key may stay listed)
                else:
                    assert f"u{i}" in listed, "a readable key is missing from keys()"
            assert same(store.get("p"), value(0, 64 * KIB)) and "p" in listed

    # ------------------------------------------------------------------ namespaces
    def test_namespaces_are_isolated_both_ways(self, store):
        a, b = store.namespace("a"), store.namespace("b")
        store.put("k", value(0))
        a.put("k", value(1))
        b.put_many(["k", "only-b"], [value(2), value(3)])
        assert same(store.get("k"), value(0)) and same(a.get("k"), value(1)) and same(b.get("k"), value(2))
        assert store.keys() == ["k"] and a.keys() == ["k"] and sorted(b.keys()) == ["k", "only-b"]
        assert len(store) == 1 and len(a) == 1 and len(b) == 2
        assert "only-b" not in a and "only-b" not in store and not a.contains("only-b")
        raises(BlockNotFound, lambda: a.get("only-b"))
        raises(BlockNotFound, lambda: a.delete("only-b"))
        a.delete("k")
        assert "k" in store and "k" in b and "k" not in a
        assert same(store.namespace("b").get("only-b"), value(3))  # views of one name see the same keys

    def test_equal_bytes_in_two_namespaces_are_no_dedup_hit(self, store):
        a, b = store.namespace("a"), store.namespace("b")
        a.put("x", value(1))
        b.put("y", value(1))
        assert a.stats().dedup_hits == b.stats().dedup_hits == 0
        assert a.info("x").shared_by == 1 and a.info("x").digest == b.info("y").digest
        a.put("z", value(1))
        assert a.stats().dedup_hits == 1 and a.info("z").shared_by == 2 and b.info("y").shared_by == 1

    def test_namespace_api_lookup_protect_and_counters(self, store):
        ns = store.namespace("tenant")
        ns.put_many(["0", "1", "2"], [value(0), value(1), value(2)], is_prefix=True)
        store.put_many(["0", "1"], [value(5), value(6)])
        assert ns.lookup(["0", "1", "2", "3"]) == 3 and store.lookup(["0", "1", "2"]) == 2
        ns.unprotect("1")
        assert not ns.info("1").prefix and ns.info("0").prefix
        out = np.empty(4 * KIB, np.uint8)
        assert ns.get("2", out) is out and same(out, value(2))
        raises(BlockNotFound, lambda: ns.get("nope"))
        s = ns.stats()
        assert (s.puts, s.gets, s.misses) == (3, 1, 1)
        assert store.stats().puts == 2 and store.stats(all_namespaces=True).puts >= 5

    def test_namespace_names_and_quotas(self, store):
        raises(InvalidArgumentType, lambda: store.namespace(5))
        raises(InvalidArgument, lambda: store.namespace(""))
        ns = store.namespace("q", protected_quota=6 * KIB)
        ns.put("a", value(1), is_prefix=True)
        raises(CapacityError, lambda: ns.put_many(["b", "c"], [value(2), value(3)], is_prefix=True))
        assert ns.keys() == ["a"]
        ns.put("b", value(2))
        raises(CapacityError, lambda: ns.protect("b"))
        assert not ns.info("b").prefix
        raises(InvalidArgument, lambda: store.namespace("q", protected_quota=16 * KIB))
        assert store.namespace("q").protected_quota == 6 * KIB

    # ------------------------------------------------------------------ demote
    def test_demote_moves_values_to_disk_and_keeps_them_readable(self, disk_store, store):
        if not disk_store.supports_demote:
            pytest.skip("demote not supported")
        disk_store.put_many(["a", "b", "p"], [value(1), value(2), value(3)], is_prefix=[False, False, True])
        disk_store.demote(["a", "b", "a"])
        assert disk_store.info("a").tiers == ("disk",) and same(disk_store.get("a"), value(1))
        raises(InvalidArgument, lambda: disk_store.demote(["b", "p"]))
        raises(BlockNotFound, lambda: disk_store.demote(["nope"]))
        disk_store.protect("a")  # a protected block comes back into memory
        assert disk_store.info("a").tiers[0] != "disk" and same(disk_store.get("a"), value(1))
        store.put("a", value(1))
        raises(ConfigError, lambda: store.demote(["a"]))  # no disk tier

    def test_a_key_sharing_a_protected_block_cannot_be_demoted(self, disk_store):
        if not disk_store.supports_demote:
            pytest.skip("demote not supported")
        disk_store.put("p", value(1), is_prefix=True)
        disk_store.put("u", value(1))
        raises(InvalidArgument, lambda: disk_store.demote(["u"]))
        assert disk_store.info("u").tiers[0] != "disk"

    def test_disk_files_are_private_unless_group_access(self, make, tmp_path):
        for group, path in ((False, tmp_path / "private"), (True, tmp_path / "group")):
            with make(disk_path=path, group_access=group) as store:
                if not store.supports_demote:
                    pytest.skip("demote not supported: nothing is written to disk on demand")
                store.put("a", value(1))
                store.demote(["a"])
                files = [p for p in path.rglob("*") if p.is_file()]
                assert files
                for p in files:
                    mode = stat.S_IMODE(p.stat().st_mode)
                    assert mode & 0o007 == 0 and bool(mode & 0o040) == group, (p, oct(mode))

    def test_close_removes_the_block_files_of_a_store_without_persist(self, make, tmp_path):
        path = tmp_path / "scratch"
        with make(host_capacity="1MiB", disk_path=path) as store:
            store.put_many([f"k{i}" for i in range(40)], [value(i, 64 * KIB) for i in range(40)])  # 2.5x memory
            assert [p for p in path.rglob("*") if p.is_file() and "blocks" in p.parts]
        assert not [p for p in path.rglob("*") if p.is_file() and "blocks" in p.parts]

    # ------------------------------------------------------------------ persistence
    def test_persist_reopens_with_every_acknowledged_key(self, make, tmp_path):
        path = tmp_path / "persist"
        with make(disk_path=path, persist=True) as store:
            if not store.supports_persist:
                pytest.skip("persist not supported")
            store.put_many(["a", b"b"], [ROUND_TRIP["structured"], value(2)], is_prefix=[True, False])
            store.namespace("ns").put("c", value(3))
            store.delete(b"b")
        with make(disk_path=path, persist=True) as store:
            assert store.keys() == ["a"] and store.info("a").prefix
            assert same(store.get("a"), ROUND_TRIP["structured"]) and same(store.namespace("ns").get("c"), value(3))

    # ------------------------------------------------------------------ config
    def test_every_config_field_is_accepted(self, make, tmp_path):
        with make(disk_path=tmp_path / "d", disk_capacity="64MiB", eviction_order="reuse", semantic_eviction=False,
                  locality_aware=False, promotion_threshold=1, replica_threshold=2, hash_algorithm="sha256",
                  verify_reads="always") as store:
            store.put("a", value(1), is_prefix=True)
            assert same(store.get("a"), value(1)) and store.info("a").prefix
            assert store.config.hash_algorithm == "sha256"

    # ------------------------------------------------------------------ threads
    def test_puts_and_gets_from_many_threads_see_each_other(self, store):
        def work(t: int) -> None:
            keys = [f"t{t}-{i}" for i in range(20)]
            for i, k in enumerate(keys):
                store.put(k, value(t * 100 + i, 1 * KIB))
            assert all(same(store.get(k), value(t * 100 + i, 1 * KIB)) for i, k in enumerate(keys))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(4)))
        assert len(store) == 80 and store.lookup([f"t3-{i}" for i in range(20)]) == 20

    # ------------------------------------------------------------------ life cycle
    def test_settle_returns(self, store):
        store.put("a", value(1))
        store.get("a")
        assert store.settle() is None

    def test_every_call_after_close_raises_store_closed(self, make):
        with make() as store:
            ns = store.namespace("ns")
            store.put("a", value(1))
            store.close()
            store.close()  # a second close does nothing
            calls = [lambda: store.put("a", value(1)), lambda: store.put_many(["b"], [value(2)]),
                     lambda: store.get("a"), lambda: store.get_many(["a"]), lambda: store.delete("a"),
                     lambda: store.delete_many(["a"]), lambda: store.protect("a"), lambda: store.unprotect("a"),
                     lambda: store.info("a"), lambda: store.keys(), lambda: len(store), lambda: "a" in store,
                     lambda: store.contains("a"), lambda: store.lookup(["a"]), lambda: store.stats(),
                     lambda: store.stats(all_namespaces=True), lambda: store.namespace("other"),
                     lambda: store.settle(), lambda: store.demote(["a"]),
                     lambda: ns.put("a", value(1)), lambda: ns.get("a"), lambda: ns.keys(), lambda: len(ns),
                     lambda: ns.lookup(["a"]), lambda: ns.stats(), lambda: ns.delete("a"), lambda: ns.info("a")]
            for i, call in enumerate(calls):
                try:
                    call()
                except StoreClosed:
                    continue
                except BaseException as e:
                    raise AssertionError(f"call {i}: {type(e).__name__}: {e}, expected StoreClosed") from e
                raise AssertionError(f"call {i}: no error after close")

    def test_leaving_the_with_closes_the_store(self, make):
        with make() as store:
            store.put("a", value(1))
        raises(StoreClosed, lambda: store.get("a"))
