"""What the daemon serves: a store and the views its namespaces give, behind one small interface.

:class:`LocalBackend` serves a :class:`~.served.ServedStore`: gets are answered with arena offsets (the
client copies), puts of bytes already stored send only their digest. :class:`GenericBackend` serves any
store of the contract (the distributed store on a cluster): values pass through the connection's staging
area, one copy more each way, and every put carries its bytes.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..arrays import byte_view
from ..errors import InvalidArgument
from ..ids import Digest, Key
from ..namespace import Space
from ..tiers.allocator import align_up
from .served import BlockMeta, Expect, NeedBytes, Placed, ServedStore, check_expected


def view_of(area: np.ndarray, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """``area[offset:offset+nbytes]`` as an array of ``dtype`` and ``shape`` (no copy)."""
    flat = area[offset:offset + nbytes]
    if len(flat) != nbytes:
        raise InvalidArgument(f"{nbytes} B at offset {offset} run past the staging area ({len(area)} B)")
    if dtype.itemsize == 0 or nbytes == 0:
        return np.empty(shape, dtype)  # nothing to share: numpy cannot view 0 bytes as a 0-size dtype
    return flat.view(dtype).reshape(shape)


class LocalBackend:
    """The single-node store, copying nothing itself on the hot path."""

    zero_copy = True

    def __init__(self, store: ServedStore) -> None:
        self.store = store
        self.hash_algorithm = store.config.hash_algorithm
        self.arena_fd = store.arena_fd
        self.arena_size = store.arena_size

    def view(self, name: str | None, quota: object = None) -> Any:
        return self.store if name is None else self.store.namespace(name, quota)  # type: ignore[arg-type]

    def _space(self, view: Any) -> Space:
        return self.store._default if view is self.store else view._space

    def get(self, view: Any, keys: Sequence[Key], staging: Callable[[int], np.ndarray],
            expect: Expect = None) -> tuple[list[Placed], object]:
        return self.store.pin_reads(self._space(view), keys, staging, expect)

    def release(self, token: object) -> None:
        self.store.unpin(token)  # type: ignore[arg-type]

    def put(self, view: Any, keys: Sequence[Key], values: list[np.ndarray | BlockMeta], prefixes: Sequence[bool],
            digests: Sequence[Digest]) -> None:
        """NeedBytes when a described value is not a clean dedup hit (nothing changed)."""
        self.store.put_described(self._space(view), keys, values, prefixes, digests)

    def call(self, fn: Callable[[], Any]) -> Any:
        return fn()  # the store is thread-safe

    def close(self) -> None:
        self.store.close()


class GenericBackend:
    """Any store of the contract, through its public API; calls are serialised (the distributed store's
    collective paths are not made for several daemon threads at once)."""

    zero_copy = False

    def __init__(self, store: Any) -> None:
        self.store = store
        self.hash_algorithm = store.config.hash_algorithm
        self.arena_fd = -1
        self.arena_size = 0
        self._lock = threading.Lock()

    def view(self, name: str | None, quota: object = None) -> Any:
        with self._lock:
            return self.store if name is None else self.store.namespace(name, quota)

    def get(self, view: Any, keys: Sequence[Key], staging: Callable[[int], np.ndarray],
            expect: Expect = None) -> tuple[list[Placed], object]:
        with self._lock:
            values = view.get_many(keys)
        if expect is not None:  # after the read: the store's counters have moved (see docs/service.md)
            for k, v, ex in zip(keys, values, expect):
                check_expected(k, v.dtype, v.shape, ex)
        offsets, total = [], 0
        for v in values:
            offsets.append(total)
            total = align_up(total + v.nbytes)
        area = staging(total)
        placed = []
        for v, off in zip(values, offsets):
            if v.nbytes:
                area[off:off + v.nbytes] = np.frombuffer(byte_view(np.ascontiguousarray(v)), np.uint8)
            placed.append(Placed(True, off, v.nbytes, v.dtype, v.shape))
        return placed, None

    def release(self, token: object) -> None:
        pass

    def put(self, view: Any, keys: Sequence[Key], values: list[np.ndarray | BlockMeta], prefixes: Sequence[bool],
            digests: Sequence[Digest]) -> None:
        need = [i for i, v in enumerate(values) if isinstance(v, BlockMeta)]
        if need:
            raise NeedBytes(need)  # no digest-only path here: the store hashes and claims what it is given
        with self._lock:
            view.put_many(list(keys), values, is_prefix=list(prefixes))

    def close(self) -> None:
        with self._lock:
            self.store.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            return fn()
