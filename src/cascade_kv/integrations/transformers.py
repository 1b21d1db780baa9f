"""Prefix caching for Hugging Face transformers (5.x): the KV of a prompt's full blocks kept in a cascade-kv
store, so that a later prompt that begins with the same tokens computes only the rest.

>>> prefix_cache = PrefixCache.for_model(store, model, model="meta-llama/Llama-3.2-1B@4e20de3")
>>> out = generate_with_prefix_cache(model, input_ids, prefix_cache, max_new_tokens=32)

``store`` is anything that honours :mod:`cascade_kv.contract`: a :class:`~cascade_kv.Store`, a
:class:`~cascade_kv.DistributedStore` or the daemon's client ``cascade_kv.connect()``.

What is stored. A prompt is cut into blocks of ``block_tokens`` tokens; each *full* block is one store value
of shape ``[layers, 2, kv_heads, block_tokens, head_dim]`` (K then V of every layer for that block's tokens),
under the block's key from :func:`cascade_kv.tokens.prefix_keys`. One value per block, rather than one per
layer or per K/V, makes a block present whole or not at all: a lookup that counts a block can read all of it.
The keys' ``kv_spec`` names the layout (layers, kv heads, head_dim, dtype and the value's shape), so a model
of another layout, or a later change of the value's shape, can never read these blocks.

Faults. The cache is an optimisation: a store call that raises a :class:`~cascade_kv.errors.CascadeError`
(a daemon gone or timing out, a store closed, a block evicted between lookup and read, a store full of
protected blocks) makes :meth:`PrefixCache.save` store nothing and :meth:`PrefixCache.restore` return an
empty cache, each with a logged warning; generation then recomputes and its result is the same. A wrong
argument (a batch of two, a cache of another layout) is the caller's bug and raises.

Only full-attention layers can be cached this way: a sliding-window layer keeps only the last window's
KV, so a prefix's KV cannot be stored whole; such models are refused when the cache is made.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..contract import KVNamespace
from ..errors import CascadeError, InvalidArgument, InvalidArgumentType
from ..tokens import PrefixKey, namespace_for, prefix_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The KV shape and dtype of a model: what a stored block must match to be used by it."""

    layers: int
    """Decoder layers, each with one K and one V per token."""
    kv_heads: int
    """Key/value heads per layer (fewer than attention heads under grouped-query attention)."""
    head_dim: int
    """Elements per head per token, for K and V alike."""
    dtype: torch.dtype
    """The dtype of the KV the model computes (the model's dtype)."""

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentType(f"KVLayout: {name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise InvalidArgument(f"KVLayout: {name} must be >= 1, got {value}")
        if not isinstance(self.dtype, torch.dtype):
            raise InvalidArgumentType(f"KVLayout: dtype must be a torch.dtype, not {type(self.dtype).__name__}")

    @classmethod
    def of_model(cls, model: Any) -> KVLayout:
        """The layout of a transformers decoder model, read from its config and dtype. A model with
        sliding-window or other non-full-attention layers raises InvalidArgument (see the module docstring)."""
        cfg = model.config.get_text_config(decoder=True)
        kinds = set(getattr(cfg, "layer_types", None) or ())
        if kinds - {"full_attention"}:
            raise InvalidArgument(f"prefix cache: only full-attention layers can be cached, this model also has "
                                  f"{sorted(kinds - {'full_attention'})}")
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(int(cfg.num_hidden_layers), int(kv_heads), int(head_dim), model.dtype)

    @property
    def spec(self) -> str:
        """The ``kv_spec`` of the keys: every field, and the stored value's shape (``T``: block_tokens)."""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"transformers:{dtype}:[L={self.layers},2,H={self.kv_heads},T,D={self.head_dim}]"


class PrefixCache:
    """The full blocks of prompts' KV in a store, under keys for ``model`` and ``layout`` (see the module
    docstring). ``salt`` (bytes) separates tenants: it goes into every key and selects the store namespace
    :func:`~cascade_kv.tokens.namespace_for` names. ``is_prefix=True`` puts blocks protected (kept in memory
    while unprotected data leaves first); the default lets them be evicted like any cached data.
    ``device``: where :meth:`restore` puts the KV (the model's device)."""

    def __init__(self, store: KVNamespace, layout: KVLayout, *, model: str, block_tokens: int = 128,
                 salt: bytes = b"", is_prefix: bool = False, device: torch.device | str = "cpu") -> None:
        if not isinstance(layout, KVLayout):
            raise InvalidArgumentType(f"PrefixCache: layout must be a KVLayout, not {type(layout).__name__}")
        if not isinstance(model, str):
            raise InvalidArgumentType(f"PrefixCache: model must be a str, not {type(model).__name__}")
        if not model:
            # an empty name would let two different models of the same layout read each other's KV
            raise InvalidArgument("PrefixCache: model must name the model and its revision, got ''")
        prefix_keys([], block_tokens, salt=salt)  # checks block_tokens and salt now, not on the first prompt
        name = namespace_for(salt)
        self.store = store if name is None else store.namespace(name)
        self.layout = layout
        self.model = model
        self.block_tokens = int(block_tokens)
        self.salt = salt
        self.is_prefix = bool(is_prefix)
        self.device = torch.device(device)

    @classmethod
    def for_model(cls, store: KVNamespace, hf_model: Any, *, model: str, **kwargs: Any) -> PrefixCache:
        """A cache for a transformers model: its layout from :meth:`KVLayout.of_model`, restores on its
        device. ``model`` still names it (and its revision): weights are not hashed."""
        return cls(store, KVLayout.of_model(hf_model), model=model, device=hf_model.device, **kwargs)

    def keys(self, input_ids: object) -> list[PrefixKey]:
        """The keys of the full blocks of ``input_ids`` (1-D, or ``[1, seq]``)."""
        return prefix_keys(_row(input_ids), self.block_tokens, salt=self.salt, model=self.model,
                           kv_spec=self.layout.spec)

    def save(self, input_ids: object, cache: DynamicCache) -> int:
        """Store the full blocks of ``cache``, whose first tokens hold the KV of ``input_ids`` (1-D, or
        ``[1, seq]``) from position 0; blocks the store already has are not sent again. Returns how many
        blocks were stored (0 when the store failed: logged). A cache of another layout or batch raises."""
        ids = _row(input_ids)
        keys = self.keys(ids)  # checks the ids first
        layers = self._layers(cache)
        keys = keys[:layers[0][0].shape[-2] // self.block_tokens] if layers else []  # blocks the cache holds
        if not keys:
            return 0
        try:
            have = self.store.lookup(keys)
            if have == len(keys):
                return 0
            self.store.put_many(keys[have:], self._pack(layers, have, len(keys)), is_prefix=self.is_prefix)
        except CascadeError as e:
            log.warning("prefix cache: %d blocks not saved, the store failed: %s: %s",
                        len(keys), type(e).__name__, e)
            return 0
        return len(keys) - have

    def restore(self, input_ids: object) -> tuple[DynamicCache, int]:
        """The KV of the longest stored prefix of ``input_ids`` (1-D, or ``[1, seq]``) as a ``DynamicCache``,
        and how many tokens it covers: whole blocks, at most ``len(input_ids) - 1`` tokens (the model must
        still compute one to give logits). ``(empty cache, 0)`` on no match or a store failure (logged)."""
        ids = _row(input_ids)
        keys = self.keys(ids)
        keys = keys[:(len(ids) - 1) // self.block_tokens] if len(ids) else []  # one token is left to compute
        if not keys:
            return DynamicCache(), 0
        lay = self.layout
        try:
            n = self.store.lookup(keys)
            if n == 0:
                return DynamicCache(), 0
            blocks = torch.empty((n, lay.layers, 2, lay.kv_heads, self.block_tokens, lay.head_dim), dtype=lay.dtype)
            self.store.get_many(keys[:n], list(blocks))
        except CascadeError as e:
            log.warning("prefix cache: nothing restored, the store failed: %s: %s", type(e).__name__, e)
            return DynamicCache(), 0
        cache = DynamicCache()
        shape = (1, lay.kv_heads, n * self.block_tokens, lay.head_dim)
        for i in range(lay.layers):
            # [n, H, T, D] -> [1, H, n*T, D]: one copy per tensor, the layer's concatenation makes the second
            k = blocks[:, i, 0].transpose(0, 1).reshape(shape).to(self.device)
            v = blocks[:, i, 1].transpose(0, 1).reshape(shape).to(self.device)
            cache.update(k, v, i)
        return cache, n * self.block_tokens

    def _layers(self, cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``cache``'s per-layer (K, V), checked against the layout; ``[]`` for a cache that holds nothing."""
        layers = getattr(cache, "layers", None)
        if not isinstance(cache, DynamicCache) or layers is None:
            raise InvalidArgumentType(f"prefix cache: cache must be a transformers DynamicCache, "
                                      f"not {type(cache).__name__}")
        if cache.get_seq_length() == 0:
            return []
        lay = self.layout
        if len(layers) != lay.layers:
            raise InvalidArgument(f"prefix cache: the cache has {len(layers)} layers, the layout {lay.layers}")
        out = []
        for i, layer in enumerate(layers):
            if type(layer) is not DynamicLayer:  # a sliding-window layer holds only the last window
                raise InvalidArgument(f"prefix cache: layer {i} is a {type(layer).__name__}; only DynamicLayer "
                                      f"(full attention) can be cached")
            k, v = layer.keys, layer.values
            if k.shape[0] != 1:
                raise InvalidArgument(f"prefix cache: batch 1 only (one prompt per save), the cache has batch "
                                      f"{k.shape[0]}")
            want = (1, lay.kv_heads, k.shape[2], lay.head_dim)
            if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != lay.dtype or v.dtype != lay.dtype:
                raise InvalidArgument(f"prefix cache: layer {i} holds K {tuple(k.shape)} {k.dtype} and V "
                                      f"{tuple(v.shape)} {v.dtype}; the layout {lay.spec} wants {want} {lay.dtype}")
            if out and k.shape[2] != out[0][0].shape[2]:
                raise InvalidArgument(f"prefix cache: layer {i} holds {k.shape[2]} tokens, layer 0 "
                                      f"{out[0][0].shape[2]}")
            out.append((k, v))
        return out

    @torch.no_grad()  # a cache computed with grad enabled must not make the blocks part of its graph
    def _pack(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], first: int, last: int) -> list[torch.Tensor]:
        """Blocks ``first`` to ``last - 1`` as one contiguous CPU tensor each (the store views them, no copy)."""
        lay, t = self.layout, self.block_tokens
        n = last - first
        blocks = torch.empty((n, lay.layers, 2, lay.kv_heads, t, lay.head_dim), dtype=lay.dtype)
        for i, kv in enumerate(layers):
            for j, x in enumerate(kv):
                # [1, H, S, D] -> [n, H, T, D]: splitting the token axis is a view; copy_ moves device and layout
                blocks[:, i, j].copy_(x[0, :, first * t:last * t].reshape(lay.kv_heads, n, t, lay.head_dim)
                                      .transpose(0, 1))
        return list(blocks)


def generate_with_prefix_cache(model: Any, input_ids: torch.Tensor, prefix_cache: PrefixCache,
                               **generate_kwargs: Any) -> Any:
    """``model.generate(input_ids, **generate_kwargs)``, reading and filling ``prefix_cache`` on the way:

    1. restores the longest stored prefix of the prompt (``input_ids``: ``[1, seq]`` or 1-D) as a
       ``DynamicCache``;
    2. calls ``model.generate`` with the whole prompt and ``past_key_values=`` that cache: transformers
       runs the model on the tokens the cache does not cover only, then decodes as usual (an
       ``attention_mask`` of ones is passed unless one is given);
    3. saves the full blocks of the finished sequence that the store lacks (the prompt's and the generated
       tokens' KV, as vLLM's prefix caching does), from the cache ``generate`` filled in place.

    Returns what ``generate`` returns. With several output sequences (beam search, ``num_return_sequences``)
    the cache is per beam and nothing is saved (logged at debug level). A store failure only costs the
    speed-up (see the module docstring)."""
    if "past_key_values" in generate_kwargs:
        raise InvalidArgument("generate_with_prefix_cache: past_key_values comes from the prefix cache, "
                              "do not pass one")
    if not isinstance(input_ids, torch.Tensor):
        raise InvalidArgumentType(f"generate_with_prefix_cache: input_ids must be a torch tensor, "
                                  f"not {type(input_ids).__name__}")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    cache, _ = prefix_cache.restore(ids)
    generate_kwargs.setdefault("attention_mask", torch.ones_like(ids))
    out = model.generate(ids, past_key_values=cache, **generate_kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    if sequences.shape[0] == 1 and cache.get_seq_length() and cache.layers[0].keys.shape[0] == 1:
        prefix_cache.save(sequences[0], cache)
    else:
        log.debug("prefix cache: %d output sequences, nothing saved", sequences.shape[0])
    return out


def _row(input_ids: object) -> object:
    """The one row of token ids: a ``[1, seq]`` tensor or array becomes its row, anything else is passed on
    (:func:`prefix_keys` checks it)."""
    shape = getattr(input_ids, "shape", None)
    if shape is not None and len(shape) == 2:
        if shape[0] != 1:
            raise InvalidArgument(f"prefix cache: batch 1 only (one prompt at a time), got input_ids of shape "
                                  f"{tuple(shape)}")
        return input_ids[0]
    return input_ids


__all__ = ["KVLayout", "PrefixCache", "generate_with_prefix_cache"]
