"""Keys for token prefixes: one key per full block of tokens, each standing for the whole prefix up to it.

An engine splits a prompt into blocks of ``block_tokens`` tokens and asks the store for the KV blocks of its
longest cached prefix: ``store.lookup(prefix_keys(tokens, 16, model=..., kv_spec=...))`` is how many leading
blocks it can read instead of recompute.

Why chained keys. The KV of block ``i`` depends on every token before it, not only on its own, so its key
must name the whole prefix: ``key_i = BLAKE3(key_{i-1} || tokens of block i)``. Equal keys then mean equal
prefixes (up to a BLAKE3 collision), a prefix of the tokens gives a prefix of the keys, and a change
anywhere changes every later key. Hashing the whole prefix afresh for every block gives the same keys at
quadratic cost; chaining hashes each token once. A trailing partial block gets no key: its KV is not a
block the engine stores, and a key for it would never match the full block a longer prompt stores.

What else the keys depend on. The first key's parent is a *seed* that hashes, length-prefixed so no two
different settings encode alike, the model identity (``model``, e.g. name and revision: another model's KV
is not interchangeable), the KV layout and dtype (``kv_spec``, a string the engine builds, e.g.
``"fp16:[2,L,H,128,D]"``), the tenant ``salt`` and ``block_tokens`` (the same tokens cut at another size are
other blocks). The seed is hashed in BLAKE3's ``derive_key`` mode under a versioned context string, so a
seed can never equal a chain step (plain mode) and a later format (``v2``) can never reuse a ``v1`` key.

Tokens are hashed as little-endian int64, whatever container holds them (list, tuple, numpy, torch), so
the same tokens give the same keys everywhere.
"""
# The same design as vLLM's prefix caching (vllm/v1/core/kv_cache_utils.py): there each full block's hash
# takes its parent block's hash, the block's token ids and "extra keys" (LoRA, multimodal inputs, a
# per-request cache salt), and the first block's parent is a fixed seed; a partial block is not hashed.
# Here the model, the KV layout and the salt go into the seed once instead of into every block's extra
# keys: they are the same for every block of a prompt, and once in the root they reach every key anyway.
from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NewType

import blake3
import numpy as np

from .errors import InvalidArgument, InvalidArgumentType

PrefixKey = NewType("PrefixKey", bytes)
"""A token-prefix key (32 bytes): usable wherever the store takes a ``bytes`` key."""

KEY_SIZE = 32

_CONTEXT = "cascade-kv/prefix/v1"  # BLAKE3 derive_key context of the seed: the format's version lives here
_NAMESPACE_CONTEXT = "cascade-kv/prefix/v1 namespace"
_U64 = struct.Struct("<Q")
_TOKEN = np.dtype("<i8")
_INT64_MAX = np.iinfo(np.int64).max


