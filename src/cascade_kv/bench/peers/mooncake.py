"""Mooncake Store (kvcache-ai), the KV-cache store of the Mooncake serving system, as a peer.

Installed by the ``peers`` extra: PyPI ``mooncake-transfer-engine-non-cuda`` (the build without CUDA), which
links Debian's ``libibverbs1`` even when it moves bytes over TCP. The backend starts its own
``mooncake_master`` (the one in the wheel) with the built-in HTTP metadata server, every port on 127.0.0.1,
protocol ``tcp``, and stops it at :meth:`Mooncake.close`; with no package, no master binary or no
libibverbs it is :class:`Unavailable` with that reason.

Two backends:

* ``mooncake`` (this process holds the memory): the store's global segment (``memory_bytes``) is mounted by
  this process and every put asks for it (``preferred_segment``), so ``put_from`` / ``get_into`` are one
  ``memcpy`` each between the caller's buffer and the segment (Mooncake copies locally when the replica is
  in its own process over TCP).
* ``mooncake-remote`` (another process holds the memory): a helper process
  (:mod:`._mooncake_segment`) mounts the segment and this process mounts none, so every put and get crosses
  processes through Mooncake's transfer engine over TCP on 127.0.0.1, as a client of a memory pool on
  another host would.

Several ranks share one master (rank 0 starts it, and in ``remote`` mode the one helper, holding every
rank's ``memory_bytes``); in ``local`` mode each rank mounts its own segment, so a block another rank wrote
is read across processes, as Mooncake does.

Copies on the timed path: one per put (caller's block -> segment) and one per get (segment -> caller's
buffer); no staging buffer. The caller's buffers are registered with the store (``register_buffer``, as
Mooncake's API asks for, ~0.1 ms each) the first time each is seen, and the registration is kept: a
warm-up pass pays for it, the timed passes reuse it. Setup touches the whole segment (fills it once with
objects and removes them) so no timed put faults fresh memory in.

Settings, as Mooncake's store documentation (``mooncake-store.md``, the deployment guide) advises for a
KV cache on one host: protocol ``tcp`` (no RDMA NIC here); ``MC_STORE_MEMCPY=1``, its switch for a plain
``memcpy`` where source and destination are in the same client (``mooncake``'s every get and put: its
local reads went from 1.96 to 4.39 GB/s, ``cascade bench rma --quick --block-size 16MiB``); the prefix
blocks (``put_many``'s ``prefix``) put with soft pin (``SoftPinAction.ENABLE``), the mechanism its docs
name for "important and frequently used objects, such as system prompts": eviction takes unpinned objects
first; a ``local_buffer_size`` of 16 MiB, since ``put_from`` / ``get_into`` move bytes between registered
caller buffers and the segment and never use it; the master's eviction defaults (see below).

Capacity: equal memory means equal blocks held. The master starts evicting at
:data:`EVICTION_HIGH_WATERMARK` of a segment (this release's default), so a segment of ``memory_bytes`` /
:data:`EVICTION_HIGH_WATERMARK` (at least 16 MiB, the least Mooncake mounts) holds as many blocks as
``memory_bytes`` holds in the other systems before it evicts. Eviction runs in the background (it evicts
:data:`EVICTION_RATIO` of the objects, least recently used and unpinned first, never one read or looked up
within the lease, 10 s by default) and a put it has no room for yet is refused (``NO_AVAILABLE_HANDLE``);
such a block is not stored (a later get of it is a miss) and is counted in :attr:`Mooncake.rejected_puts`.

Mooncake's own listeners: the master's HTTP metadata server, the clients' transfer-engine RPC and TCP data
ports bind every interface in this release whatever ``MC_TCP_BIND_ADDRESS`` says; all traffic the backend
sends goes to 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, Setup, Unavailable, start_on_rank_zero, stop_process

HOST = "127.0.0.1"
LOCAL_BUFFER = 16 << 20  # the client's own registered buffer: put_from / get_into never use it
MIN_SEGMENT = 16 << 20  # Mooncake refuses to mount a smaller segment
SEGMENT_ALIGN = 1 << 20  # segments are whole MiB (whole pages, however large they are)
EVICTION_HIGH_WATERMARK = 0.9  # the master's --eviction_high_watermark_ratio (this release's default)
EVICTION_RATIO = 0.05  # the master's --eviction_ratio (its default)
MAX_REGISTERED = 4096  # caller's buffers kept registered at once (each is a transfer-engine memory region)
TOUCH_CHUNK = 64 << 20  # setup fills the segment with objects of at most this size
START_TIMEOUT = 30.0  # seconds for the master to listen, or the helper to mount and touch its segment
STOP_TIMEOUT = 10.0  # seconds for a clean exit before SIGKILL

# Mooncake's ErrorCode values (mooncake-store/include/types.h) that the backend tells apart
NO_AVAILABLE_HANDLE = -200  # no room in any segment (yet): the put is refused
INVALID_PARAMS = -600  # e.g. registering a range that overlaps a registered one
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706  # a recent read holds a lease on the object (the master's default is 10 s)
_ERRORS = {NO_AVAILABLE_HANDLE: "NO_AVAILABLE_HANDLE", INVALID_PARAMS: "INVALID_PARAMS",
           -703: "REPLICA_IS_NOT_READY", OBJECT_NOT_FOUND: "OBJECT_NOT_FOUND",
           OBJECT_ALREADY_EXISTS: "OBJECT_ALREADY_EXISTS", OBJECT_HAS_LEASE: "OBJECT_HAS_LEASE",
           -707: "LEASE_EXPIRED", -800: "TRANSFER_FAIL", -900: "RPC_FAIL", -901: "RPC_TIMEOUT"}
_PACKAGES = ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine")
_INSTALL = "pip install 'cascade-kv[peers]' (and apt-get install -y libibverbs1)"


def error_name(code: int) -> str:
    return f"{code} ({_ERRORS.get(code, 'see mooncake-store/include/types.h')})"


def missing() -> str:
    """Why Mooncake Store cannot run here ("" when it can), without importing it."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return f"mooncake-transfer-engine-non-cuda is not installed: {_INSTALL}"
    package = Path(next(iter(spec.submodule_search_locations)))
    if not (package / "store.so").exists() and importlib.util.find_spec("mooncake.store") is None:
        return f"the installed mooncake package has no store module ({package}): {_INSTALL}"
    try:
        ctypes.CDLL("libibverbs.so.1")
    except OSError as e:
        return f"Mooncake's store links libibverbs, which is missing ({e}): apt-get install -y libibverbs1"
    if master_binary() is None:
        return f"no mooncake_master binary in {package} nor on PATH: {_INSTALL}"
    return ""


