"""torch tensors as values and out buffers: every conversion between a tensor and the numpy arrays the
stores work on lives here.

torch is optional. Nothing here imports it: a tensor can only exist once its program imported torch, so
:func:`is_tensor` looks torch up in ``sys.modules`` and a program without torch never pays for it (the
numpy paths in :mod:`cascade_kv.arrays` test for ``np.ndarray`` first and call in here only for
something else).

Two directions, for the stores and for anything else that moves tensors (a service client):

* :func:`block_of` -- the C-contiguous numpy array a put stores for a tensor. A contiguous CPU tensor is
  *viewed* (no copy: the store hashes and copies straight from the tensor's memory); any other tensor
  (CUDA, non-contiguous, a conjugate view) is first copied to a contiguous CPU tensor.
* :func:`out_view` -- the writable numpy array a get fills for a tensor ``out``, plus a ``finish``
  callback (``None`` when there is nothing left to do). A contiguous CPU tensor is viewed, so a get
  writes straight into its memory; any other is read into a CPU staging array that ``finish`` copies
  into it with ``out.copy_``. :func:`finish_out` is the same step for a caller that kept only the array.

dtypes: a torch dtype numpy has (float32, float16, int8, bool, ...) maps to that numpy dtype, so a tensor
and a numpy array of the same bytes and dtype are the same value (and share a block). One numpy lacks
(bfloat16, the float8 and float4 types, complex32) is stored as the unsigned integer of its size with
the torch dtype's name in the dtype's metadata, e.g. ``np.dtype(np.uint16, metadata={"torch_dtype":
"bfloat16"})``: the bytes round-trip exactly, the journal (:func:`cascade_kv.catalog.encode_dtype`) and
the cluster's wire codec keep the metadata, and a get without ``out`` returns an array that says what it
holds (:func:`torch_dtype` turns it back, ``torch.from_numpy(a).view(torch_dtype(a.dtype))``).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InvalidArgument, InvalidArgumentType
from .ids import Key

TORCH_DTYPE = "torch_dtype"
"""The dtype metadata key that names the torch dtype a numpy stand-in holds."""

_UNSIGNED = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}  # a stand-in per item size, by torch name
_numpy_of: dict[Any, np.dtype] = {}  # torch dtype -> numpy dtype; filled on first use of each


def is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor (a subclass such as ``nn.Parameter`` included); never imports torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype a tensor of torch ``dtype`` is stored as (see the module's docstring)."""
    found = _numpy_of.get(dtype)
    if found is None:
        torch = sys.modules["torch"]
        try:
            found = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:  # "Got unsupported ScalarType BFloat16": numpy has no such dtype
            size = dtype.itemsize
            if size not in _UNSIGNED:
                raise InvalidArgumentType(f"torch dtype {dtype} ({size} B) has no numpy stand-in") from None
            found = np.dtype(_UNSIGNED[size], metadata={TORCH_DTYPE: _name(dtype)})
        _numpy_of[dtype] = found
    return found


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a stored numpy ``dtype``: the one its metadata names, else torch's match for it.
    Raises :class:`InvalidArgumentType` for a dtype torch has no match for (structured, big-endian)."""
    torch = _torch()
    name = _tag(dtype)
    if name is not None:
        found = getattr(torch, name, None)
        if isinstance(found, torch.dtype):
            return found
        raise InvalidArgumentType(f"dtype {dtype} names torch dtype {name!r}, which this torch lacks")
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError as e:
        raise InvalidArgumentType(f"torch has no dtype for numpy dtype {dtype}: {e}") from e


def block_of(t: Any, key: Key) -> np.ndarray:
    """The C-contiguous numpy array a put stores for tensor ``t``: a view of its memory when ``t`` is a
    contiguous CPU tensor, else a view of a contiguous CPU copy of it."""
    torch = sys.modules["torch"]
    if t.layout is not torch.strided:
        raise InvalidArgumentType(f"put({key!r}): a {t.layout} tensor is not one run of bytes; "
                                  f"pass t.to_dense()")
    try:
        t = t.detach()
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
            # a device copy first (contiguous there), then one transfer; .cpu() waits for the copy to land
            t = t.resolve_conj().resolve_neg().contiguous().cpu()
        return _view(t, numpy_dtype(t.dtype))
    except (RuntimeError, NotImplementedError) as e:  # a meta tensor, a quantized one: no bytes to take
        raise InvalidArgumentType(f"put({key!r}): cannot read the bytes of a {t.dtype} tensor on "
                                  f"{t.device}: {e}") from e


def out_view(out: Any, key: Key, dtype: np.dtype,
             shape: tuple[int, ...]) -> tuple[np.ndarray, Callable[[], None] | None]:
    """The numpy array to fill for tensor ``out``, checked against a value of ``dtype``/``shape``, and the
    step that completes the read once the array is filled (``None``: nothing to do, the array is
    ``out``'s memory). Raises :class:`InvalidArgument` for a mismatch, as for a numpy ``out``; a tensor
    ``out`` matches only its own torch dtype (a uint16 tensor does not take a bfloat16 value)."""
    torch = sys.modules["torch"]
    if out.layout is not torch.strided:
        raise InvalidArgument(f"get({key!r}): out is a {out.layout} tensor; a value is read into a dense one")
    want = numpy_dtype(out.dtype)
    got = tuple(out.shape)
    if want != dtype or _tag(want) != _tag(dtype) or got != shape:
        raise InvalidArgument(f"get({key!r}): out has dtype {out.dtype} and shape {got}; the stored "
                              f"block has dtype {_describe(dtype)} and shape {shape}")
    if any(stride == 0 and n > 1 for n, stride in zip(got, out.stride())):
        raise InvalidArgument(f"get({key!r}): out has elements that share memory (stride 0, e.g. from "
                              f"expand()); it cannot hold a value")
    if _zero_copy(out):
        return _view(out.detach(), dtype), None
    staging = np.empty(shape, dtype)
    return staging, lambda: _copy_into(out, staging)


def finish_out(out: Any, filled: np.ndarray) -> None:
    """Complete a read into tensor ``out`` whose array ``filled`` came from :func:`out_view`."""
    if not _zero_copy(out):
        _copy_into(out, filled)


# ------------------------------------------------------------------ helpers
def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise InvalidArgumentType("torch is not installed") from e
    return torch


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _tag(dtype: np.dtype) -> str | None:
    meta = dtype.metadata
    return None if meta is None else meta.get(TORCH_DTYPE)


def _describe(dtype: np.dtype) -> str:
    name = _tag(dtype)
    return str(dtype) if name is None else f"{name} (stored as {dtype})"


def _zero_copy(t: Any) -> bool:
    """Whether numpy can view ``t``'s memory as one C-contiguous run (conjugate and negative views excluded:
    their memory does not hold the values they show)."""
    return t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _view(t: Any, dtype: np.dtype) -> np.ndarray:
    """A numpy array over contiguous CPU tensor ``t``'s memory, of ``dtype`` (``numpy_dtype(t.dtype)``).
    A dtype numpy lacks is viewed as its unsigned stand-in first (tensor.view(dtype) keeps the memory)."""
    if _tag(dtype) is not None:
        torch = sys.modules["torch"]
        t = t.view(getattr(torch, _UNSIGNED[dtype.itemsize]))
    return t.numpy().view(dtype)


def _copy_into(out: Any, filled: np.ndarray) -> None:
    torch = sys.modules["torch"]
    src = torch.from_numpy(filled)
    if src.dtype != out.dtype:  # a stand-in: same bytes, reinterpreted as the tensor's dtype
        src = src.view(out.dtype)
    # writing a buffer is not a step of any model: no autograd record, and an inference tensor
    # (a KV cache made under torch.inference_mode()) takes in-place writes only inside that mode
    with torch.inference_mode() if out.is_inference() else torch.no_grad():
        out.copy_(src)
