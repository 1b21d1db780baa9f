"""Namespaces: isolation of keys, dedup and counters between users of one store; protected quotas;
reopening a persistent store with namespaced keys; bad names; a closed store."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cascade_kv import BlockNotFound, CapacityError, CascadeConfig, InvalidArgument, InvalidArgumentType, Store, StoreClosed
from cascade_kv.namespace import namespace_tag

from .conftest import BLOCK, block, same

COUNTERS = ("puts", "gets", "misses", "deletes", "dedup_hits", "dedup_bytes_saved", "keys", "blocks",
            "logical_bytes", "unique_bytes", "protected_blocks", "demotions", "promotions", "drops")


def counters(ns) -> dict[str, object]:
    s = ns.stats()
    return {**{f: getattr(s, f) for f in COUNTERS},
            "tiers": [(t.name, t.hits, t.misses, t.bytes_read, t.bytes_written, t.evictions, t.blocks) for t in s.tiers]}


def test_keys_get_delete_len_in_info_see_only_their_own_namespace(store: Store) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    store.put("k", block(seed=0))
    a.put("k", block(seed=1))
    a.put(b"raw", block(seed=2))
    assert sorted(map(repr, a.keys())) == sorted(map(repr, ["k", b"raw"]))
    assert store.keys() == ["k"] and b.keys() == []
    assert (len(store), len(a), len(b)) == (1, 2, 0)
    assert "k" in a and "k" in store and "k" not in b and b"raw" not in store and 42 not in a
    assert same(store.get("k"), block(seed=0)) and same(a.get("k"), block(seed=1))
    with pytest.raises(BlockNotFound, match="namespace 'b'"):
        b.get("k")
    with pytest.raises(BlockNotFound):
        b.delete("k")
    with pytest.raises(BlockNotFound):
        b.info("k")
    with pytest.raises(BlockNotFound):
        store.get(b"raw")
    a.delete("k")
    assert same(store.get("k"), block(seed=0)) and a.keys() == [b"raw"]
    assert store.namespace("a").keys() == [b"raw"]  # the same name: the same keys


def test_a_guess_of_another_namespaces_bytes_takes_the_miss_path(store: Store) -> None:
    """The issue's attack: B puts the bytes A holds; nothing B (or A) observes tells that A had them."""
    a, b = store.namespace("tenant-a"), store.namespace("tenant-b")
    x = block(seed=7)
    a.put("secret", x)
    a_before, b_before = counters(a), counters(b)
    total = store.stats(all_namespaces=True)
    b.put("guess", x)
    assert b.stats().dedup_hits == 0 and b.stats().dedup_bytes_saved == 0
    assert b.info("guess").shared_by == 1 and a.info("secret").shared_by == 1
    assert counters(a) == a_before
    after = store.stats(all_namespaces=True)
    # the miss path: a second block, written to the tiers like any new one
    assert after.blocks == total.blocks + 1 and after.unique_bytes == total.unique_bytes + x.nbytes
    assert after.tier("host").bytes_written == total.tier("host").bytes_written + x.nbytes
    assert after.dedup_hits == total.dedup_hits == 0
    b_now = counters(b)
    assert b_now["puts"] == b_before["puts"] + 1 and b_now["blocks"] == 1
    assert b.stats().tier("host").bytes_written == x.nbytes
    # the default namespace is a tenant too: its put of the same bytes is a miss as well
    store.put("mine", x)
    assert store.stats().dedup_hits == 0 and store.info("mine").shared_by == 1
    assert store.stats(all_namespaces=True).blocks == 3


def test_dedup_still_works_inside_a_namespace(store: Store) -> None:
    a = store.namespace("a")
    a.put_many(["x", "y"], [block(seed=1), block(seed=1)])
    a.put("z", block(seed=1))
    s = a.stats()
    assert (s.dedup_hits, s.dedup_bytes_saved, s.blocks, s.keys) == (2, 2 * BLOCK, 1, 3)
    assert a.info("z").shared_by == 3
    assert store.stats().dedup_hits == 0 and store.stats(all_namespaces=True).dedup_hits == 2


def test_each_namespace_counts_its_own_operations(store: Store) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    a.put("k", block(seed=1))
    a.get("k")
    with pytest.raises(BlockNotFound):
        a.get("missing")
    b.put_many(["k", "l"], [block(seed=2), block(seed=3)])
    b.delete("l")
    sa, sb, sd, total = a.stats(), b.stats(), store.stats(), store.stats(all_namespaces=True)
    assert (sa.puts, sa.gets, sa.misses, sa.deletes, sa.keys, sa.tier("host").hits) == (1, 1, 1, 0, 1, 1)
    assert (sb.puts, sb.gets, sb.misses, sb.deletes, sb.keys, sb.tier("host").hits) == (2, 0, 0, 1, 1, 0)
    assert (sd.puts, sd.gets, sd.keys, sd.blocks) == (0, 0, 0, 0)
    assert (total.puts, total.gets, total.misses, total.deletes, total.keys, total.blocks) == (3, 1, 1, 1, 2, 2)