def master_binary() -> str | None:
    """The ``mooncake_master`` the wheel ships (its console script only execs it), else one on ``PATH``."""
    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "mooncake_master"
        if bundled.is_file():
            if not os.access(bundled, os.X_OK):  # pip may drop the bit; the console script sets it too
                with contextlib.suppress(OSError):
                    bundled.chmod(bundled.stat().st_mode | 0o111)
            if os.access(bundled, os.X_OK):
                return str(bundled)
    return shutil.which("mooncake_master")


def store_class() -> Any:
    """``mooncake.store.MooncakeDistributedStore``, imported with its environment set."""
    os.environ["MC_TCP_BIND_ADDRESS"] = HOST
    # read when the library loads (its glog ignores GLOG_minloglevel): keep Mooncake's INFO and WARNING
    # lines (one per refused put) off the benchmark's output; errors still show
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    os.environ.setdefault("MC_STORE_MEMCPY", "1")  # the documented switch for copies within one client
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise Unavailable(f"cannot import mooncake.store ({e}): {_INSTALL}") from e
    return MooncakeDistributedStore


def connect(metadata_url: str, master: str, segment_bytes: int) -> Any:
    """A store client on 127.0.0.1 mounting ``segment_bytes`` of its memory (0: none)."""
    store = store_class()()
    code = store.setup(HOST, metadata_url, segment_bytes, LOCAL_BUFFER, "tcp", "", master)
    if code != 0:
        raise Unavailable(f"MooncakeDistributedStore.setup against master {master} failed: {error_name(code)}")
    return store


