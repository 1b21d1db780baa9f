"""Namespaces: many users of one store, each seeing only its own keys, dedup and counters.

``store.namespace("tenant-a")`` returns a :class:`Namespace`, a view with the store's API over the same
tiers and capacity. What it isolates, and how:

* **Keys.** A namespaced key is a :class:`~cascade_kv.ids.SpacedKey` in the store's tables. Callers only
  pass ``str``/``bytes``, so they can neither forge one nor reach another namespace's keys; ``keys()``,
  ``len`` and ``in`` of a view (and of the store, which is the default namespace) see only their own.
* **Dedup.** A block id in a named namespace is the content digest followed by the namespace's 8-byte
  *tag* (BLAKE3 in ``derive_key`` mode of the name): the same bytes in two namespaces are two blocks,
  and a put that guesses another namespace's bytes takes exactly the miss path (it hashes, finds no
  block of its own id, writes one). The default namespace keeps bare digests (stores and journals
  written before namespaces read unchanged). A keyed digest (``blake3(data, key=...)``) was rejected:
  the disk tier checks a file against the digest in its name, which would then need the namespace's
  key on every read, and a directory scan could no longer check an orphan file; with the tag
  suffix the digest is still the plain one and every check stays as it is. Dedup off: block ids end
  in a per-put serial already, which is never shared, so namespaces need nothing more there.
* **``info(key).digest``** shows the plain content digest. That tells a tenant only what it could
  compute from its own bytes; it cannot confirm another tenant's content, because nothing a tenant
  sees depends on whether another namespace holds the same bytes (no shared block, no shared count).
* **Counters.** Each namespace counts its own puts, gets, misses, deletes, dedup hits and reads, and
  the events on its own blocks (bytes written, evictions, demotions, promotions, drops, digest
  failures). ``store.stats()`` is the default namespace's; ``store.stats(all_namespaces=True)`` is the
  operator's total. What is *shared*: tiers' ``used_bytes`` and ``capacity_bytes``, and capacity
  pressure itself (another namespace's puts can evict this one's blocks). That reveals how much others
  store, never what: with per-namespace dedup their placement does not depend on anyone's content.
* **Protected quota.** ``protected_quota`` bounds the unique bytes of the namespace's blocks that are
  protected (referred to by an ``is_prefix`` key); a put or ``protect()`` that would exceed it raises
  :class:`~cascade_kv.errors.CapacityError` before anything changes. A quota, once set, is fixed for the
  store's lifetime: a later ``namespace(name, protected_quota=Q)`` with another ``Q`` raises
  InvalidArgument (letting the latest call win was rejected: whoever can name the namespace could lift
  its bound); ``None`` leaves the namespace as it is. Quotas are not journalled: a reopened store gets
  each namespace's from its first ``namespace()`` call that gives one.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3
import numpy as np

from .config import parse_size
from .errors import ConfigError, InternalError, InvalidArgument, InvalidArgumentType
from .ids import TAG_SIZE, Key, SpacedKey, StoreKey
from .stats import Counters, StoreStats

if TYPE_CHECKING:
    from .info import KeyInfo
    from .store import Store

_TAG_CONTEXT = "cascade-kv 2025-06 namespace tag v1"  # BLAKE3 derive_key context: tags apart from every other hash


MAX_NAME_BYTES = 1024
"""Longest namespace name (UTF-8 bytes): every journal record and directory message of its keys carries it."""


def namespace_tag(name: str) -> bytes:
    """The 8 bytes a named namespace's block ids end in (stable across processes and runs)."""
    return blake3.blake3(name.encode("utf-8", "surrogatepass"), derive_key_context=_TAG_CONTEXT).digest(length=TAG_SIZE)


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentType(f"namespace: name must be a str, not {type(name).__name__}: {name!r:.80}")
    if not name:
        raise InvalidArgument("namespace: name must not be empty (the store itself is the default namespace)")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"namespace: name of {len(name.encode('utf-8', 'surrogatepass'))} B is longer than "
                              f"{MAX_NAME_BYTES} B (UTF-8)")
    return name


