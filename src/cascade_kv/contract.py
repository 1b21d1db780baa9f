"""The one contract every cascade-kv store honours: :class:`KVStore`, and :class:`KVNamespace` for its views.

Implementations: :class:`~cascade_kv.Store` (one node), :class:`~cascade_kv.DistributedStore` (MPI ranks) and
the service client ``cascade_kv.connect(path)``. ``tests/contract/conformance.py`` checks every clause below
against each of them; a new implementation is one subclass there.

Written once here, so that the implementations need not repeat it:

* **Keys** are ``str`` or ``bytes``, and ``"a"`` and ``b"a"`` are different keys (as in a ``dict``). Any
  other key raises :class:`~cascade_kv.errors.InvalidArgumentType`; so does a single key passed where a
  sequence of keys is expected (``put_many("ab", ...)`` would otherwise mean keys ``"a"`` and ``"b"``).
* **Values** are numpy arrays (or objects numpy can view) of any dtype without Python objects in it,
  structured and big-endian included, of any shape, 0-d and empty included. A ``get`` gives back the
  same dtype, shape and bytes. A value with no bytes to store (``None``, ``str``, ``bytes``, an object
  array) raises InvalidArgumentType.
* **Batches are all or nothing.** A call that raises leaves every key as it was: a bad key, value,
  length or buffer anywhere in the batch is found before anything changes, and a batch that does not
  fit (:class:`~cascade_kv.errors.CapacityError`) stores none of it. (Capacity pressure of a batch that
  *does* fit may move or drop other, unprotected blocks: that is what a cache does.)
* **Errors** come from the family in :mod:`cascade_kv.errors`: :class:`BlockNotFound` (a ``KeyError``)
  for a missing key, InvalidArgumentType (a ``TypeError``) for the wrong type, :class:`InvalidArgument`
  (a ``ValueError``) for the right type with a value the call cannot take (lengths that do not match, an
  ``out`` of the wrong dtype or shape or read-only), CapacityError (a ``MemoryError``) for a block no tier
  it may live in can hold, :class:`StoreClosed` for any call after :meth:`KVStore.close`.
* **Reads see writes.** Once ``put_many`` returns, any later call through any handle of the same store
  (another thread, another rank, another client of the same daemon) finds the keys.

Where implementations legitimately differ, each declares it in class attributes (zarr's ``supports_*``),
so that the conformance suite skips honestly instead of bending a test:

* ``supports_persist``: honours ``persist=True`` (a store reopened on the same ``disk_path`` finds every
  acknowledged key, with its prefix flag).
* ``supports_demote``: :meth:`KVStore.demote` moves blocks out of memory into the disk tier.
* ``stats_scope``: what the *contents* fields of :meth:`KVStore.stats` count (``keys``, ``blocks``,
  ``logical_bytes``, ``unique_bytes``, ``protected_*``, the tiers' ``blocks``). ``"store"``: the whole
  store's. ``"rank"``: the share this rank is home to (:class:`~cascade_kv.DistributedStore`: a rank is
  home to a hash-chosen share of the keys and digests; ``cluster_stats()`` sums them, and asking every
  rank on each ``stats()`` call would make it collective). The *operation* counters (``puts``, ``gets``,
  ``misses``, ``deletes``, ``dedup_hits``, ``dedup_bytes_saved``) always count the calls made through
  this handle (this rank, this client), whatever the scope.
* ``ignored_config``: the :class:`~cascade_kv.config.CascadeConfig` fields the implementation accepts but
  does not act on (every field is accepted: one config file serves every deployment).
  Both stores act on every field: the :class:`~cascade_kv.DistributedStore`'s arenas offer replicas first,
  then unprotected copies, each ranked by ``eviction_order`` (:mod:`cascade_kv.policy`); its reuse credit
  counts a rank's own reads of its copies (peers read one-sidedly, unseen by the owner).

One more difference, in what capacity pressure leaves behind: a key whose block lost its last copy (no disk
tier, memory full) is removed by :class:`~cascade_kv.Store`, while :class:`~cascade_kv.DistributedStore`
keeps it listed (``in``, ``keys()``, ``lookup``) and its ``get`` raises BlockNotFound: the rank that drops a
copy knows the digest, not the keys, which live at other ranks' homes. Either way a get never returns
other bytes than were put.

Also implementation-defined, and so never asserted by the suite: the names in :attr:`KeyInfo.tiers`
(``"host"``, ``"remote"``, ``"disk"``, ...; a disk copy is always called ``"disk"``); the order of
:meth:`KVNamespace.keys`; which unprotected blocks capacity pressure moves or drops; what
:meth:`KVStore.settle` waits for (nothing, where reads make their own replicas).
"""
from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from .config import CascadeConfig
from .ids import Key
from .stats import StoreStats

if TYPE_CHECKING:
    from .info import KeyInfo

StatsScope = Literal["store", "rank"]