def prefix_keys(token_ids: object, block_tokens: int, *, salt: bytes = b"", model: str = "",
                kv_spec: str = "") -> list[PrefixKey]:
    """One key per full block of ``block_tokens`` tokens of ``token_ids``, each naming the whole prefix up to
    the end of its block (see the module docstring). ``token_ids``: a list or tuple of ints, a 1-D numpy
    integer array or a 1-D torch tensor (any device). Bad input raises :class:`InvalidArgumentType` (wrong
    type) or :class:`InvalidArgument` (wrong value: ``block_tokens < 1``, a negative token, a 2-D array)."""
    if isinstance(block_tokens, (bool, np.bool_)) or not isinstance(block_tokens, (int, np.integer)):
        raise InvalidArgumentType(f"prefix_keys: block_tokens must be an int, not {type(block_tokens).__name__}: "
                                  f"{block_tokens!r:.80}")
    if block_tokens < 1:
        raise InvalidArgument(f"prefix_keys: block_tokens must be >= 1, got {block_tokens}")
    parent = _seed(int(block_tokens), salt, model, kv_spec)
    tokens = _tokens(token_ids)
    data = memoryview(tokens.tobytes())  # one copy, little-endian int64; the loop slices it without copying
    step = int(block_tokens) * _TOKEN.itemsize
    keys: list[PrefixKey] = []
    for start in range(0, len(tokens) // block_tokens * step, step):
        h = blake3.blake3(parent)
        h.update(data[start:start + step])
        parent = h.digest()
        keys.append(PrefixKey(parent))
    return keys


def namespace_for(salt: bytes) -> str | None:
    """The store namespace a tenant's ``salt`` maps onto: ``None`` for no salt (the default namespace), else
    ``"salt-"`` and 16 hex digits of a BLAKE3 hash of the salt (so the salt itself is never shown).

    The salt is in the keys already, so tenants never share a key; the namespace also keeps their *blocks*
    apart: two tenants that store the same KV bytes then hold two blocks, and neither can tell from a dedup
    hit that the other stored them (see :mod:`cascade_kv.namespace`). 64 bits make an accidental clash of
    two tenants' names negligible for any realistic number of tenants (~3e-8 among a million)."""
    _check_salt(salt)
    if not salt:
        return None
    return "salt-" + blake3.blake3(salt, derive_key_context=_NAMESPACE_CONTEXT).hexdigest(length=8)


def _seed(block_tokens: int, salt: bytes, model: str, kv_spec: str) -> bytes:
    _check_salt(salt)
    for name, value in (("model", model), ("kv_spec", kv_spec)):
        if not isinstance(value, str):
            raise InvalidArgumentType(f"prefix_keys: {name} must be a str, not {type(value).__name__}: {value!r:.80}")
    h = blake3.blake3(derive_key_context=_CONTEXT)
    for field in (model.encode("utf-8", "surrogatepass"), kv_spec.encode("utf-8", "surrogatepass"), salt):
        h.update(_U64.pack(len(field)))  # length first: ("ab", "c") and ("a", "bc") differ
        h.update(field)
    h.update(_U64.pack(block_tokens))
    return h.digest()


def _check_salt(salt: object) -> None:
    if not isinstance(salt, bytes):
        raise InvalidArgumentType(f"salt must be bytes, not {type(salt).__name__}: {salt!r:.80}")


def _tokens(token_ids: object) -> np.ndarray:
    """``token_ids`` as a 1-D little-endian int64 array, checked."""
    if isinstance(token_ids, np.ndarray):
        arr = token_ids
    elif hasattr(token_ids, "cpu") and hasattr(token_ids, "numpy"):  # a torch tensor: torch is never imported
        t = token_ids.detach() if hasattr(token_ids, "detach") else token_ids
        arr = t.cpu().numpy()
    elif isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes, bytearray, memoryview)):
        # numpy would turn [1, True] into int64 silently, and [1, 2.0] into floats: check the Python types first
        types = set(map(type, token_ids))
        if any(issubclass(t, (Sequence, np.ndarray)) and not issubclass(t, (str, bytes)) for t in types):
            raise InvalidArgument("prefix_keys: token_ids must be 1-D (a flat sequence of ints), got nested ones")
        bad = next((t for t in types if issubclass(t, (bool, np.bool_)) or not issubclass(t, (int, np.integer))),
                   None)
        if bad is not None:
            raise InvalidArgumentType(f"prefix_keys: token ids must be ints, got a {bad.__name__}")
        arr = np.array(token_ids) if token_ids else np.empty(0, _TOKEN)
        if arr.dtype.kind == "O":  # ints beyond 64 bits, which numpy keeps as Python objects
            raise InvalidArgument("prefix_keys: a token id is out of the int64 range")
    else:
        raise InvalidArgumentType(f"prefix_keys: token_ids must be a list or tuple of ints, a 1-D numpy array or "
                                  f"a 1-D torch tensor, not {type(token_ids).__name__}")
    if arr.ndim != 1:
        raise InvalidArgument(f"prefix_keys: token_ids must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentType(f"prefix_keys: token ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise InvalidArgument(f"prefix_keys: token ids must be >= 0, got {int(arr.min())}")
        if arr.dtype.kind == "u" and arr.max() > _INT64_MAX:
            raise InvalidArgument(f"prefix_keys: token id {int(arr.max())} is out of the int64 range")
    return arr.astype(_TOKEN, copy=False)


__all__ = ["KEY_SIZE", "PrefixKey", "namespace_for", "prefix_keys"]