def test_events_on_a_namespaces_blocks_count_in_its_stats(make_store) -> None:
    store = make_store(host_capacity=2 * BLOCK)
    a = store.namespace("a")
    for i, k in enumerate("xyz"):  # the third demotes the first to disk
        a.put(k, block(seed=i))
    sa, sd = a.stats(), store.stats()
    assert sa.demotions == sa.tier("host").evictions == 1 and sd.demotions == 0
    assert sa.tier("disk").blocks == 1 and sa.tier("disk").bytes_written == BLOCK


def test_protected_quota_bounds_the_bytes_a_namespace_protects(store: Store) -> None:
    a = store.namespace("a", protected_quota=2 * BLOCK)
    a.put_many(["p", "q"], [block(seed=1), block(seed=1)], is_prefix=True)  # one block, counted once
    a.put("r", block(seed=2), is_prefix=True)
    with pytest.raises(CapacityError, match=r"protected_quota is 16384 B, 16384 B are protected and this call "
                                            r"needs 8192 B more"):
        a.put("s", block(seed=3), is_prefix=True)
    assert "s" not in a and a.stats().blocks == 2
    a.put("s", block(seed=3))  # unprotected: no quota
    with pytest.raises(CapacityError, match="protect"):
        a.protect("s")
    assert not a.info("s").prefix
    a.put("r", block(seed=4), is_prefix=True)  # overwriting a prefix key releases its block first
    a.unprotect("p")
    a.unprotect("q")
    a.protect("s")
    assert a.stats().protected_blocks == 2
    store.put("big", block(seed=9), is_prefix=True)  # other namespaces are not bound by it
    store.namespace("b").put("big", block(seed=9), is_prefix=True)


def test_a_batch_over_the_quota_changes_nothing(store: Store) -> None:
    a = store.namespace("a", protected_quota="16KiB")
    a.put("keep", block(seed=0), is_prefix=True)
    before = counters(a), a.keys(), store.stats(all_namespaces=True).unique_bytes
    with pytest.raises(CapacityError):
        a.put_many(["x", "y", "z"], [block(seed=1), block(seed=2), block(seed=3)], is_prefix=[False, True, True])
    assert (counters(a), a.keys(), store.stats(all_namespaces=True).unique_bytes) == before


def test_a_quota_is_fixed_once_set(store: Store) -> None:
    assert store.namespace("a").protected_quota is None
    assert store.namespace("a", protected_quota="1KiB").protected_quota == 1024
    assert store.namespace("a", protected_quota=1024).protected_quota == 1024
    assert store.namespace("a").protected_quota == 1024
    with pytest.raises(InvalidArgument, match="fixed"):
        store.namespace("a", protected_quota=2048)
    for bad in (-1, "lots"):
        with pytest.raises(InvalidArgument):
            store.namespace("c", protected_quota=bad)
    for bad in (1.5, True, [1]):
        with pytest.raises(InvalidArgumentType):
            store.namespace("c", protected_quota=bad)
    assert store.namespace("c").protected_quota is None


def test_bad_names_are_refused(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        store.namespace("")
    for bad in (None, b"a", 1, ("a",)):
        with pytest.raises(InvalidArgumentType):
            store.namespace(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType):
        store.namespace("a").put(1, block())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="longer than"):  # every record of its keys carries the name
        store.namespace("n" * 1025)
    store.namespace("\u00e9" * 512)  # 1024 B of UTF-8: the longest name
    assert store.stats(all_namespaces=True).puts == 0


def test_a_closed_store_refuses_namespaces_and_their_views(make_store) -> None:
    store = make_store()
    a = store.namespace("a")
    a.put("k", block())
    store.close()
    with pytest.raises(StoreClosed):
        store.namespace("a")
    for call in (lambda: a.put("k", block()), lambda: a.get("k"), lambda: a.delete("k"), lambda: a.keys(),
                 lambda: len(a), lambda: "k" in a, lambda: a.info("k"), lambda: a.stats(), lambda: a.protect("k")):
        with pytest.raises(StoreClosed):
            call()


