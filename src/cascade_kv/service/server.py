"""The node daemon: one store, many local client processes, a thread per connection.

A connection's thread blocks in ``recv`` (an idle daemon costs no CPU), decodes one request, answers it
and goes back to waiting. What a connection holds — pinned blocks, a put waiting for its bytes, its
staging area — is its own and is released when it ends, however it ends: a client that closes, dies
(SIGKILL: the kernel closes its socket) or sends something that is not this protocol (the daemon drops
it and keeps serving the others).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import CapacityError, CascadeError, ConfigError, InvalidArgument, ServiceClosed
from ..ids import Digest
from ..stats import stats_to_dict
from ..tiers.allocator import align_up
from . import protocol as P
from .backends import view_of
from .metrics import ServiceMetrics
from .served import BlockMeta, NeedBytes

log = logging.getLogger(__name__)

STAGING_START = 1 << 20
SOCKET_MAX = 107  # sun_path holds 108 bytes with its NUL


def runtime_dir() -> Path:
    """The user's directory for sockets: ``$XDG_RUNTIME_DIR/cascade-kv``, else ``/tmp/cascade-kv-<uid>`` (not
    ``$TMPDIR``: a socket path must stay under 108 bytes)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "cascade-kv" if runtime and os.path.isdir(runtime) else Path(f"/tmp/cascade-kv-{os.getuid()}")


def default_socket_path() -> Path:
    """``$CASCADE_SOCKET``, else ``cascade.sock`` in :func:`runtime_dir`: per user, in a directory only the user
    can enter."""
    env = os.environ.get("CASCADE_SOCKET")
    return Path(env) if env else runtime_dir() / "cascade.sock"


def private_dir(path: Path) -> None:
    """Create the socket's directory 0700; refuse one another user owns or others may enter (a socket
    there could be swapped for an impostor's)."""
    try:
        path.mkdir(mode=0o700, parents=True)
        return
    except FileExistsError:
        pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"socket directory {path} exists and is not a directory")
    if st.st_uid != os.getuid() and not (path.parent == Path("/") or str(path) in ("/tmp", "/run")):
        raise ConfigError(f"socket directory {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")


class _Staging:
    """A connection's staging area: a memfd both sides map, grown (never shrunk) to the largest request."""

    def __init__(self, limit: int) -> None:
        self.fd = os.memfd_create("cascade-kv-staging", os.MFD_CLOEXEC)
        self.limit = limit
        self.size = 0
        self.area = np.empty(0, np.uint8)
        self._map: mmap.mmap | None = None
        self.grow(STAGING_START)

    def grow(self, need: int) -> np.ndarray:
        if need > self.size:
            if need > self.limit:
                raise CapacityError(f"one call moves {need} B through the daemon's staging area, over its limit of "
                                    f"{self.limit} B; split the batch")
            size = min(self.limit, max(need, 2 * self.size))
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.area = np.frombuffer(self._map, np.uint8)  # the old mapping goes with its last view
            self.size = size
        return self.area

    def close(self) -> None:
        self.area = np.empty(0, np.uint8)
        self._map = None
        os.close(self.fd)


