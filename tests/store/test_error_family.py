"""Every failure a caller can cause is in the family: a CascadeError that is also the builtin a caller
would catch for it, raised before anything changes (snapshot before and after)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import cascade_kv.tiers.host as host_module
from cascade_kv import CapacityError, CascadeConfig, CascadeError, ConfigError, Store, StoreClosed
from cascade_kv.errors import InvalidArgument, InvalidArgumentType, TierNotFound

from .conftest import KIB, block, snapshot, values

A = block(seed=5)

CASES = [  # (name, call, family class, builtin)
    ("key of the wrong type", lambda s: s.put(1, A), InvalidArgumentType, TypeError),
    ("keys given as one str", lambda s: s.put_many("ab", [A, A]), InvalidArgumentType, TypeError),
    ("keys not iterable", lambda s: s.get_many(5), InvalidArgumentType, TypeError),
    ("arrays not iterable", lambda s: s.put_many(["a"], 5), InvalidArgumentType, TypeError),
    ("value without bytes", lambda s: s.put("x", None), InvalidArgumentType, TypeError),
    ("object dtype", lambda s: s.put("x", np.array([1, None], dtype=object)), InvalidArgumentType, TypeError),
    ("ragged nesting", lambda s: s.put("x", [[1, 2], [3]]), InvalidArgumentType, TypeError),
    ("lengths differ", lambda s: s.put_many(["a", "b"], [A]), InvalidArgument, ValueError),
    ("is_prefix of the wrong length", lambda s: s.put_many(["a"], [A], is_prefix=[True, False]),
     InvalidArgument, ValueError),
    ("is_prefix not a bool", lambda s: s.put_many(["a"], [A], is_prefix=None), InvalidArgumentType, TypeError),
    ("outs of the wrong length", lambda s: s.get_many(["k0"], []), InvalidArgument, ValueError),
    ("outs not a sequence", lambda s: s.get_many(["k0"], 3), InvalidArgumentType, TypeError),
    ("out of the wrong dtype", lambda s: s.get("k0", np.empty(8 * KIB, np.float64)), InvalidArgument, ValueError),
    ("out not an array", lambda s: s.get("k0", bytearray(8 * KIB)), InvalidArgument, ValueError),  # as it always was
    ("demote a protected key", lambda s: s.demote(["p"]), InvalidArgument, ValueError),
    ("demote keys given as one str", lambda s: s.demote("k0"), InvalidArgumentType, TypeError),
    ("delete_many of one bytes key", lambda s: s.delete_many(b"k0"), InvalidArgumentType, TypeError),
    ("contains of a non-key", lambda s: s.contains(["k0"]), InvalidArgumentType, TypeError),
    ("stats of a tier there is not", lambda s: s.stats().tier("gpu"), TierNotFound, KeyError),
    ("block larger than every tier", lambda s: s.put("x", block(1 << 20, seed=1), is_prefix=True),
     CapacityError, MemoryError),
]


@pytest.fixture
def loaded(store):
    store.put("p", block(seed=1), is_prefix=True)
    for i in range(10):
        store.put(f"k{i}", block(seed=10 + i))
    return store


@pytest.mark.parametrize("name, call, family, builtin", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_family_error_and_changes_nothing(loaded, name, call, family, builtin):
    vals, before = values(loaded), snapshot(loaded)
    with pytest.raises(family) as err:
        call(loaded)
    assert isinstance(err.value, CascadeError) and isinstance(err.value, builtin), type(err.value).__mro__
    assert snapshot(loaded) == before and values(loaded) == vals


CLOSED = [
    ("stats", lambda s: s.stats()), ("info", lambda s: s.info("a")), ("keys", lambda s: s.keys()),
    ("len", lambda s: len(s)), ("in", lambda s: "a" in s), ("contains", lambda s: s.contains("a")),
    ("settle", lambda s: s.settle()), ("demote", lambda s: s.demote(["a"])),
    ("delete_many", lambda s: s.delete_many(["a"])), ("unprotect", lambda s: s.unprotect("a")),
]


@pytest.mark.parametrize("name, call", CLOSED, ids=[c[0] for c in CLOSED])
def test_a_closed_store_raises_store_closed_rather_than_stale_data(store, name, call):
    store.put("a", block(seed=1))
    store.close()
    with pytest.raises(StoreClosed) as err:
        call(store)
    assert isinstance(err.value, RuntimeError)


def test_a_host_capacity_beyond_the_machine_is_a_capacity_error_naming_the_size():
    with pytest.raises(CapacityError, match=r"64\.0 TiB") as err:
        Store(CascadeConfig(host_capacity="64TiB"))
    assert isinstance(err.value, MemoryError) and isinstance(err.value, CascadeError)


def test_a_failed_arena_mapping_is_a_capacity_error(monkeypatch):
    class NoMap:
        MAP_PRIVATE = MAP_ANONYMOUS = 0
        PAGESIZE = 4096

        @staticmethod
        def mmap(*args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(host_module, "mmap", NoMap)
    with pytest.raises(CapacityError, match=r"1\.0 MiB \(1048576 B\).*Cannot allocate memory"):
        Store(CascadeConfig(host_capacity="1MiB"))


def test_an_unknown_eviction_order_is_a_config_error():
    from cascade_kv.policy import Policy
    with pytest.raises(ConfigError):
        Policy([None], order="fifo")  # type: ignore[arg-type]


def test_concurrent_demotes_of_a_shared_block_copy_it_once(make_store, monkeypatch):
    """Two keys share one block; thread A demotes one and is held inside its copy to disk while thread B
    demotes the other. B must wait for A (it used to allocate the block in the disk tier a second time and
    raise a raw KeyError('block ... already allocated in disk tier'))."""
    store = make_store()
    store.put("a", block(seed=1))
    store.put("b", block(seed=1))  # a dedup hit: the same block
    in_copy, release, b_blocked = threading.Event(), threading.Event(), threading.Event()
    copy = store._placement.copy_between
    b_thread: list[threading.Thread] = []

    def held_copy(*args):
        if threading.current_thread().name == "A":
            in_copy.set()
            assert release.wait(30)
        return copy(*args)

    wait = store._ctx.cond.wait

    def noticed_wait(timeout=None):
        if b_thread and threading.current_thread() is b_thread[0]:
            b_blocked.set()  # B waits for A: exactly the interleaving under test
        return wait(timeout)

    monkeypatch.setattr(store._placement, "copy_between", held_copy)
    monkeypatch.setattr(store._ctx.cond, "wait", noticed_wait)
    errors: list[BaseException] = []

    def run(key):
        try:
            store.demote([key])
        except BaseException as e:  # noqa: BLE001 (checked below)
            errors.append(e)
        finally:
            b_blocked.set()  # B finishing (or failing) without waiting also lets the test go on

    a = threading.Thread(target=run, args=("a",), name="A")
    a.start()
    assert in_copy.wait(30)
    b = threading.Thread(target=run, args=("b",), name="B")
    b_thread.append(b)
    b.start()
    assert b_blocked.wait(30)
    release.set()
    a.join(30)
    b.join(30)
    assert not errors, errors
    assert store.info("a").tiers == store.info("b").tiers == ("disk",)
    assert store.stats().demotions == 1
    assert np.array_equal(store.get("b"), block(seed=1))


def test_every_error_class_is_in_the_family_subclasses_a_builtin_and_is_exported() -> None:
    import inspect

    import cascade_kv
    from cascade_kv import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10
    for c in classes:
        assert issubclass(c, errors.CascadeError), c
        builtin = [b for b in c.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
        assert c is errors.CascadeError or builtin, f"{c.__name__} subclasses no builtin a caller would catch"
        assert getattr(cascade_kv, c.__name__) is c and c.__name__ in cascade_kv.__all__, c