def test_dedup_off_serials_keep_working_with_namespaces(make_store) -> None:
    store = make_store(dedup_enabled=False)
    a, b = store.namespace("a"), store.namespace("b")
    a.put_many(["x", "y"], [block(seed=1), block(seed=1)])
    b.put("x", block(seed=1))
    assert a.stats().blocks == 2 and b.stats().blocks == 1 and a.stats().dedup_hits == 0
    assert same(a.get("y"), block(seed=1)) and same(b.get("x"), block(seed=1))


@pytest.mark.parametrize("dedup", [True, False])
def test_a_persistent_store_reopens_with_its_namespaced_keys(tmp_path: Path, dedup: bool) -> None:
    cfg = CascadeConfig(host_capacity=4 * BLOCK, disk_path=tmp_path / "d", persist=True, dedup_enabled=dedup)
    with Store(cfg) as store:
        a, b = store.namespace("a"), store.namespace("é/b")
        store.put("k", block(seed=0))
        a.put_many(["k", b"\x00"], [block(seed=1), block(seed=2)], is_prefix=[True, False])
        b.put("k", block(seed=1))
        a.put("gone", block(seed=3))
        a.delete("gone")
    with Store(cfg) as store:
        assert store.recovery is not None and store.recovery.clean and store.recovery.keys == 4
        a, b = store.namespace("a"), store.namespace("é/b")
        assert store.keys() == ["k"] and sorted(map(repr, a.keys())) == sorted(map(repr, ["k", b"\x00"]))
        assert b.keys() == ["k"]
        assert same(store.get("k"), block(seed=0)) and same(a.get("k"), block(seed=1))
        assert same(a.get(b"\x00"), block(seed=2)) and same(b.get("k"), block(seed=1))
        assert a.info("k").prefix and "host" in a.info("k").tiers and a.stats().protected_blocks == 1
        assert a.info("k").shared_by == b.info("k").shared_by == 1  # still two blocks
        names = {p.name for p in (tmp_path / "d" / "blocks").rglob("*") if p.is_file()}
        assert len(names) == 4
        if dedup:
            assert any(n.endswith("-" + namespace_tag("a").hex()) for n in names)
        store.namespace("a", protected_quota=BLOCK)  # set after reopening; its protected bytes are known
        with pytest.raises(CapacityError):
            a.protect(b"\x00")


def test_the_journal_records_the_namespace_and_reads_old_records() -> None:
    from cascade_kv import catalog
    from cascade_kv.ids import SpacedKey

    for key in ("k", b"k", SpacedKey("a", "k"), SpacedKey("a", b"k")):
        assert catalog._decode_key(catalog._encode_key(key)) == key
    assert catalog._decode_key({"s": "k"}) == "k"  # records written before namespaces
    with pytest.raises(ValueError):
        catalog._decode_key({"n": "", "s": "k"})


class NamespacesModel(RuleBasedStateMachine):
    """Puts, gets and deletes in the default namespace and two named ones, against one dict per namespace
    (host memory large enough that nothing is evicted: the model is exact)."""

    SPACES = [None, "a", "b"]
    keys = st.sampled_from(["k", "l", b"k"])
    spaces = st.sampled_from(SPACES)
    seeds = st.integers(0, 2)

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(CascadeConfig(host_capacity=64 * BLOCK))
        self.views = {s: self.store if s is None else self.store.namespace(s) for s in self.SPACES}
        self.model: dict[object, dict[object, int]] = {s: {} for s in self.SPACES}
        self.hits = {s: 0 for s in self.SPACES}

    def teardown(self) -> None:
        self.store.close()

    @rule(space=spaces, key=keys, seed=seeds)
    def put(self, space, key, seed):
        if seed in self.model[space].values():
            self.hits[space] += 1
        self.views[space].put(key, block(seed=seed))
        self.model[space][key] = seed

    @rule(space=spaces, key=keys)
    def get(self, space, key):
        if key in self.model[space]:
            assert same(self.views[space].get(key), block(seed=self.model[space][key]))
        else:
            with pytest.raises(BlockNotFound):
                self.views[space].get(key)

    @rule(space=spaces, key=keys)
    def delete(self, space, key):
        if key in self.model[space]:
            self.views[space].delete(key)
            del self.model[space][key]
        else:
            with pytest.raises(BlockNotFound):
                self.views[space].delete(key)

    @invariant()
    def views_match_the_model(self):
        for s, view in self.views.items():
            assert sorted(map(repr, view.keys())) == sorted(map(repr, self.model[s]))
            assert len(view) == len(self.model[s])
            st_ = view.stats()
            assert st_.blocks == len(set(self.model[s].values())) and st_.dedup_hits == self.hits[s]


TestNamespacesModel = NamespacesModel.TestCase
TestNamespacesModel.settings = settings(max_examples=25, stateful_step_count=20, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
