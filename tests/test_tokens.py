"""Token-prefix keys (cascade_kv.tokens): chained, deterministic across containers, and every setting the
KV depends on changes every key."""
from __future__ import annotations

import struct

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_kv import InvalidArgument, InvalidArgumentType
from cascade_kv.tokens import KEY_SIZE, namespace_for, prefix_keys

tokens = st.lists(st.integers(0, 2**63 - 1), max_size=80)
small_tokens = st.lists(st.integers(0, 50_000), max_size=80)
block_sizes = st.integers(1, 9)


@given(small_tokens, block_sizes)
def test_one_32_byte_key_per_full_block(ids, n):
    keys = prefix_keys(ids, n)
    assert len(keys) == len(ids) // n
    assert all(isinstance(k, bytes) and len(k) == KEY_SIZE for k in keys)
    assert len(set(keys)) == len(keys)


@given(tokens, block_sizes)
def test_the_same_tokens_in_any_container_give_the_same_keys(ids, n):
    keys = prefix_keys(ids, n)
    assert prefix_keys(tuple(ids), n) == keys
    assert prefix_keys(np.array(ids, dtype=np.int64), n) == keys
    assert prefix_keys(np.array(ids, dtype=">i8"), n) == keys  # big-endian: values count, not their bytes
    assert prefix_keys(np.array(ids + [0], dtype=np.uint64)[:-1], n) == keys
    assert prefix_keys([np.int64(t) for t in ids], n) == keys
    if max(ids, default=0) < 2**31:
        assert prefix_keys(np.array(ids, dtype=np.int32), n) == keys


def test_a_strided_array_gives_the_keys_of_its_values():
    ids = np.arange(64)
    assert prefix_keys(ids[::2], 4) == prefix_keys(list(range(0, 64, 2)), 4)


def test_torch_tensors_give_the_same_keys():
    torch = pytest.importorskip("torch", reason="the test extra (torch) is not installed (pip install '.[test]')")
    ids = [5, 17, 9000, 3, 0, 42, 7, 7, 1]
    keys = prefix_keys(ids, 2)
    assert prefix_keys(torch.tensor(ids), 2) == keys
    assert prefix_keys(torch.tensor(ids, dtype=torch.int32), 2) == keys
    assert prefix_keys(torch.tensor(ids)[:8], 2) == keys  # a view; the partial block was dropped anyway
    with pytest.raises(InvalidArgument, match="1-D"):
        prefix_keys(torch.tensor([ids[:4], ids[4:8]]), 2)
    with pytest.raises(InvalidArgumentType, match="integers"):
        prefix_keys(torch.tensor([1.0, 2.0]), 1)


@given(small_tokens, small_tokens, block_sizes)
def test_a_prefix_of_the_tokens_gives_a_prefix_of_the_keys(head, tail, n):
    short, long = prefix_keys(head, n), prefix_keys(head + tail, n)
    assert long[:len(short)] == short


@given(st.lists(st.integers(0, 50_000), min_size=1, max_size=80), block_sizes, st.data())
def test_a_change_in_a_block_changes_its_key_and_every_later_one(ids, n, data):
    keys = prefix_keys(ids, n)
    i = data.draw(st.integers(0, len(ids) - 1))
    changed = ids[:i] + [ids[i] + 1] + ids[i + 1:]
    other = prefix_keys(changed, n)
    block = i // n
    assert other[:block] == keys[:block]
    assert all(a != b for a, b in zip(other[block:], keys[block:]))


