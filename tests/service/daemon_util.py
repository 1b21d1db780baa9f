"""``cascade serve`` as a subprocess for the daemon's tests, and the protocol spoken by hand.

A daemon is started, its "listening on" line read from its stdout (the pipe is the synchronisation: no
sleeps), and killed whatever the test did. Its log (stderr) goes to a file, never to a pipe nobody reads:
a daemon that logs a lot would block on a full pipe and look hung.

:class:`RawConn` speaks the protocol frame by frame, for what a well-behaved client never does (garbage,
a GET never unpinned, a PUT left half written). ``CHILD`` is the script a test runs as another process
that it can SIGKILL at a point it chooses: the script reports on stdout when it reached that point.
"""
from __future__ import annotations

import array
import mmap
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cascade_kv.service import protocol as P

START_TIMEOUT = 60.0
"""Seconds a daemon may take to say it listens (generous: a loaded CI machine); never a wait of its own."""


class Daemon:
    """A running ``cascade serve``: its process, socket and first line."""

    def __init__(self, proc: subprocess.Popen[str], socket_path: Path, line: str, log: Path) -> None:
        self.proc = proc
        self.socket = socket_path
        self.line = line
        self.log = log
        m = re.search(r"metrics on (http://\S+/metrics)", line)
        self.metrics_url = m.group(1) if m else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        self.send(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case a test stopped it) and reap; idempotent."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stderr(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def start_daemon(socket_path: Path | None, *args: str, env: dict[str, str] | None = None,
                 log: Path | None = None) -> Daemon:
    """Start ``cascade serve --socket socket_path ARGS`` and return once it listens (the daemon is killed
    if it does not). ``socket_path`` None: no ``--socket`` (the default path, from ``env``)."""
    cmd = [sys.executable, "-m", "cascade_kv.cli", "serve"]
    if socket_path is not None:
        cmd += ["--socket", str(socket_path)]
    cmd += list(args)
    if log is None:
        if socket_path is None:
            raise ValueError("start_daemon: a daemon without --socket needs a log path")
        log = socket_path.with_name(socket_path.name + ".log")
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        line = read_line(proc, "listening on")
    except BaseException:
        kill(proc)
        raise
    path = Path(re.search(r"listening on (\S+) \(", line).group(1))  # type: ignore[union-attr]
    return Daemon(proc, path, line, log)


def read_line(proc: subprocess.Popen[str], marker: str) -> str:
    """The first line of ``proc``'s stdout that holds ``marker``; RuntimeError if it exits (or stays silent
    for START_TIMEOUT) first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"{proc.args} printed no {marker!r} line within {START_TIMEOUT:g} s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args} exited ({proc.wait()}) before printing {marker!r}")
        if marker in line:
            return line


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@contextmanager
def daemon(socket_path: Path | None, *args: str, env: dict[str, str] | None = None,
           log: Path | None = None) -> Iterator[Daemon]:
    """A daemon for the ``with`` block, SIGKILLed at its end if the block did not stop it."""
    d = start_daemon(socket_path, *args, env=env, log=log)
    try:
        yield d
    finally:
        d.kill()


# ---------------------------------------------------------------------------------------------- by hand
class RawConn:
    """One connection to the daemon, frame by frame."""

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.staging: mmap.mmap | None = None
        self.staging_fd = -1

    def hello(self, version: int = P.PROTOCOL_VERSION, package: str | None = None) -> tuple[int, bytes]:
        """Send HELLO; map staging from the answer. Returns ``(status, body)``."""
        from cascade_kv import __version__

        body = P.HELLO_REQ.pack(version, os.getpid()) + (package or __version__).encode()
        self.sock.sendall(P.frame(P.Op.HELLO, body))
        fds = array.array("i")
        head = b""
        while len(head) < P.HEADER.size:
            data, anc, _, _ = self.sock.recvmsg(P.HEADER.size - len(head), socket.CMSG_SPACE(8 * fds.itemsize))
            if not data:
                raise ConnectionError("closed during the handshake")
            head += data
            for _, _, raw in anc:
                fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
        _, status, length = P.read_header(head, 1 << 16)
        body = bytes(P.recv_exact(self.sock, length))
        if fds:
            self.staging_fd = fds[0]
            for fd in fds[1:]:
                os.close(fd)
        return status, body

    def send(self, op: int, body: bytes = b"") -> None:
        self.sock.sendall(P.frame(op, body))

    def recv(self) -> tuple[int, int, bytes]:
        op, status, length = P.read_header(bytes(P.recv_exact(self.sock, P.HEADER.size)), P.MAX_REPLY)
        return op, status, bytes(P.recv_exact(self.sock, length)) if length else b""

    def call(self, op: int, body: bytes = b"") -> tuple[int, bytes]:
        self.send(op, body)
        _, status, rbody = self.recv()
        return status, rbody

    def map_staging(self, size: int) -> mmap.mmap:
        if self.staging is None or len(self.staging) < size:
            self.staging = mmap.mmap(self.staging_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return self.staging

    def closed_by_peer(self) -> bool:
        """Whether the daemon closed this connection: reads until EOF (or a reset), which the daemon's
        drop sends; False if it answered something instead."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
        if self.staging_fd >= 0:
            os.close(self.staging_fd)
        self.sock.close()


