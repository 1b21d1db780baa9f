"""Store.lookup and Namespace.lookup: how many leading keys are stored, asked without reading anything."""
from __future__ import annotations

import numpy as np
import pytest

from cascade_kv import IntegrityError, InvalidArgumentType, StoreClosed
from cascade_kv.tokens import namespace_for, prefix_keys

from .conftest import BLOCK, HOST, block, snapshot
from .test_integrity import flip_byte, _on_disk_only


def _put(store, keys, seed=0):
    store.put_many(keys, [block(nbytes=1024, seed=seed + i) for i in range(len(keys))])


def test_counts_the_leading_stored_keys(store):
    _put(store, ["a", "b", "c", b"e"])
    assert store.lookup(["a", "b", "c"]) == 3
    assert store.lookup(["a", "b", "d", b"e"]) == 2  # stops at the first gap, whatever follows
    assert store.lookup(["x", "a", "b"]) == 0
    assert store.lookup([b"e", "a"]) == 2
    assert store.lookup(["a", b"a"]) == 1  # "a" and b"a" are different keys
    assert store.lookup([]) == 0
    assert store.lookup(iter(["a", "b"])) == 2
    assert store.lookup(("a", "a", "b")) == 3


def test_a_prompts_prefix_keys(store):
    tokens = np.arange(100)
    keys = prefix_keys(tokens, 16, model="m", kv_spec="fp16")
    _put(store, keys[:4])
    assert store.lookup(keys) == 4
    other = prefix_keys(np.concatenate([tokens[:40], tokens[40:] + 1]), 16, model="m", kv_spec="fp16")
    assert store.lookup(other) == 2  # the prompts part in block 2: blocks 0 and 1 are shared
    store.delete(keys[1])
    assert store.lookup(keys) == 1


def test_keys_on_disk_count(store):
    _put(store, ["a"])
    for i in range(HOST // BLOCK):
        store.put(f"fill{i}", block(seed=100 + i))
    assert store.info("a").tiers == ("disk",)
    assert store.lookup(["a", "fill0"]) == 2


def test_a_lost_block_counts_as_missing(store):
    store.put("first", block(nbytes=1024, seed=77))
    flip_byte(_on_disk_only(store))  # "a": every copy is now bad
    with pytest.raises(IntegrityError):
        store.get("a")
    assert "a" in store and store.lookup(["first", "a", "fill0"]) == 1
    store.put("b", block(seed=1))  # the same bytes again heal it
    assert store.lookup(["first", "a", "fill0"]) == 3


def test_counts_nothing_and_moves_nothing(make_store):
    store = make_store()
    for i in range(HOST // BLOCK):
        store.put(f"k{i}", block(seed=i))
    before = store.stats()
    assert store.lookup([f"k{i}" for i in range(HOST // BLOCK)] + ["missing"]) == HOST // BLOCK
    assert store.stats() == before  # no get, hit or miss counted
    store.put("new", block(seed=99))  # needs room: the least recently used key goes down a tier
    assert store.info("k0").tiers == ("disk",)  # as if the lookup had not been: it is not a use


def test_bad_input_raises_and_changes_nothing(store):
    _put(store, ["a", "b"])
    before, stats = snapshot(store), store.stats()
    for bad in ("ab", b"ab", None, 3, ["a", 3], ["a", None], [["a"]]):
        with pytest.raises(InvalidArgumentType):
            store.lookup(bad)
    assert snapshot(store) == before and store.stats() == stats


def test_a_closed_store_refuses(make_store):
    store = make_store()
    store.close()
    with pytest.raises(StoreClosed):
        store.lookup(["a"])
    with pytest.raises(StoreClosed):
        store.lookup([])


def test_namespaces_never_see_each_others_keys(store):
    a, b = store.namespace("a"), store.namespace("b")
    _put(a, ["k0", "k1"])
    _put(store, ["k0"])
    assert a.lookup(["k0", "k1"]) == 2
    assert b.lookup(["k0", "k1"]) == 0
    assert store.lookup(["k0", "k1"]) == 1
    stats = a.stats()
    a.lookup(["k0", "nope"])
    assert a.stats() == stats
    with pytest.raises(InvalidArgumentType):
        a.lookup("k0")


def test_a_tenants_salted_keys_in_its_namespace(store):
    tokens = list(range(64))
    tenants = {salt: store.namespace(namespace_for(salt)) for salt in (b"t1", b"t2")}
    k1 = prefix_keys(tokens, 16, salt=b"t1")
    _put(tenants[b"t1"], k1)
    assert tenants[b"t1"].lookup(k1) == 4
    assert tenants[b"t2"].lookup(k1) == 0 and tenants[b"t2"].lookup(prefix_keys(tokens, 16, salt=b"t2")) == 0
    assert store.lookup(k1) == 0