@given(small_tokens, block_sizes, st.integers(1, 5))
def test_a_trailing_partial_block_gets_no_key(ids, n, extra):
    full = ids[:len(ids) // n * n]
    assert prefix_keys(full + [1] * (extra % n), n) == prefix_keys(full, n)


@pytest.mark.parametrize("setting", [{"salt": b"tenant-b"}, {"model": "llama-3-8b@rev2"},
                                     {"kv_spec": "fp8:[2,32,8,128,16]"}])
def test_salt_model_and_kv_spec_each_change_every_key(setting):
    ids = list(range(64))
    base = {"salt": b"tenant-a", "model": "llama-3-8b@rev1", "kv_spec": "fp16:[2,32,8,128,16]"}
    keys, other = prefix_keys(ids, 16, **base), prefix_keys(ids, 16, **{**base, **setting})
    assert len(keys) == 4 and all(a != b for a, b in zip(keys, other))


def test_block_tokens_changes_every_key():
    ids = list(range(48))
    assert not set(prefix_keys(ids, 8)) & set(prefix_keys(ids, 16))
    assert not set(prefix_keys(ids, 1)) & set(prefix_keys(ids, 2))


def test_fields_are_length_prefixed():
    ids = list(range(16))
    assert prefix_keys(ids, 16, model="ab", kv_spec="c") != prefix_keys(ids, 16, model="a", kv_spec="bc")
    assert prefix_keys(ids, 16, kv_spec="x", salt=b"") != prefix_keys(ids, 16, kv_spec="", salt=b"x")


def test_the_format_is_the_documented_one_and_stable():
    # keys outlive the process (a persistent store): a format change must come with a new version tag,
    # or stored keys silently stop matching
    def frame(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    parent = blake3.blake3(frame(b"m") + frame(b"fp16") + frame(b"salt") + struct.pack("<Q", 2),
                           derive_key_context="cascade-kv/prefix/v1").digest()
    expected = []
    for block in ([1, 2], [3, 4]):
        parent = blake3.blake3(parent + struct.pack("<2q", *block)).digest()
        expected.append(parent)
    keys = prefix_keys([1, 2, 3, 4, 5], 2, model="m", kv_spec="fp16", salt=b"salt")
    assert keys == expected
    assert prefix_keys([1, 2, 3, 4], 2, model="m", kv_spec="fp16")[1].hex() == (
        "f537bb8b67e9ab8091bc06dcd03488512e234fc218f3391a77de1faec60b5a61")


def test_no_tokens_no_keys():
    assert prefix_keys([], 4) == [] and prefix_keys(np.array([], np.int64), 4) == [] and prefix_keys([1], 4) == []


@pytest.mark.parametrize("ids, error, match", [
    ([1, -2], InvalidArgument, ">= 0"),
    (np.array([3, -1]), InvalidArgument, ">= 0"),
    ([2**63], InvalidArgument, "int64"),
    ([2**70], InvalidArgument, "int64"),
    ([[1, 2], [3, 4]], InvalidArgument, "1-D"),
    (np.zeros((2, 2), np.int64), InvalidArgument, "1-D"),
    (np.int64(3), InvalidArgumentType, "token_ids"),
    ([1, 2.0], InvalidArgumentType, "float"),
    ([1, True], InvalidArgumentType, "bool"),
    (np.array([1.0, 2.0]), InvalidArgumentType, "float64"),
    (np.array([True]), InvalidArgumentType, "bool"),
    ("123", InvalidArgumentType, "str"),
    (b"\x01\x02", InvalidArgumentType, "bytes"),
    (None, InvalidArgumentType, "NoneType"),
])
def test_bad_tokens_are_refused(ids, error, match):
    with pytest.raises(error, match=match):
        prefix_keys(ids, 1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"block_tokens": 0}, InvalidArgument, ">= 1"),
    ({"block_tokens": -3}, InvalidArgument, ">= 1"),
    ({"block_tokens": 2.0}, InvalidArgumentType, "block_tokens"),
    ({"block_tokens": True}, InvalidArgumentType, "block_tokens"),
    ({"block_tokens": 2, "salt": "tenant"}, InvalidArgumentType, "salt"),
    ({"block_tokens": 2, "model": b"m"}, InvalidArgumentType, "model"),
    ({"block_tokens": 2, "kv_spec": None}, InvalidArgumentType, "kv_spec"),
])
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        prefix_keys([1, 2, 3, 4], **kwargs)


def test_namespace_for():
    assert namespace_for(b"") is None
    name = namespace_for(b"tenant-a")
    assert name == namespace_for(b"tenant-a") != namespace_for(b"tenant-b")
    assert name.startswith("salt-") and len(name) == len("salt-") + 16 and "tenant" not in name
    with pytest.raises(InvalidArgumentType, match="salt"):
        namespace_for("tenant-a")


@settings(max_examples=25)
@given(st.binary(max_size=16), st.binary(max_size=16))
def test_different_salts_give_different_namespaces(a, b):
    if a != b and a and b:
        assert namespace_for(a) != namespace_for(b)