CHILD = r'''
import os, struct, sys
import numpy as np
sys.path.insert(0, os.environ["DAEMON_UTIL_DIR"])
from daemon_util import RawConn, value
from cascade_kv.hashing import Hasher
from cascade_kv.service import protocol as P

mode, path, key = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "loop":  # a real client putting batches until killed; one line per acknowledged batch
    import cascade_kv
    c = cascade_kv.connect(path)
    for i in range(1_000_000):
        keys = [f"{key}{i}-{j}" for j in range(4)]
        c.put_many(keys, [value(k) for k in keys])
        if i >= 4:
            c.delete_many([f"{key}{i - 4}-{j}" for j in range(4)])  # the arena holds the last few batches
        print(i, flush=True)
if mode == "client-put":  # another process's client: puts, says so, waits
    import cascade_kv
    c = cascade_kv.connect(path)
    c.put(key, value(key))
    print("put", flush=True)
    sys.stdin.read()
    sys.exit(0)
conn = RawConn(path)
status, body = conn.hello()
proto, arena, staging, hash_id = P.HELLO_REP.unpack_from(body)
ns = P.U32.pack(0)
a = value(key)
if mode in ("put", "put-partial"):  # a put left half written: killed, or committed with the rest missing
    digest = Hasher(P.HASHES[hash_id]).digest(a.data)
    status, body = conn.call(P.Op.PUT, ns + P.pack_keys([key]) + P.PUT_ITEM.pack(0, digest) + P.pack_meta(a.dtype, a.shape))
    if status != P.Status.NEED_BYTES:
        sys.exit(f"expected NEED_BYTES, got {status}: {body!r}")
    size, m = struct.unpack_from("<QI", body)
    (_, off), = struct.iter_unpack("<IQ", body[12:12 + 12 * m])
    area = conn.map_staging(size)
    half = a.nbytes // 2
    area[off:off + half] = a.tobytes()[:half]
    if mode == "put-partial":
        status, body = conn.call(P.Op.PUT_DATA)
        print(status, body.partition(b"\0")[0].decode(), flush=True)
        sys.exit(0)
    print("half written", flush=True)
elif mode == "get":  # a get never unpinned
    status, body = conn.call(P.Op.GET, ns + P.pack_keys([key]))
    token = P.U32.unpack_from(body)[0]
    print("pinned", token, flush=True)
sys.stdin.read()  # wait to be killed
'''


def value(key: str, nbytes: int = 64 << 10) -> "np.ndarray":  # noqa: F821 (numpy imported lazily)
    """The bytes a test puts under ``key``: a pure function of the key, so any process can check them."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(key.encode())).integers(0, 256, nbytes, dtype=np.uint8)


def start_child(mode: str, path: Path, key: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Run ``CHILD`` in ``mode``; read its stdout for the point it reached, then SIGKILL it (or let it end)."""
    full = dict(os.environ if env is None else env, DAEMON_UTIL_DIR=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(path), key], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=full)


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    kill(proc)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Until ``predicate()`` holds: for what the daemon does on its own after an event the test caused (a
    dead client's pins go when its connection thread sees EOF). Each check is a round trip to the daemon,
    which paces the loop; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