def touch(store: Any, segment_bytes: int) -> None:
    """Fault the store's segment in: fill it with objects, then remove them (the VM faults fresh memory in
    at ~0.5 GB/s, which would otherwise land in the first timed puts)."""
    chunk = max(1, min(TOUCH_CHUNK, segment_bytes))
    filler = np.zeros(chunk, np.uint8)
    if store.register_buffer(filler.ctypes.data, chunk) != 0:
        raise RuntimeError("mooncake: cannot register the setup filler buffer")
    keys = [f"cascade-bench/touch/{os.getpid()}/{i}" for i in range(-(-segment_bytes // chunk))]
    try:
        for key in keys:  # one at a time: the master evicts between puts once the segment is 90 % full
            code = store.put_from(key, filler.ctypes.data, chunk)
            if code not in (0, NO_AVAILABLE_HANDLE):
                raise RuntimeError(f"mooncake: setup put failed: {error_name(code)}")
    finally:
        for key in keys:
            store.remove(key)  # never-read objects hold no lease; an evicted or refused one is not found
        store.unregister_buffer(filler.ctypes.data)


def segment_bytes(memory_bytes: int) -> int:
    """The segment that holds what ``memory_bytes`` holds before the master evicts (see the module docstring)."""
    wanted = -(-int(memory_bytes / EVICTION_HIGH_WATERMARK) // SEGMENT_ALIGN) * SEGMENT_ALIGN
    return max(MIN_SEGMENT, wanted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    def close_stdin() -> None:  # the segment helper exits when its stdin closes
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]

    stop_process(proc, STOP_TIMEOUT, close_stdin if proc.stdin is not None else None)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


class Master:
    """One ``mooncake_master`` with its HTTP metadata server, on free ports of 127.0.0.1 (log in ``directory``)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.log = directory / "mooncake_master.log"
        for attempt in range(3):  # another process may take a free port before the master binds it
            self.rpc_port, self.http_port, metrics = _free_port(), _free_port(), _free_port()
            args = [binary, f"--rpc_address={HOST}", f"--rpc_port={self.rpc_port}",
                    "--enable_http_metadata_server=true", f"--http_metadata_server_host={HOST}",
                    f"--http_metadata_server_port={self.http_port}", f"--metrics_host={HOST}",
                    f"--metrics_port={metrics}", "--enable_metric_reporting=false", "--logtostderr",
                    f"--eviction_high_watermark_ratio={EVICTION_HIGH_WATERMARK}",
                    f"--eviction_ratio={EVICTION_RATIO}"]
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self._stop = weakref.finalize(self, _stop, self.proc)  # here, at close, or at exit
            deadline = time.monotonic() + START_TIMEOUT
            while self.proc.poll() is None and time.monotonic() < deadline:
                if _listening(self.rpc_port) and _listening(self.http_port):
                    return
                time.sleep(0.05)
            self._stop()
        raise Unavailable(f"mooncake_master ({binary}) did not start; its log:\n{_tail(self.log)}")

    @property
    def metadata_url(self) -> str:
        return f"http://{HOST}:{self.http_port}/metadata"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.rpc_port}"

    def stop(self) -> None:
        self._stop()


class SegmentProcess:
    """The helper process that mounts the segment for ``mooncake-remote`` (:mod:`._mooncake_segment`)."""

    def __init__(self, master: Master, segment_bytes: int, directory: Path) -> None:
        self.log = directory / "mooncake_segment.log"
        args = [sys.executable, "-m", f"{__package__}._mooncake_segment", master.metadata_url, master.address,
                str(segment_bytes)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self._stop = weakref.finalize(self, _stop, self.proc)
        line = self._readline(START_TIMEOUT + segment_bytes / 0.2e9)  # touching runs at >= ~0.5 GB/s
        if not line.startswith("ready "):
            self._stop()
            raise Unavailable(f"the Mooncake segment process did not start ({line or 'no answer'}); "
                              f"its log:\n{_tail(self.log)}")
        self.segment = line.split()[1]

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return self.proc.stdout.readline().decode(errors="replace").strip()

    def stop(self) -> None:
        self._stop()


class Mooncake(Backend):
    """Mooncake Store, its memory in this process (``mode="local"``) or in a second one (``"remote"``)."""

    def __init__(self, mode: str = "local") -> None:
        super().__init__()
        if mode not in ("local", "remote"):
            raise ValueError(f"mooncake: mode must be 'local' or 'remote', got {mode!r}")
        self.mode = mode
        self.name = "mooncake" if mode == "local" else "mooncake-remote"
        self.overwrites = False  # a put of a stored key keeps the stored bytes
        self.tier = "memory" if mode == "local" else "remote memory"
        reason = missing()
        if reason:
            raise Unavailable(reason)
        self.rejected_puts = 0
        """Puts Mooncake refused for want of room (the block was not stored)."""
        self._store: Any = None
        self._replicate: Any = None
        self._pinned: Any = None  # the prefix blocks' config: soft pinned
        self._registered: dict[int, int] = {}  # address -> bytes of the caller's buffers registered so far
        self._master: Master | None = None
        self._segment: SegmentProcess | None = None
        self._directory: Path | None = None
        self._comm: Any = None

    def _open(self, setup: Setup) -> None:
        if setup.memory_bytes < setup.block_size:
            raise ValueError(f"mooncake: memory_bytes ({setup.memory_bytes}) holds no block of {setup.block_size} B")
        comm = self._comm = setup.comm if setup.size > 1 else None
        store_class()  # the environment is set and the library loads before any process starts
        def start() -> tuple[str, str]:
            self._directory = Path(tempfile.mkdtemp(prefix="cascade-bench-mooncake-"))
            self._master = Master(master_binary() or "mooncake_master", self._directory)
            if self.mode == "remote":
                self._segment = SegmentProcess(self._master, segment_bytes(setup.memory_bytes * setup.size),
                                               self._directory)
            return self._master.metadata_url, self._master.address

        try:
            addresses = start_on_rank_zero(setup, "Mooncake's master", start)
        except BaseException:
            self._release()
            raise
        try:
            segment = segment_bytes(setup.memory_bytes) if self.mode == "local" else 0
            self._store = connect(*addresses, segment)
            from mooncake.store import ReplicateConfig, SoftPinAction

            self._replicate, self._pinned = ReplicateConfig(), ReplicateConfig()
            self._pinned.soft_pin_action = SoftPinAction.ENABLE
            for config in (self._replicate, self._pinned):
                config.replica_num = 1
                if self.mode == "local":
                    config.preferred_segment = self._store.get_hostname()
            if self.mode == "local":
                touch(self._store, segment)
            if comm is not None:
                comm.Barrier()  # every rank's segment is mounted before any rank puts
        except BaseException:
            self._release()
            raise

    def put_many(self, keys: Sequence[str], blocks: Sequence[np.ndarray], *,
                 prefix: Sequence[bool] | None = None) -> None:
        if len(keys) != len(blocks):
            raise ValueError(f"put_many: {len(keys)} keys but {len(blocks)} blocks")
        marks = [False] * len(keys) if prefix is None else [bool(p) for p in prefix]
        codes = [0] * len(keys)
        for pinned, config in ((True, self._pinned), (False, self._replicate)):  # one config per call
            part = [i for i, mark in enumerate(marks) if mark == pinned]
            if part:
                for i, code in zip(part, self._put(keys, blocks, part, config)):
                    codes[i] = code
        for key, code in zip(keys, codes):
            if code == NO_AVAILABLE_HANDLE:
                self.rejected_puts += 1
            elif code not in (0, OBJECT_ALREADY_EXISTS):  # a key already stored holds the same block
                raise RuntimeError(f"mooncake: put {key!r} failed: {error_name(code)}")

    def get_hits(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> list[bool]:
        self.check_batch(keys, outs)
        codes = self._store.batch_get_into(list(keys), [self._address(o) for o in outs], [o.nbytes for o in outs])
        for key, out, code in zip(keys, outs, codes):
            if code == out.nbytes or code == OBJECT_NOT_FOUND:
                continue
            if code >= 0:
                raise ValueError(f"mooncake: {key!r} gave {code} B, the buffer holds {out.nbytes} B")
            raise RuntimeError(f"mooncake: get {key!r} failed: {error_name(code)}")
        return [code != OBJECT_NOT_FOUND for code in codes]

    def _put(self, keys: Sequence[str], blocks: Sequence[np.ndarray], part: Sequence[int], config: Any) -> list[int]:
        return self._store.batch_put_from([keys[i] for i in part], [self._address(blocks[i]) for i in part],
                                          [blocks[i].nbytes for i in part], config)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        answers = self._store.batch_is_exist(list(keys))
        for key, answer in zip(keys, answers):
            if answer < 0:
                raise RuntimeError(f"mooncake: is_exist {key!r} failed: {error_name(answer)}")
        return [answer == 1 for answer in answers]

    def _address(self, array: np.ndarray) -> int:
        """The address of ``array``'s bytes, registered with the store (once per buffer)."""
        if not array.flags.c_contiguous:
            raise ValueError("mooncake: buffers must be C-contiguous")
        address, size = array.ctypes.data, array.nbytes
        if self._registered.get(address, -1) >= size:
            return address
        if len(self._registered) >= MAX_REGISTERED:  # a caller that allocates fresh buffers all the time
            for other in self._registered:
                self._store.unregister_buffer(other)
            self._registered.clear()
        if self._store.register_buffer(address, size) != 0:
            # it overlaps buffers registered earlier and since freed (their memory now holds this one):
            # drop those registrations and register again
            for other, n in list(self._registered.items()):
                if other < address + size and address < other + n:
                    self._store.unregister_buffer(other)
                    del self._registered[other]
            code = self._store.register_buffer(address, size)
            if code != 0:
                raise RuntimeError(f"mooncake: cannot register a buffer of {size} B: {error_name(code)}")
        self._registered[address] = size
        return address

    def version(self) -> str:
        settings = (f" (protocol tcp, MC_STORE_MEMCPY={os.environ.get('MC_STORE_MEMCPY', '0')}, eviction from "
                    f"{EVICTION_HIGH_WATERMARK:.0%} full, prefix soft-pinned)")
        for package in _PACKAGES:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return f"{package} {importlib.metadata.version(package)}{settings}"
        return "?" + settings

    def close(self) -> None:
        """Collective on several ranks: rank 0 stops the master (and the segment process) once every rank
        has closed its client."""
        if self._store is None and self._master is None:
            return
        self._close_store()
        if self._comm is not None:
            self._comm.Barrier()
        self._release()

    def _close_store(self) -> None:
        if self._store is not None:
            for address in self._registered:
                self._store.unregister_buffer(address)
            self._registered.clear()
            self._store.close()
            self._store = None

    def _release(self) -> None:
        try:
            self._close_store()
        finally:
            if self._segment is not None:
                self._segment.stop()
                self._segment = None
            if self._master is not None:
                self._master.stop()
                self._master = None
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory = None


BACKENDS = {
    "mooncake": lambda: Mooncake("local"),
    "mooncake-remote": lambda: Mooncake("remote"),
}
"""Registry name -> factory (see :mod:`.registry`)."""