class _Connection:
    """One client: its socket, namespaces, pins, pending put and staging area."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.views: list[Any] = [server.backend.view(None)]
        self.pins: dict[int, object] = {}
        self.next_token = 1
        self.pending: tuple[Any, list, list, list, list[Digest], list[int]] | None = None
        self.staging: _Staging | None = None
        self.pid = 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        srv = self.server
        dropped = False
        try:
            self._hello()
            while True:
                op, _, length = P.read_header(P.recv_exact(self.sock, P.HEADER.size), P.MAX_REQUEST)
                body = memoryview(P.recv_exact(self.sock, length)) if length else memoryview(b"")
                handler = _HANDLERS.get(op)
                if handler is None:
                    raise P.ProtocolError(f"unknown op {op}")
                try:
                    reply = handler(self, body)
                except P.ProtocolError:
                    raise
                except struct.error as e:  # a body shorter than its fields: the client's garbage, not our bug
                    raise P.ProtocolError(f"op {op}: malformed body ({e})") from None
                except NeedBytes:
                    raise  # handled inside the put handlers
                except (CascadeError, ValueError, TypeError, KeyError, OSError) as e:
                    reply = P.frame(op, P.pack_error(e), P.Status.ERROR)
                if reply is not None:
                    self.sock.sendall(reply)
        except P.ProtocolError as e:
            dropped = True
            srv.metrics.protocol_error()
            log.warning("dropped client pid %s: %s", self.pid or "?", e)
        except (ServiceClosed, ConnectionError, OSError):
            pass  # the client went away (or the daemon is stopping)
        except Exception:  # a bug in a handler: this client only, never the daemon
            dropped = True
            log.exception("client pid %s: internal error; connection dropped", self.pid or "?")
        finally:
            self._release()
            srv.metrics.client_disconnected(dropped)
            srv._forget(self)

    def _hello(self) -> None:
        op, _, length = P.read_header(P.recv_exact(self.sock, P.HEADER.size), 4096)
        if op != P.Op.HELLO:
            raise P.ProtocolError(f"first message is op {op}, not HELLO")
        body = bytes(P.recv_exact(self.sock, length))
        try:
            proto, self.pid = P.HELLO_REQ.unpack_from(body)
            version = body[P.HELLO_REQ.size:].decode("utf-8", "replace")
        except struct.error:
            raise P.ProtocolError("short HELLO") from None
        if proto != P.PROTOCOL_VERSION or version != __version__:
            from ..errors import VersionMismatch

            err = VersionMismatch(f"client cascade-kv {version} (protocol {proto}) refused by the daemon, which runs "
                                  f"cascade-kv {__version__} (protocol {P.PROTOCOL_VERSION}); use the same version on both sides")
            self.sock.sendall(P.frame(P.Op.HELLO, P.pack_error(err), P.Status.ERROR))
            raise ServiceClosed(str(err))
        backend = self.server.backend
        self.staging = _Staging(self.server.staging_limit)
        rep = P.HELLO_REP.pack(P.PROTOCOL_VERSION, backend.arena_size, self.staging.size,
                               P.HASHES.index(backend.hash_algorithm)) + __version__.encode()
        fds = [self.staging.fd] + ([backend.arena_fd] if backend.arena_fd >= 0 else [])
        self.sock.sendmsg([P.frame(P.Op.HELLO, rep)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])

    def _release(self) -> None:
        backend = self.server.backend
        for token in self.pins.values():
            try:
                backend.release(token)
            except CascadeError:
                pass  # the store closed under us: its pins went with it
        self.pins.clear()
        self.pending = None
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ helpers
    def _view(self, body: memoryview) -> tuple[Any, int]:
        (ns,) = P.U32.unpack_from(body)
        if ns >= len(self.views):
            raise P.ProtocolError(f"namespace id {ns} was never opened on this connection")
        return self.views[ns], P.U32.size

    def _keys(self, body: memoryview) -> tuple[Any, list]:
        view, off = self._view(body)
        keys, _ = P.unpack_keys(body, off)
        return view, keys

    def _grow(self, need: int) -> np.ndarray:
        staging = self.staging  # set by _hello before any request, gone once the connection is released
        if staging is None:
            raise ServiceClosed(f"client pid {self.pid}: the connection's staging area is released")
        return staging.grow(need)


# ---------------------------------------------------------------------------------------------- handlers
def _get(c: _Connection, body: memoryview) -> bytes:
    t0 = time.perf_counter()
    view, off = c._view(body)
    keys, off = P.unpack_keys(body, off)
    expect: list[tuple[np.dtype, tuple[int, ...]] | None] | None = None
    if len(body) > off and body[off]:  # the caller's outs: checked before anything is counted or pinned
        expect, off = [], off + 1
        for _ in keys:
            if len(body) <= off:
                raise P.ProtocolError("short GET")
            given, off = body[off], off + 1
            if given:
                dt, shape, off = P.unpack_meta(body, off)
                expect.append((dt, tuple(shape)))
            else:
                expect.append(None)
    placed, token = c.server.backend.get(view, keys, c._grow, expect)
    tok = 0
    if token:
        tok = c.next_token
        c.next_token += 1
        c.pins[tok] = token
    parts = [P.U32.pack(tok), P.U64.pack(c.staging.size), P.U32.pack(len(placed))]  # type: ignore[union-attr]
    nbytes = 0
    for p in placed:
        parts.append(P.GET_ITEM.pack(p.staging, p.offset, p.nbytes))
        parts.append(P.pack_meta(p.dtype, p.shape))
        nbytes += p.nbytes
    c.server.metrics.observe_get(time.perf_counter() - t0, len(placed), nbytes)
    return P.frame(P.Op.GET, b"".join(parts))


def _unpin(c: _Connection, body: memoryview) -> None:
    (tok,) = P.U32.unpack_from(body)
    token = c.pins.pop(tok, None)
    if token is None:
        raise P.ProtocolError(f"unpin of token {tok}, which this connection does not hold")
    c.server.backend.release(token)


def _put(c: _Connection, body: memoryview) -> bytes:
    view, off = c._view(body)
    keys, off = P.unpack_keys(body, off)
    metas, prefixes, digests = [], [], []
    try:
        for _ in keys:
            prefix, digest = P.PUT_ITEM.unpack_from(body, off)
            dt, shape, off = P.unpack_meta(body, off + P.PUT_ITEM.size)
            nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            metas.append(BlockMeta(dt, tuple(shape), nbytes))
            prefixes.append(bool(prefix))
            digests.append(Digest(digest))
    except struct.error:
        raise P.ProtocolError("short PUT") from None
    c.pending = None
    return _try_put(c, P.Op.PUT, view, keys, metas, prefixes, digests, time.perf_counter())


def _try_put(c: _Connection, op: int, view: Any, keys: list, values: list, prefixes: list, digests: list[Digest],
             t0: float) -> bytes:
    try:
        c.server.backend.put(view, keys, values, prefixes, digests)
    except NeedBytes as e:
        need = e.indices
        offsets, total = [], 0
        for i in need:
            offsets.append(total)
            total = align_up(total + values[i].nbytes)
        c._grow(total)
        c.pending = (view, keys, values, prefixes, digests, need, offsets)  # type: ignore[assignment]
        parts = [P.U64.pack(c.staging.size), P.U32.pack(len(need))]  # type: ignore[union-attr]
        parts += [struct.pack("<IQ", i, o) for i, o in zip(need, offsets)]
        return P.frame(op, b"".join(parts), P.Status.NEED_BYTES)
    sent = sum(1 for v in values if isinstance(v, BlockMeta))
    c.server.metrics.observe_put(time.perf_counter() - t0, len(values), sum(v.nbytes for v in values), sent)
    return P.frame(op)


def _put_data(c: _Connection, body: memoryview) -> bytes:
    if c.pending is None:
        raise P.ProtocolError("PUT_DATA with no put waiting for bytes")
    view, keys, values, prefixes, digests, need, offsets = c.pending  # type: ignore[misc]
    c.pending = None
    area = c.staging.area  # type: ignore[union-attr]
    values = list(values)
    for i, off in zip(need, offsets):
        m = values[i]
        values[i] = view_of(area, off, m.nbytes, m.dtype, m.shape)
    return _try_put(c, P.Op.PUT_DATA, view, keys, values, prefixes, digests, time.perf_counter())


def _put_abort(c: _Connection, body: memoryview) -> None:
    c.pending = None


def _lookup(c: _Connection, body: memoryview) -> bytes:
    t0 = time.perf_counter()
    view, keys = c._keys(body)
    n = c.server.backend.call(lambda: view.lookup(keys))
    c.server.metrics.observe_lookup(time.perf_counter() - t0, len(keys), n)
    return P.frame(P.Op.LOOKUP, P.U32.pack(n))


def _simple(op: P.Op, fn: Callable[[Any, list], Any], encode: Callable[[Any], bytes] = lambda r: b"") -> Callable:
    def handler(c: _Connection, body: memoryview) -> bytes:
        view, keys = c._keys(body)
        result = c.server.backend.call(lambda: fn(view, keys))
        return P.frame(op, encode(result))
    return handler


def _one(keys: list) -> Any:
    if len(keys) != 1:
        raise P.ProtocolError(f"expected one key, got {len(keys)}")
    return keys[0]


def _info_json(info: Any) -> bytes:
    return json.dumps({"dtype": P.dtype_text(info.dtype).decode(), "shape": list(info.shape), "nbytes": info.nbytes,
                       "prefix": info.prefix, "digest": info.digest, "tiers": list(info.tiers),
                       "shared_by": info.shared_by}).encode()


def _stats(c: _Connection, body: memoryview) -> bytes:
    view, off = c._view(body)
    all_ns = bool(body[off]) if len(body) > off else False
    if view is c.views[0]:
        s = c.server.backend.call(lambda: view.stats(all_namespaces=all_ns))
    else:
        s = c.server.backend.call(view.stats)
    return P.frame(P.Op.STATS, json.dumps(stats_to_dict(s)).encode())


def _namespace(c: _Connection, body: memoryview) -> bytes:
    try:
        has_quota, quota = struct.unpack_from("<BQ", body)
        name = bytes(body[9:]).decode("utf-8")
    except (struct.error, UnicodeDecodeError):
        raise P.ProtocolError("bad NAMESPACE") from None
    view = c.server.backend.view(name, quota if has_quota else None)
    c.views.append(view)
    q = view.protected_quota
    return P.frame(P.Op.NAMESPACE, struct.pack("<IBQ", len(c.views) - 1, q is not None, q or 0))


def _demote(view: Any, keys: list) -> None:
    if not hasattr(view, "demote"):
        raise InvalidArgument("demote: a namespace has no demote; demote keys of the default namespace")
    view.demote(keys)


def _service_stats(c: _Connection, body: memoryview) -> bytes:
    snap = dict(c.server.metrics.snapshot())
    snap["socket"] = str(c.server.path)
    snap["pid"] = os.getpid()
    return P.frame(P.Op.SERVICE_STATS, json.dumps(snap).encode())


def _config(c: _Connection, body: memoryview) -> bytes:
    store = c.server.backend.store
    cfg = {f: (os.fspath(v) if isinstance(v, os.PathLike) else v) for f, v in
           ((f, getattr(store.config, f)) for f in type(store.config).__dataclass_fields__)}
    caps = {"supports_persist": store.supports_persist, "supports_demote": store.supports_demote,
            "stats_scope": store.stats_scope, "ignored_config": sorted(store.ignored_config)}
    return P.frame(P.Op.CONFIG, json.dumps({"config": cfg, "capabilities": caps}).encode())


_HANDLERS: dict[int, Callable[[_Connection, memoryview], bytes | None]] = {
    P.Op.GET: _get,
    P.Op.UNPIN: _unpin,
    P.Op.PUT: _put,
    P.Op.PUT_DATA: _put_data,
    P.Op.PUT_ABORT: _put_abort,
    P.Op.LOOKUP: _lookup,
    P.Op.DELETE: _simple(P.Op.DELETE, lambda v, k: v.delete_many(k)),
    P.Op.PROTECT: _simple(P.Op.PROTECT, lambda v, k: v.protect(_one(k))),
    P.Op.UNPROTECT: _simple(P.Op.UNPROTECT, lambda v, k: v.unprotect(_one(k))),
    P.Op.DEMOTE: _simple(P.Op.DEMOTE, _demote),
    P.Op.INFO: _simple(P.Op.INFO, lambda v, k: v.info(_one(k)), _info_json),
    P.Op.KEYS: _simple(P.Op.KEYS, lambda v, k: v.keys(), P.pack_keys),
    P.Op.LEN: _simple(P.Op.LEN, lambda v, k: len(v), P.U64.pack),
    P.Op.CONTAINS: _simple(P.Op.CONTAINS, lambda v, k: v.contains(_one(k)), lambda r: bytes([r])),
    P.Op.STATS: _stats,
    P.Op.NAMESPACE: _namespace,
    P.Op.SETTLE: _simple(P.Op.SETTLE, lambda v, k: v.settle() if hasattr(v, "settle") else None),
    P.Op.SERVICE_STATS: _service_stats,
    P.Op.CONFIG: _config,
}


# ---------------------------------------------------------------------------------------------- the server
class Server:
    """Serve ``backend`` on the Unix socket ``path``; :meth:`start` returns once it listens.

    ``stop()`` (or leaving the ``with``) stops accepting, ends every connection (releasing their pins),
    removes the socket file and closes the store."""

    def __init__(self, backend: Any, path: str | os.PathLike[str] | None = None, *, rank: int | None = None,
                 staging_limit: int | None = None) -> None:
        self.backend = backend
        self.path = Path(path) if path is not None else default_socket_path()
        if len(os.fsencode(self.path)) > SOCKET_MAX:
            raise ConfigError(f"socket path {self.path} is {len(os.fsencode(self.path))} bytes; Unix sockets allow "
                              f"{SOCKET_MAX}: choose a shorter --socket")
        cap = getattr(getattr(backend.store, "config", None), "host_capacity", 0) or 0
        self.staging_limit = staging_limit or max(256 << 20, 2 * int(cap))
        self.metrics = ServiceMetrics(self._store_stats, rank=rank)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._accepting: threading.Thread | None = None
        self._stopping = False
        self._http: Any = None

    def _store_stats(self) -> Any:
        return self.backend.call(lambda: self.backend.store.stats(all_namespaces=True))

    # ------------------------------------------------------------------ lifecycle
    def start(self, metrics_port: int | None = None) -> "Server":
        private_dir(self.path.parent)
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is born 0600: no window in which another user could connect
        try:
            sock.bind(os.fspath(self.path))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {self.path}: {e}") from e
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.listen(128)
        self._listener = sock
        if metrics_port is not None:
            try:
                self._http = self.metrics.serve_http(metrics_port)
            except BaseException:
                self._unlisten()
                raise
        self._accepting = threading.Thread(target=self._accept_loop, args=(sock,), name="cascade-serve-accept",
                                           daemon=True)
        self._accepting.start()
        return self

    @property
    def metrics_port(self) -> int | None:
        return None if self._http is None else self._http.port

    def _clear_stale(self) -> None:
        """A socket file left by a daemon that died is removed; one a live daemon answers on is not."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{self.path} exists and is not a socket; choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # nobody listens: a dead daemon's
            return
        finally:
            probe.close()
        raise ConfigError(f"a daemon already serves at {self.path}; stop it first or choose another --socket")

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # stop() shut the listener down
            conn = _Connection(self, sock)
            t = threading.Thread(target=conn.run, name="cascade-serve-client", daemon=True)
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                self._conns.add(conn)
                self._threads.add(t)
            self.metrics.client_connected()
            t.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._threads.discard(threading.current_thread())

    def _unlisten(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        try:  # only our own socket file: a newer daemon may have replaced it
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            conns = list(self._conns)
            threads = list(self._threads)
        self._unlisten()
        if self._accepting is not None:
            self._accepting.join(timeout)
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread in recv; it releases its pins
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._http is not None:
            self._http.close()
            self._http = None
        self.backend.close()

    def __enter__(self) -> "Server":
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
