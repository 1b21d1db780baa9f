"""LMCache's storage backends, driven directly (no vLLM, no ``StorageManager``), as a peer.

Installed by the ``peers`` extra: PyPI ``lmcache`` over torch's CPU build. Three backends, each one of
LMCache's own storage backends behind the ``LocalCPUBackend`` memory pool that LMCache always allocates from:

* ``lmcache-cpu``: ``LocalCPUBackend`` with its hot cache on, a pool of ``memory_bytes`` (LRU eviction).
* ``lmcache-disk``: ``LocalDiskBackend`` writing one file per block under ``setup.workdir`` (up to
  ``options["disk_bytes"]``, default 90 % of the free space there; ``options["o_direct"]`` turns LMCache's
  O_DIRECT on); the CPU pool is only its staging buffer (the hot cache is off), so every read is a disk read.
* ``lmcache-remote``: ``RemoteBackend`` over ``lm://`` to an ``lmcache_server`` the backend starts on
  127.0.0.1 (rank 0 starts it, every rank connects; it keeps every block it is sent: it has no capacity and
  no eviction, so ``memory_bytes`` does not bound it). The CPU pool is again only staging.

The ``StorageManager`` is bypassed on purpose: in LMCache 0.5.6 its ``get`` with ``local_cpu=False``
stalls after about 64 gets (it never returns objects to the CPU pool), while the backends' own
``get_blocking`` works; the calls made here are the ones the storage manager makes (allocate from the CPU
pool, ``submit_put_task``, ``contains``, ``get_blocking``, and in ``cpu`` mode the lookup pin and
``touch_cache`` that keep its LRU order).

Keys: a ``str`` key becomes a ``CacheEngineKey`` (model ``cascade-bench``, world size 1, worker 0, the key's
64-bit BLAKE2b as chunk hash), built once per key and cached, so every rank names a block alike. A block
is a ``uint8`` ``MemoryObj`` of shape ``(1, 1, 1, n)`` (one "token" of ``n`` bytes in LMCache's
``KV_2LTD`` format).

Copies on the timed path, as LMCache makes them (torch views of the caller's arrays are free):
put: caller's block -> CPU pool (the copy LMCache's GPU connector makes), then for ``disk`` a ``write`` and
for ``remote`` a socket send (the server copies it again into a ``bytearray``); get: ``cpu`` pool ->
caller's buffer; ``disk`` file -> staging (``readinto``, several files at once on LMCache's read threads)
-> caller's buffer; ``remote`` socket -> staging (``recv_into``) -> caller's buffer. Puts to disk and
remote are asynchronous in LMCache: ``put_many`` returns once they are written (to disk, or stored by
the server: one lookup on the same connection after the sends), so a read right after, on any rank, finds
them. Setup touches the CPU pool (the VM faults fresh memory in at ~0.5 GB/s).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, Setup, Unavailable, start_on_rank_zero, stop_process

HOST = "127.0.0.1"
MODEL = "cascade-bench"  # the model name in every CacheEngineKey
STAGING_BYTES = 64 << 20  # the CPU pool of disk and remote modes holds at least this much, and 8 blocks
STAGING_BLOCKS = 8
TOUCH_PIECE = 64 << 20  # setup touches the pool in pieces of this size, then of one block
PUT_TIMEOUT = 120.0  # seconds for one window of asynchronous puts to complete
START_TIMEOUT = 60.0  # seconds for lmcache_server (it imports torch) to listen
STOP_TIMEOUT = 5.0
_INSTALL = "pip install 'cascade-kv[peers]' (torch's CPU build first: pip install torch==2.13.0)"


def missing() -> str:
    """Why LMCache cannot run here ("" when it can), without importing it."""
    for module, package in (("torch", "torch"), ("lmcache", "lmcache")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed: {_INSTALL}"
    return ""


def _environment() -> None:
    """Set before LMCache is imported (it reads them then)."""
    os.environ["LMCACHE_TRACK_USAGE"] = "false"  # no usage report leaves the machine
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")  # its INFO and WARNING lines would fill the benchmark's output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, STOP_TIMEOUT)


class Server:
    """One ``lmcache_server`` (LMCache's ``lm://`` server, CPU storage) on a free port of 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        self.log = directory / "lmcache_server.log"
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = _free_port()
            # the module behind the ``lmcache_server`` console script, run with this interpreter
            args = [sys.executable, "-m", "lmcache.v1.server", HOST, str(self.port), "cpu"]
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "LMCACHE_TRACK_USAGE": "false"})
            self._stop = weakref.finalize(self, _stop, self.proc)
            deadline = time.monotonic() + START_TIMEOUT
            while self.proc.poll() is None and time.monotonic() < deadline:
                with socket.socket() as s:
                    if s.connect_ex((HOST, self.port)) == 0:
                        return
                time.sleep(0.1)
            self._stop()
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"
        raise Unavailable(f"lmcache_server did not start; its log:\n{tail}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self._stop()


class LMCache(Backend):
    """One of LMCache's storage backends: ``mode`` is ``"cpu"``, ``"disk"`` or ``"remote"``."""

    def __init__(self, mode: str = "cpu") -> None:
        super().__init__()
        if mode not in ("cpu", "disk", "remote"):
            raise ValueError(f"lmcache: mode must be 'cpu', 'disk' or 'remote', got {mode!r}")
        self.mode = mode
        self.name = f"lmcache-{mode}"
        self.overwrites = mode == "remote"  # the local backends keep a stored key's first bytes
        self.shared = mode == "remote"  # the CPU and disk backends are private to the process that made them
        self.tier = {"cpu": "memory", "disk": "disk", "remote": "remote memory"}[mode]
        reason = missing()
        if reason:
            raise Unavailable(reason)
        self._lm: Any = None  # the lmcache/torch names used on the hot path, bound at open
        self._cpu: Any = None  # LocalCPUBackend: the pool every mode allocates from
        self._backend: Any = None  # the backend blocks are stored in (the CPU one in cpu mode)
        self._keys: dict[str, Any] = {}
        self._window = 0  # blocks the pool holds at once (disk / remote staging)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._server: Server | None = None
        self._directory: Path | None = None  # disk mode: LMCache's files
        self._server_directory: Path | None = None
        self._comm: Any = None

    def _open(self, setup: Setup) -> None:
        _environment()
        try:
            import torch
            from lmcache.utils import CacheEngineKey
            from lmcache.v1.config import LMCacheEngineConfig
            from lmcache.v1.memory_management import MemoryFormat
            from lmcache.v1.metadata import LMCacheMetadata
            from lmcache.v1.pin_monitor import PinMonitor
            from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
            from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
            from lmcache.v1.storage_backend.remote_backend import RemoteBackend
        except ImportError as e:
            raise Unavailable(f"cannot import LMCache's storage backends ({e}): {_INSTALL}") from e
        self._lm = (torch, CacheEngineKey, MemoryFormat.KV_2LTD)
        block = setup.block_size
        pool = setup.memory_bytes if self.mode == "cpu" else max(STAGING_BYTES, STAGING_BLOCKS * _aligned(block))
        if pool < _aligned(block):
            raise ValueError(f"{self.name}: memory_bytes ({setup.memory_bytes}) holds no block of {block} B")
        comm = self._comm = setup.comm if setup.size > 1 else None
        options: dict[str, Any] = {"chunk_size": 256, "local_cpu": self.mode == "cpu",
                                   "max_local_cpu_size": pool / 2**30}
        try:
            if self.mode == "disk":
                self._directory = setup.workdir / "lmcache-disk" / f"rank{setup.rank}"
                self._directory.mkdir(parents=True, exist_ok=True)
                disk_bytes = setup.options.get("disk_bytes") or int(0.9 * shutil.disk_usage(self._directory).free)
                options.update(local_disk=str(self._directory) + "/", max_local_disk_size=disk_bytes / 2**30,
                               extra_config={"use_odirect": bool(setup.options.get("o_direct", False))})
            if self.mode == "remote":
                options.update(remote_url=f"lm://{HOST}:{self._start_server(setup, comm)}", remote_serde="naive")
            config = LMCacheEngineConfig.from_defaults(**options)
            metadata = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                                       local_worker_id=0, kv_dtype=torch.uint8, kv_shape=(1, 2, 256, 1, 1))
            if self.mode == "cpu":
                PinMonitor.GetOrCreate(config)  # the lookup pins blocks, as LMCache's engine does (one per process)
            self._cpu = LocalCPUBackend(config, metadata, "cpu")
            self._window = self._touch(block)
            self._backend = self._cpu
            if self.mode != "cpu":
                self._loop = asyncio.new_event_loop()  # LMCache's asynchronous puts and socket I/O run on it
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="lmcache-loop", daemon=True)
                self._loop_thread.start()
            if self.mode == "disk":
                self._backend = LocalDiskBackend(config, self._loop, self._cpu, "cpu", None, metadata)
            if self.mode == "remote":
                self._backend = RemoteBackend(config, metadata, self._loop, self._cpu, "cpu")
                if self._backend.connection is None:  # LMCache logs the failure and carries on without it
                    raise Unavailable(f"lmcache-remote: cannot connect to {config.remote_url}")
            if comm is not None:
                comm.Barrier()
        except BaseException:
            self._release()
            raise

    def _start_server(self, setup: Setup, comm: Any) -> int:
        """Rank 0 starts the server; every rank gets its port (or the reason it is not there)."""
        def start() -> int:
            self._server_directory = Path(tempfile.mkdtemp(prefix="cascade-bench-lmcache-"))
            self._server = Server(self._server_directory)
            return self._server.port

        return start_on_rank_zero(setup, "lmcache_server", start)

    def _touch(self, block: int) -> int:
        """Fault the CPU pool in (pieces of :data:`TOUCH_PIECE`, then of one block, until it is full), free it
        again, and return how many blocks it holds at once."""
        held, blocks = [], 0
        quiet = logging.getLogger("lmcache.v1.memory_management")  # it warns when the pool is full: on purpose here
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            for piece in (TOUCH_PIECE, block) if self.mode == "cpu" else (block,):
                while (obj := self._allocate(piece)) is not None:
                    obj.tensor.zero_()
                    held.append(obj)
                    blocks += piece == block
        finally:
            quiet.setLevel(level)
            for obj in held:
                obj.ref_count_down()
        return blocks

    def _allocate(self, nbytes: int, evict: bool = False) -> Any:
        torch, _, fmt = self._lm
        return self._cpu.allocate(torch.Size((1, 1, 1, nbytes)), torch.uint8, fmt, eviction=evict, busy_loop=False)

    def _key(self, key: str) -> Any:
        cached = self._keys.get(key)
        if cached is None:
            torch, CacheEngineKey, _ = self._lm
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            cached = self._keys[key] = CacheEngineKey(MODEL, 1, 0, int.from_bytes(digest, "little") >> 1,
                                                      torch.uint8)
        return cached

    def _windows(self, n: int) -> Iterator[range]:
        """Index ranges the staging pool holds at once (all of them in cpu mode, whose pool evicts)."""
        step = n if self.mode == "cpu" else max(1, self._window)
        for lo in range(0, n, step):
            yield range(lo, min(n, lo + step))

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        if len(keys) != len(blocks):
            raise ValueError(f"put_many: {len(keys)} keys but {len(blocks)} blocks")
        torch = self._lm[0]
        for window in self._windows(len(keys)):
            written = _Written()
            futures, submitted = [], []
            for i in window:
                block, key = blocks[i], self._key(keys[i])
                obj = self._allocate(block.nbytes, evict=self.mode == "cpu")  # cpu: evicts LRU blocks to make room
                if obj is None:
                    raise RuntimeError(f"{self.name}: no room for a block of {block.nbytes} B in the CPU pool "
                                       f"(nothing left to evict)")
                obj.tensor.view(-1).copy_(torch.from_numpy(block.reshape(-1)))
                future = self._backend.submit_put_task(key, obj, on_complete_callback=written.add)
                obj.ref_count_down()  # the backend holds its own reference while it needs the object
                if future is not None:
                    futures.append(future)
                submitted.append(key)
            for future in futures:  # remote: sent
                future.result(PUT_TIMEOUT)
            if self.mode == "remote" and submitted:
                # a fence: the server handles one connection's commands in order, so once it answers this
                # lookup it has stored every block sent before it (and another rank can read them)
                self._backend.contains(submitted[-1])
            if self.mode == "disk":
                self._wait_written(submitted, written)

    def _wait_written(self, keys: list[Any], written: _Written) -> None:
        """Until every write LMCache took on is on disk (one it skipped, as a key already stored or a block it
        had no room for, is not in flight and is not waited for)."""
        deadline = time.monotonic() + PUT_TIMEOUT
        with written.changed:
            while pending := [k for k in keys if k not in written.keys and self._backend.exists_in_put_tasks(k)]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: {len(pending)} disk writes not done after {PUT_TIMEOUT} s")
                written.changed.wait(0.05)

    def get_hits(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> list[bool]:
        self.check_batch(keys, outs)
        hits = [False] * len(keys)
        for window in self._windows(len(keys)):
            names = [self._key(keys[i]) for i in window]
            if self.mode == "cpu":
                for key in names:  # the lookup LMCache makes before a retrieve: pins, and records for touch_cache
                    self._cpu.contains(key, pin=True)
                objs = [self._cpu.get_blocking(key) for key in names]
            elif self.mode == "disk":
                objs = self._backend.batched_get_blocking(names)  # reads several files at once
            else:
                objs = [self._backend.get_blocking(key) for key in names]
            try:
                for i, obj in zip(window, objs):
                    if obj is None:
                        if self._server is not None and not self._server.alive:
                            raise RuntimeError(f"lmcache_server exited (log: {self._server.log})")
                        continue
                    out = outs[i]
                    if obj.get_size() != out.nbytes:
                        raise ValueError(f"{self.name}: {keys[i]!r} holds {obj.get_size()} B, "
                                         f"the buffer {out.nbytes} B")
                    self._lm[0].from_numpy(out.reshape(-1)).copy_(obj.tensor.view(-1))
                    hits[i] = True
            finally:
                for obj in objs:
                    if obj is not None:
                        obj.ref_count_down()
                if self.mode == "cpu":
                    for key in names:
                        self._cpu.unpin(key)
                    self._cpu.touch_cache()  # the blocks just read become the most recently used
        return hits

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [bool(self._backend.contains(self._key(k))) for k in keys]

    def files(self) -> list[Path]:
        return sorted(self._directory.iterdir()) if self._directory is not None else []

    def version(self) -> str:
        versions = []
        for package in ("lmcache", "torch"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions.append(f"{package} {importlib.metadata.version(package)}")
        return ", ".join(versions)

    def close(self) -> None:
        """Collective on several ranks: rank 0 stops the server once every rank has disconnected."""
        if self._cpu is None and self._server is None:
            return
        if self._comm is not None:
            self._comm.Barrier()
        self._release()

    def _release(self) -> None:
        if self._backend is not None and self._backend is not self._cpu:
            self._backend.close()
        self._backend = None
        if self._cpu is not None:
            self._cpu.close()
            self._cpu = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(STOP_TIMEOUT)
            if not self._loop.is_running():
                self._loop.close()
            self._loop = self._loop_thread = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        for directory in (self._directory, self._server_directory):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        if self._directory is not None:
            with contextlib.suppress(OSError):  # other ranks' directories may still be there
                self._directory.parent.rmdir()
        self._directory = self._server_directory = None
        self._keys.clear()


class _Written:
    """The keys whose asynchronous put LMCache reported done (its ``on_complete_callback``)."""

    def __init__(self) -> None:
        self.keys: set[Any] = set()
        self.changed = threading.Condition()

    def add(self, key: Any) -> None:
        with self.changed:
            self.keys.add(key)
            self.changed.notify_all()


def _aligned(nbytes: int) -> int:
    """What one block takes in LMCache's pool (its allocator aligns objects to 4 KiB)."""
    return -(-nbytes // 4096) * 4096


BACKENDS = {
    "lmcache-cpu": lambda: LMCache("cpu"),
    "lmcache-disk": lambda: LMCache("disk"),
    "lmcache-remote": lambda: LMCache("remote"),
}
"""Registry name -> factory (see :mod:`.registry`)."""