@runtime_checkable
class KVNamespace(Protocol):
    """What a store and each of its namespace views answer: a view (``store.namespace(name)``) sees only the
    keys put through a view of the same name, and the store itself is the *default* namespace, which
    sees none of theirs. The same bytes in two namespaces are two blocks (never a dedup hit across them)."""

    def put(self, key: Key, array: object, is_prefix: bool = False) -> None:
        """``put_many([key], [array], is_prefix=is_prefix)``. ``is_prefix=True`` *protects* the value: it
        stays in memory (a tier listed before ``"disk"``) while unprotected data can leave instead."""

    def put_many(self, keys: Sequence[Key], arrays: Sequence[object], *,
                 is_prefix: bool | Sequence[bool] = False) -> None:
        """Store ``arrays[i]`` under ``keys[i]``, all or nothing; an existing key takes the new value. A key
        given twice takes its last array (and its last flag). ``is_prefix`` is one flag or one per key.

        Lengths that differ: InvalidArgument. A bad key or value anywhere: InvalidArgumentType. A block
        bigger than every tier it may live in (memory only, when protected and ``semantic_eviction``):
        CapacityError. In each case nothing was stored. Bytes already stored under any key of this
        namespace are not stored again when ``dedup_enabled`` (``stats().dedup_hits`` counts them)."""

    def get(self, key: Key, out: np.ndarray | None = None) -> np.ndarray:
        """``get_many([key], [out])[0]``: a new array, or ``out`` itself, filled."""

    def get_many(self, keys: Sequence[Key], outs: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """The values of ``keys``, in order: ``outs[i]`` itself where given (any writable array of the stored
        dtype and shape, contiguous or not), a new array where ``outs`` or ``outs[i]`` is ``None``.

        Every key and buffer is checked before any byte is copied: a missing key raises BlockNotFound (and
        counts one miss), an ``out`` of another dtype or shape or read-only raises InvalidArgument, ``outs``
        of another length InvalidArgument; no buffer has been written then."""

    def delete(self, key: Key) -> None:
        """``delete_many([key])``."""

    def delete_many(self, keys: Iterable[Key]) -> None:
        """Remove every key; all must exist, else BlockNotFound and nothing is removed. A block is freed when
        no key refers to it any more."""

    def protect(self, key: Key) -> None:
        """Mark ``key`` as if it had been put with ``is_prefix=True`` (its block is brought into memory;
        CapacityError, and no change, if it cannot be). BlockNotFound for a missing key."""

    def unprotect(self, key: Key) -> None:
        """Clear ``key``'s prefix flag: its block may leave memory like any other (once no other prefix key
        refers to it). BlockNotFound for a missing key."""

    def info(self, key: Key) -> KeyInfo:
        """What ``key`` holds and where: ``dtype``, ``shape``, ``nbytes``, ``prefix`` (its own flag),
        ``digest`` (hex of the content address: equal for equal bytes, whatever the key, dtype, namespace or
        dedup setting), ``tiers`` (where copies lie, fastest first; names are the implementation's) and
        ``shared_by`` (keys of this namespace referring to the same block: 1 without dedup)."""

    def keys(self) -> list[Key]:
        """Every key of this namespace, each once, in no particular order (a snapshot)."""

    def __len__(self) -> int:
        """``len(keys())``."""

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored; ``False`` for anything that is not a key, as a ``dict`` answers."""

    def contains(self, key: Key) -> bool:
        """Like ``in``, but a key that is not ``str``/``bytes`` raises InvalidArgumentType."""

    def lookup(self, keys: Sequence[Key]) -> int:
        """How many keys, from the start of ``keys``, are stored: the length of the longest stored prefix of a
        chain of block keys (0 for an empty list or a missing first key; a key deleted in the middle ends the
        count there). Every key is checked first (InvalidArgumentType for a bad one, wherever it is). Reads
        no value: ``gets`` and ``misses`` do not move."""

    def stats(self) -> StoreStats:
        """This namespace's counters (a view's stats count only its own operations and blocks; the shared
        tiers' ``used_bytes`` and ``capacity_bytes`` are the whole store's). See ``stats_scope``."""


@runtime_checkable
class KVStore(KVNamespace, Protocol):
    """A tiered, content-addressed KV-block store: the default namespace, plus the calls that act on the
    whole store. A context manager: leaving the ``with`` closes it."""

    supports_persist: bool
    supports_demote: bool
    stats_scope: StatsScope
    ignored_config: frozenset[str]
    config: CascadeConfig

    def demote(self, keys: Iterable[Key]) -> None:
        """Move the blocks of ``keys`` out of memory into the disk tier; their values stay readable. All or
        nothing: a missing key (BlockNotFound), a protected block (InvalidArgument: unprotect it first) or a
        disk tier that cannot take them (CapacityError) moves nothing; no disk tier: ConfigError. Where
        ``supports_demote`` is false it raises ConfigError always."""

    def namespace(self, name: str, protected_quota: int | str | None = None) -> KVNamespace:
        """A view over the keys of namespace ``name`` (a non-empty ``str``: InvalidArgumentType otherwise,
        InvalidArgument for ``""``). Views of the same name see the same keys. ``protected_quota`` bounds
        the bytes of the namespace's protected blocks: a put or protect past it raises CapacityError and
        changes nothing; once set it is fixed (another value: InvalidArgument; ``None`` leaves it)."""

    def stats(self, all_namespaces: bool = False) -> StoreStats:
        """A snapshot of the counters: the default namespace's, or with ``all_namespaces`` every namespace's
        (the operator's view). See ``stats_scope`` for what the contents fields cover."""

    def settle(self) -> None:
        """Wait for background work started by earlier calls (queued promotions) to finish; results never
        depend on it, only placement does."""

    def close(self) -> None:
        """Release memory and files; a second call does nothing. Every other call, on the store or on any of
        its views, then raises StoreClosed. Without ``persist`` the block files the store wrote are removed."""

    def __enter__(self) -> KVStore: ...

    def __exit__(self, *exc: object) -> None: ...


def missing_members(obj: object, protocol: type = KVStore) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (``isinstance`` answers only yes or no)."""
    members = getattr(protocol, "__protocol_attrs__", None) or typing._get_protocol_attrs(protocol)  # 3.11: no attr
    return sorted(n for n in members if not hasattr(obj, n))


__all__ = ["KVNamespace", "KVStore", "StatsScope", "missing_members"]
