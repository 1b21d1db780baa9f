"""torch tensors wherever numpy arrays go (issue 10): values of put/put_many, outs of get/get_many, on the
store and its namespaces; dtypes numpy lacks (bfloat16, float8) stored under a numpy stand-in that says
what it holds, through a reopen too. Values compare by their bytes, so NaN patterns compare exactly."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cascade_kv import InvalidArgument, InvalidArgumentType
from cascade_kv.tensors import TORCH_DTYPE, numpy_dtype, torch_dtype

from .conftest import KIB, block, snapshot, values

torch = pytest.importorskip("torch", reason="the test extra (torch) is not installed (pip install '.[test]')")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn]


def tensor(dtype=torch.float32, shape=(16, 32), seed: int = 0):
    """A tensor of pseudo-random bytes (those of :func:`block` for the same seed and size)."""
    n = int(np.prod(shape)) * dtype.itemsize
    return torch.from_numpy(block(n, seed=seed)).view(dtype).reshape(shape)


def raw(x) -> bytes:
    """The bytes of a tensor or array, in C order."""
    if isinstance(x, np.ndarray):
        return x.tobytes()
    return x.detach().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_into_a_tensor_and_out_as_numpy(store, dtype):
    t = tensor(dtype, seed=1)
    store.put("k", t)
    got = store.get("k")
    assert isinstance(got, np.ndarray) and got.shape == (16, 32) and raw(got) == raw(t)
    assert got.dtype == numpy_dtype(dtype) and store.info("k").dtype == got.dtype
    assert torch.equal(torch.from_numpy(got).view(torch_dtype(got.dtype)).view(torch.uint8),
                       t.view(torch.uint8))
    out = torch.empty(16, 32, dtype=dtype)
    assert store.get("k", out) is out and raw(out) == raw(t)


def test_dtypes_numpy_lacks_are_stored_under_a_stand_in_that_names_them():
    assert numpy_dtype(torch.bfloat16) == np.uint16
    assert numpy_dtype(torch.bfloat16).metadata == {TORCH_DTYPE: "bfloat16"}
    assert numpy_dtype(torch.float8_e5m2) == np.uint8
    assert numpy_dtype(torch.float8_e5m2).metadata == {TORCH_DTYPE: "float8_e5m2"}
    assert numpy_dtype(torch.float16) == np.float16 and numpy_dtype(torch.float16).metadata is None
    assert torch_dtype(numpy_dtype(torch.bfloat16)) is torch.bfloat16
    assert torch_dtype(np.dtype(np.int8)) is torch.int8


def test_a_numpy_array_and_a_tensor_of_the_same_bytes_and_dtype_share_a_block(store):
    t = tensor(torch.float16, seed=2)
    store.put("np", t.numpy().copy())
    store.put("torch", t)
    s = store.stats()
    assert s.blocks == 1 and s.dedup_hits == 1
    assert store.info("np").dtype == store.info("torch").dtype == np.float16
    assert store.info("np").digest == store.info("torch").digest
    assert raw(store.get("torch", torch.empty(16, 32, dtype=torch.float16))) == raw(t)


def test_a_non_contiguous_tensor_is_stored_as_its_values(store):
    t = tensor(torch.bfloat16, shape=(32, 16), seed=3).t()  # a transpose: (16, 32), not contiguous
    assert not t.is_contiguous()
    store.put("k", t)
    assert store.info("k").shape == (16, 32) and raw(store.get("k")) == raw(t)


def test_put_many_takes_tensors_and_arrays_together(store):
    vals = [tensor(torch.bfloat16, seed=4), block(KIB, seed=5), tensor(torch.int8, (8, 8), seed=6)]
    store.put_many(["a", "b", "c"], vals)
    for k, v in zip("abc", vals):
        assert raw(store.get(k)) == raw(v), k
    nograd = torch.ones(4, requires_grad=True)  # a parameter's bytes are its values; autograd is not involved
    store.put("grad", nograd)
    assert raw(store.get("grad")) == raw(nograd)


def test_a_get_into_a_contiguous_tensor_writes_its_memory_directly(store, monkeypatch):
    import cascade_kv.tensors as tensors

    t = tensor(torch.bfloat16, seed=7)
    store.put("k", t)

    def no_staging(out, filled):
        raise AssertionError("a contiguous CPU out went through a staging copy")

    monkeypatch.setattr(tensors, "_copy_into", no_staging)
    out = torch.zeros(16, 32, dtype=torch.bfloat16)
    ptr = out.data_ptr()
    assert store.get("k", out) is out
    assert out.data_ptr() == ptr and raw(out) == raw(t)
    [again] = store.get_many(["k"], [out])
    assert again is out


def test_a_get_into_a_non_contiguous_tensor(store):
    t = tensor(torch.bfloat16, seed=8)
    store.put("k", t)
    base = torch.zeros(32, 16, dtype=torch.bfloat16)
    out = base.t()
    assert store.get("k", out) is out and raw(out) == raw(t)
    assert raw(base) == raw(t.t())  # it landed in the tensor's own memory
    every_other = torch.zeros(16, 64, dtype=torch.bfloat16)[:, ::2]
    assert store.get("k", every_other) is every_other and raw(every_other) == raw(t)


def test_get_many_with_tensor_numpy_and_no_outs(store):
    vals = {"a": tensor(torch.float32, seed=9), "b": tensor(torch.bfloat16, seed=10), "c": tensor(torch.int8, seed=11)}
    store.put_many(list(vals), list(vals.values()))
    outs = [torch.empty(16, 32), None, np.empty((16, 32), np.int8)]
    got = store.get_many(["a", "b", "c"], outs)
    assert got[0] is outs[0] and got[2] is outs[2] and isinstance(got[1], np.ndarray)
    assert [raw(g) for g in got] == [raw(v) for v in vals.values()]


def test_a_tensor_made_in_inference_mode_takes_a_value(store):
    t = tensor(torch.float16, seed=12)
    store.put("k", t)
    with torch.inference_mode():
        cache = torch.zeros(32, 16, dtype=torch.float16)
    out = cache.t()  # through a staging copy, outside inference mode
    assert store.get("k", out) is out and raw(out) == raw(t)


@pytest.mark.parametrize("out, what", [
    (lambda: torch.empty(16, 32, dtype=torch.float16), "dtype"),  # same size, another dtype
    (lambda: torch.empty(16, 32, dtype=torch.uint16), "dtype"),  # the stand-in's own dtype is not bfloat16
    (lambda: torch.empty(32, 16, dtype=torch.bfloat16), "shape"),
    (lambda: torch.empty(1, 32, dtype=torch.bfloat16).expand(16, 32), "share memory"),
], ids=["float16", "uint16", "shape", "expanded"])
def test_a_mismatched_tensor_out_is_refused_and_changes_nothing(store, out, what):
    store.put("k", tensor(torch.bfloat16, seed=13))
    store.put("other", block(KIB, seed=14))
    vals, before = values(store), snapshot(store)
    buf = out()
    sentinel = raw(buf) if buf.is_contiguous() else None
    with pytest.raises(InvalidArgument, match=what):
        store.get_many(["other", "k"], [None, buf])
    assert snapshot(store) == before and values(store) == vals
    if sentinel is not None:
        assert raw(buf) == sentinel


def test_an_out_for_a_numpy_value_must_have_its_dtype(store):
    store.put("k", block(KIB, seed=15, dtype=np.uint16))
    with pytest.raises(InvalidArgument, match="dtype"):
        store.get("k", torch.empty(512, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgument, match="dtype"):
        store.get("k", torch.empty(512, dtype=torch.int16))


def test_tensors_without_bytes_are_refused_and_change_nothing(store):
    store.put("k", block(KIB, seed=16))
    vals, before = values(store), snapshot(store)
    with pytest.raises(InvalidArgumentType, match="to_dense"):
        store.put("sparse", torch.eye(4).to_sparse())
    with pytest.raises(InvalidArgumentType, match="meta"):
        store.put_many(["ok", "meta"], [tensor(), torch.empty(4, device="meta")])
    with pytest.raises(InvalidArgument, match="dense"):
        store.get("k", torch.eye(32).to_sparse())
    assert snapshot(store) == before and values(store) == vals


def test_bfloat16_survives_a_reopen(make_store):
    t = tensor(torch.bfloat16, seed=17)
    f8 = tensor(torch.float8_e4m3fn, (64,), seed=18)
    store = make_store(persist=True)
    store.put_many(["bf16", "f8"], [t, f8])
    store.close()
    reopened = make_store(persist=True)
    got = reopened.get("bf16")
    assert got.dtype.metadata == {TORCH_DTYPE: "bfloat16"} and raw(got) == raw(t)
    assert reopened.info("f8").dtype.metadata == {TORCH_DTYPE: "float8_e4m3fn"}
    out = torch.empty(16, 32, dtype=torch.bfloat16)
    assert reopened.get("bf16", out) is out and raw(out) == raw(t)
    with pytest.raises(InvalidArgument):
        reopened.get("bf16", torch.empty(16, 32, dtype=torch.float16))


def test_namespaces_take_tensors(store):
    a, b = store.namespace("a"), store.namespace("b")
    t = tensor(torch.bfloat16, seed=19)
    a.put("k", t)
    b.put_many(["k"], [tensor(torch.float32, (8, 8), seed=20)])
    out = torch.empty(16, 32, dtype=torch.bfloat16)
    assert a.get("k", out) is out and raw(out) == raw(t)
    [got] = b.get_many(["k"], [torch.empty(8, 8)])
    assert raw(got) == raw(tensor(torch.float32, (8, 8), seed=20))
    with pytest.raises(InvalidArgument):
        b.get("k", torch.empty(16, 32, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_go_through_a_host_copy(store):
    t = tensor(torch.bfloat16, seed=21).cuda()
    store.put("k", t)
    out = torch.empty(16, 32, dtype=torch.bfloat16, device="cuda")
    assert store.get("k", out) is out and torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_importing_the_store_does_not_import_torch():
    code = ("import sys, cascade_kv, cascade_kv.store, cascade_kv.arrays, cascade_kv.tensors; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
