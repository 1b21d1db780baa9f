"""Checks on what callers hand the store: keys, arrays to put, buffers to fill.

Everything here runs before the store changes anything, so a bad argument
leaves the store exactly as it was.

torch tensors are accepted wherever numpy arrays are (values and ``out`` buffers); the conversions live
in :mod:`cascade_kv.tensors`, reached only for something that is not an ``np.ndarray``, so the numpy
path pays nothing for them.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .errors import InvalidArgument, InvalidArgumentType
from .ids import Key
from .tensors import block_of, finish_out, is_tensor, out_view


def check_key(key: object) -> Key:
    if not isinstance(key, (str, bytes)):
        raise InvalidArgumentType(f"key must be str or bytes, not {type(key).__name__}: {key!r}")
    return key


def key_list(keys: object, call: str) -> list[Key]:
    """``keys`` as a list of checked keys: a sequence (or iterable) of str/bytes, not one key on its own
    (``put_many("ab", ...)`` would otherwise store keys ``"a"`` and ``"b"``)."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise InvalidArgumentType(f"{call}: keys must be a sequence of str or bytes keys, "
                                  f"not {type(keys).__name__}: {keys!r}")
    keys = list(keys)
    if set(map(type, keys)) <= _KEY_TYPES:  # the common case checked at C speed (64 keys: ~2 us, not ~6)
        return keys
    return [check_key(k) for k in keys]  # subclasses pass, anything else raises naming the key


_KEY_TYPES = {str, bytes}


def as_block(value: object, key: Key) -> np.ndarray:
    """The array to store for ``key``: C-contiguous, no Python objects inside.

    A non-contiguous array (a slice, a transpose) is **copied** into a contiguous
    one, because a block is stored and hashed as one run of bytes; the copy is
    the caller's cost and is documented in the README.

    A torch tensor is viewed, not copied, when it is contiguous and on the CPU
    (:func:`cascade_kv.tensors.block_of`)."""
    if not isinstance(value, np.ndarray):
        if is_tensor(value):
            return block_of(value, key)
        if value is None or isinstance(value, (str, bytes, int, float, complex, dict, set)):
            raise InvalidArgumentType(f"put({key!r}): expected a numpy array (or an object numpy can view), "
                            f"got {type(value).__name__}")
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as e:  # ragged nesting, objects numpy cannot convert
            raise InvalidArgumentType(f"put({key!r}): numpy cannot make an array of the "
                                      f"{type(value).__name__} given: {e}") from e
    if value.dtype.hasobject:
        raise InvalidArgumentType(f"put({key!r}): dtype {value.dtype} holds Python objects, which have no bytes to store")
    if not value.flags.c_contiguous:
        value = np.ascontiguousarray(value)
    return value


def byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, as a flat ``uint8`` memoryview (no copy)."""
    try:
        return arr.data.cast("B")  # ~0.13 us; the reshape and view below cost ~0.5 us, twice per small put
    except (TypeError, ValueError):  # formats the buffer protocol lacks (datetime), empty shapes, non-contiguous
        return memoryview(arr.reshape(-1).view(np.uint8))


def check_out(out: object, key: Key, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Validate a caller's buffer for a block of ``dtype``/``shape``; raise :class:`InvalidArgument` naming the mismatch.

    A buffer that is writable but not C-contiguous is accepted: the block is read into a
    temporary and copied into it (one extra copy); see :func:`needs_staging`.

    For a torch tensor ``out`` this returns the numpy array to fill instead (a view of its memory, or a
    staging array: :func:`cascade_kv.tensors.out_view`); the store hands its results to
    :func:`finish_outs`, which completes staged reads and puts the tensor itself in the result."""
    if type(out) is np.ndarray and out.dtype == dtype and out.shape == shape and out.flags.writeable:
        return out  # the common case, in one line (a get_many checks every out before it copies any)
    if not isinstance(out, np.ndarray):
        if is_tensor(out):
            return out_view(out, key, dtype, shape)[0]
        raise InvalidArgument(f"get({key!r}): out must be a numpy array or torch tensor, not {type(out).__name__}")
    check_fits(key, out.dtype, out.shape, dtype, shape)
    if not out.flags.writeable:
        raise InvalidArgument(f"get({key!r}): out is read-only")
    return out


def check_outs(keys: list[Key], outs: object) -> None:
    """A get_many's ``outs``: ``None``, or one buffer (or ``None``) per key in a sequence."""
    if outs is None:
        return
    if not isinstance(outs, Sequence) or isinstance(outs, np.ndarray):
        raise InvalidArgumentType(f"get_many: outs must be a sequence of arrays, tensors or None (one per key), "
                                  f"not {type(outs).__name__}")
    if len(outs) != len(keys):
        raise InvalidArgument(f"get_many: {len(keys)} keys but {len(outs)} out buffers")


def check_fits(key: Key, out_dtype: np.dtype, out_shape: tuple[int, ...], dtype: np.dtype,
               shape: tuple[int, ...]) -> None:
    """InvalidArgument unless a buffer of ``out_dtype``/``out_shape`` takes a block of ``dtype``/``shape``."""
    if out_dtype != dtype or out_shape != shape:
        raise InvalidArgument(f"get({key!r}): out has dtype {out_dtype} and shape {out_shape}; "
                              f"the stored block has dtype {dtype} and shape {shape}")


def needs_staging(out: np.ndarray) -> bool:
    return not out.flags.c_contiguous


def finish_outs(outs: Sequence[object], results: list[np.ndarray]) -> list:
    """A get's results once every array in ``results`` (from :func:`check_out`) is filled: each torch
    ``out`` receives its value (when it was read through a staging array) and takes its array's place,
    so a get into a tensor returns that tensor."""
    if set(map(type, outs)) <= _PLAIN_OUTS:  # the numpy case, first, at C speed (~10 ns an out)
        return results
    for i, out in enumerate(outs):
        if is_tensor(out):
            finish_out(out, results[i])
            results[i] = out
    return results


_PLAIN_OUTS = {np.ndarray, type(None)}


def normalize_flags(is_prefix: bool | Sequence[bool], n: int) -> list[bool]:
    if isinstance(is_prefix, (bool, np.bool_)):
        return [bool(is_prefix)] * n
    if not isinstance(is_prefix, Iterable):
        raise InvalidArgumentType(f"is_prefix must be a bool or {n} bools, got {is_prefix!r}")
    flags = list(is_prefix)
    if len(flags) != n or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise InvalidArgument(f"is_prefix must be a bool or {n} bools, got {is_prefix!r}")
    return [bool(f) for f in flags]


def put_items(keys: Sequence[Key], arrays: Sequence[object],
              is_prefix: bool | Sequence[bool]) -> list[tuple[Key, np.ndarray, bool]]:
    """A put batch checked and normalised before anything changes: ``(key, block, prefix)`` per distinct key,
    in first-seen order, a key given twice taking its last array (every store's ``put_many`` starts here)."""
    keys = key_list(keys, "put_many")
    if not isinstance(arrays, Iterable):
        raise InvalidArgumentType(f"put_many: arrays must be a sequence of arrays (one per key), "
                                  f"not {type(arrays).__name__}")
    arrays = list(arrays)
    if len(keys) != len(arrays):
        raise InvalidArgument(f"put_many: {len(keys)} keys but {len(arrays)} arrays")
    flags = normalize_flags(is_prefix, len(keys))
    last = {k: i for i, k in enumerate(keys)}
    order = range(len(keys)) if len(last) == len(keys) else sorted(last.values())  # no key twice: no sort
    return [(keys[i], as_block(arrays[i], keys[i]), flags[i]) for i in order]
