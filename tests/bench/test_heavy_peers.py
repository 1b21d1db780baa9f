"""Mooncake Store and LMCache adapters (the ``peers`` extra): round trips through each of their backends.

Each test skips with the backend's own :class:`Unavailable` reason where the extra is not installed, so the
default suite passes without it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from cascade_kv.bench.peers import lmcache, mooncake
from cascade_kv.bench.peers.base import Backend, Setup, Unavailable

MiB = 1 << 20
pytestmark = pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")  # LMCache's telemetry
NAMES = [*mooncake.BACKENDS, *lmcache.BACKENDS]
FACTORIES = {**mooncake.BACKENDS, **lmcache.BACKENDS}


def build(name: str) -> Backend:
    try:
        return FACTORIES[name]()
    except Unavailable as e:
        pytest.skip(f"{name}: {e}")


def opened(name: str, tmp_path: Path, memory: int, block: int) -> Backend:
    backend = build(name)
    try:
        backend.open(Setup(workdir=tmp_path, memory_bytes=memory, block_size=block))
    except Unavailable as e:
        pytest.skip(f"{name}: {e}")
    return backend


def blocks(sizes: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name: str, tmp_path: Path) -> None:
    backend = opened(name, tmp_path, memory=16 * MiB, block=1 * MiB)
    assert backend.name == name and backend.setup_seconds > 0 and backend.version()
    try:
        sizes = [4096, 4096, 4096, MiB, MiB, MiB]
        keys = [f"{name}/block/{i}" for i in range(len(sizes))]
        data = blocks(sizes, seed=len(name))
        backend.put_many(keys, data)
        backend.put_many(keys[:1], data[:1])  # a key stored again: the same block, no error
        assert backend.contains_many([*keys, "never/written"]) == [True] * len(keys) + [False]
        outs = [np.zeros(n, np.uint8) for n in sizes]
        for _ in range(2):  # the second pass reuses registered / staged buffers
            backend.get_many(keys, outs)
            for key, want, got in zip(keys, data, outs):
                assert np.array_equal(want, got), key
        with pytest.raises(KeyError):
            backend.get_many(["never/written"], [np.zeros(4096, np.uint8)])
        if name == "lmcache-disk":
            files = backend.files()
            assert len(files) == len(keys) and all(f.is_relative_to(tmp_path) for f in files)
    finally:
        children = started(backend)
        backend.close()
    backend.close()  # a second close does nothing
    assert not any(tmp_path.iterdir()), "files left in the work directory"
    assert len(children) == {"mooncake": 1, "mooncake-remote": 2, "lmcache-remote": 1}.get(name, 0)
    for pid in children:  # stopped and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def started(backend: Backend) -> list[int]:
    """The processes a backend started: Mooncake's master and segment process, LMCache's server."""
    return [p.proc.pid for p in (getattr(backend, attr, None) for attr in ("_master", "_segment", "_server"))
            if p is not None]


def test_mooncake_refuses_puts_when_full(tmp_path: Path) -> None:
    backend = opened("mooncake", tmp_path, memory=16 * MiB, block=4 * MiB)  # the least Mooncake mounts
    try:
        keys = [f"full/{i}" for i in range(8)]
        data = blocks([4 * MiB] * 8, seed=1)
        backend.put_many(keys, data)  # one batch twice the segment: Mooncake cannot evict in between
        assert isinstance(backend, mooncake.Mooncake) and backend.rejected_puts > 0
        stored = backend.contains_many(keys)
        assert sum(stored) == len(keys) - backend.rejected_puts
        kept = [i for i, s in enumerate(stored) if s]
        outs = [np.zeros(4 * MiB, np.uint8) for _ in kept]
        backend.get_many([keys[i] for i in kept], outs)
        assert all(np.array_equal(data[i], out) for i, out in zip(kept, outs))
    finally:
        backend.close()


def test_lmcache_cpu_evicts_least_recently_read(tmp_path: Path) -> None:
    backend = opened("lmcache-cpu", tmp_path, memory=4 * MiB + MiB // 2, block=MiB)  # room for 4 blocks
    try:
        keys = [f"lru/{i}" for i in range(5)]
        data = blocks([MiB] * 5, seed=2)
        backend.put_many(keys[:4], data[:4])
        backend.get_many(keys[:1], [np.zeros(MiB, np.uint8)])  # block 0 becomes the most recently used
        backend.put_many(keys[4:], data[4:])  # evicts one block: 1, the least recently used
        assert backend.contains_many(keys) == [True, False, True, True, True]
    finally:
        backend.close()


def test_missing_packages_are_a_skip_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("mooncake", "lmcache") else real(name, *a))
    for name in NAMES:
        with pytest.raises(Unavailable, match="not installed.*pip install"):
            FACTORIES[name]()


def test_mooncake_without_libibverbs_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("mooncake") is None:
        pytest.skip("mooncake is not installed")

    def no_library(name: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(mooncake.ctypes, "CDLL", no_library)
    with pytest.raises(Unavailable, match="apt-get install -y libibverbs1"):
        mooncake.Mooncake("remote")