def check_quota(quota: object) -> int | None:
    if quota is None:
        return None
    if isinstance(quota, bool) or not isinstance(quota, (int, str)):
        raise InvalidArgumentType(f"namespace: protected_quota must be None, an int or a size string, "
                                  f"not {type(quota).__name__}")
    try:
        return parse_size(quota, "protected_quota")
    except ConfigError as e:
        raise InvalidArgument(f"namespace: {e}") from None


@dataclass(slots=True, eq=False)
class Space:
    """A namespace's state inside a store (the default namespace has ``name`` None)."""

    name: str | None
    counters: Counters
    protected_quota: int | None = None
    protected_bytes: int = 0  # unique bytes of this namespace's protected blocks, kept by the store
    tag: bytes = field(init=False)  # what its block ids end in (b"" for the default namespace: bare digests)

    def __post_init__(self) -> None:
        self.tag = b"" if self.name is None else namespace_tag(self.name)

    def internal(self, key: Key) -> StoreKey:
        return key if self.name is None else SpacedKey(self.name, key)

    def owns(self, key: StoreKey) -> bool:
        if self.name is None:
            return not isinstance(key, SpacedKey)
        return isinstance(key, SpacedKey) and key.space == self.name

    def set_quota(self, quota: int | None) -> None:
        if quota is None or quota == self.protected_quota:
            return
        if self.protected_quota is not None:
            raise InvalidArgument(f"namespace {self.name!r} has protected_quota {self.protected_quota} B already; "
                                  f"a quota is fixed once set (asked for {quota} B)")
        self.protected_quota = quota


def user_key(key: StoreKey) -> Key:
    return key.key if isinstance(key, SpacedKey) else key


class Namespace:
    """A view of a :class:`~cascade_kv.store.Store` that sees only its own keys (see the module docstring).

    Every call goes through the store's own code path with this namespace's state, so it takes the
    store's lock, checks and errors alike; once the store is closed every call raises StoreClosed."""

    __slots__ = ("_store", "_space", "_name")

    def __init__(self, store: Store, space: Space) -> None:
        if space.name is None:  # the default namespace is the store's own API, never a view
            raise InternalError("a Namespace view was made of the store's default namespace")
        self._store = store
        self._space = space
        self._name: str = space.name

    @property
    def name(self) -> str:
        return self._name

    @property
    def protected_quota(self) -> int | None:
        return self._space.protected_quota

    def put(self, key: Key, array: object, is_prefix: bool = False) -> None:
        self.put_many([key], [array], is_prefix=is_prefix)

    def put_many(self, keys: Sequence[Key], arrays: Sequence[object], *,
                 is_prefix: bool | Sequence[bool] = False) -> None:
        self._store._put_many(self._space, keys, arrays, is_prefix)

    def get(self, key: Key, out: np.ndarray | None = None) -> np.ndarray:
        return self.get_many([key], None if out is None else [out])[0]

    def get_many(self, keys: Sequence[Key], outs: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        return self._store._get_many(self._space, keys, outs)

    def delete(self, key: Key) -> None:
        self.delete_many([key])

    def delete_many(self, keys: Iterable[Key]) -> None:
        self._store._delete_many(self._space, keys)

    def protect(self, key: Key) -> None:
        self._store._set_prefix(key, True, self._space)

    def unprotect(self, key: Key) -> None:
        self._store._set_prefix(key, False, self._space)

    def info(self, key: Key) -> KeyInfo:
        return self._store._info(self._space, key)

    def keys(self) -> list[Key]:
        return self._store._keys_of(self._space)

    def contains(self, key: Key) -> bool:
        return self._store._contains(self._space, key, strict=True)

    def __contains__(self, key: object) -> bool:
        return self._store._contains(self._space, key)

    def lookup(self, keys: Sequence[Key]) -> int:
        return self._store._lookup(self._space, keys)

    def __len__(self) -> int:
        return self._store._len(self._space)

    def stats(self) -> StoreStats:
        return self._store._stats(self._space)

    def __repr__(self) -> str:
        return f"<Namespace {self._space.name!r} of {self._store!r}>"


__all__ = ["Namespace", "Space", "check_name", "check_quota", "namespace_tag", "user_key"]
