"""``cascade_kv.connect()``: the store's API, served by the node daemon, with the bytes moved by the caller.

A get asks the daemon where the blocks lie (it pins them) and copies them out of the daemon's arena,
which this process maps read-only, straight into the caller's buffers; then it tells the daemon to
unpin (no answer awaited: the next call's answer orders it). A put hashes here, sends the digests
and only then, for the blocks the daemon does not hold, writes the bytes into the connection's staging
area and commits. One lock per client: calls from several threads take turns on the one connection.

A daemon that dies shows as :class:`~cascade_kv.errors.ServiceClosed` on the next call (its socket
closes with it); one that hangs as :class:`~cascade_kv.errors.PeerTimeout` after ``timeout`` seconds.
Either way the connection is done: connect again. The copies already made stay right, because a pinned
block's bytes do not change while the daemon lives, and a dead daemon changes nothing.
"""
from __future__ import annotations

import array
import json
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..arrays import byte_view, check_key, check_out, check_outs, finish_outs, key_list, needs_staging, put_items
from ..config import CascadeConfig
from ..errors import (CascadeError, InvalidArgument, PeerTimeout, ServiceClosed,
                      ServiceUnavailable, StoreClosed)
from ..hashing import Hasher
from ..ids import Key
from ..memcopy import copy_bytes
from ..stats import StoreStats, stats_from_dict
from ..tensors import is_tensor, numpy_dtype
from . import protocol as P
from .server import default_socket_path

DEFAULT_TIMEOUT = 30.0
POPULATE_MAX = 16 << 30
"""Arenas up to this size are mapped with MAP_POPULATE at connect (see Client._hello)."""


def connect(path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> "Client":
    """A client of the node daemon at ``path`` (default: ``$CASCADE_SOCKET`` or the per-user socket that
    ``cascade serve`` uses). ``timeout``: seconds any call may wait for the daemon before it raises."""
    return Client(path, timeout=timeout)


class Client:
    """A connection to the node daemon; the API of :class:`~cascade_kv.store.Store` (see ``contract.py``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise InvalidArgument(f"connect: timeout must be a positive number of seconds, not {timeout!r}")
        self.path = Path(path) if path is not None else default_socket_path()
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._closed = False
        self._broken: str | None = None
        self._arena = np.empty(0, np.uint8)
        self._staging = np.empty(0, np.uint8)
        self._staging_fd = -1
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(self.timeout)
        try:
            self._sock.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError) as e:
            self._sock.close()
            raise ServiceUnavailable(f"no cascade-kv daemon at {self.path} ({e.strerror or e}); start one with "
                                     f"`cascade serve --socket {self.path}`") from None
        except OSError as e:
            self._sock.close()
            raise ServiceUnavailable(f"cannot connect to a cascade-kv daemon at {self.path}: {e}") from None
        try:
            self._hello()
        except BaseException:
            self._shut()
            raise
        self._default = ClientNamespace(self, 0, None, None)
        with self._lock:
            d = json.loads(self._call(P.Op.CONFIG, b"")[1])
        self.config = CascadeConfig(**d["config"])
        """The daemon store's configuration."""
        caps = d["capabilities"]
        self.supports_persist: bool = caps["supports_persist"]
        self.supports_demote: bool = caps["supports_demote"]
        self.stats_scope: str = caps["stats_scope"]
        self.ignored_config: frozenset[str] = frozenset(caps["ignored_config"])

    # ------------------------------------------------------------------ connection
    def _hello(self) -> None:
        req = P.HELLO_REQ.pack(P.PROTOCOL_VERSION, os.getpid()) + __version__.encode()
        self._sock.sendall(P.frame(P.Op.HELLO, req))
        fds = array.array("i")
        head = bytearray()
        try:
            while len(head) < P.HEADER.size:
                data, anc, _, _ = self._sock.recvmsg(P.HEADER.size - len(head), socket.CMSG_SPACE(8 * fds.itemsize))
                if not data:
                    raise ServiceClosed(f"the daemon at {self.path} closed the connection during the handshake")
                head += data
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
            _, status, length = P.read_header(bytes(head), 1 << 16)
            body = bytes(P.recv_exact(self._sock, length))
        except socket.timeout:
            raise PeerTimeout(f"the daemon at {self.path} did not answer the handshake within {self.timeout:g} s") from None
        try:
            if status == P.Status.ERROR:
                P.raise_error(body)
            proto, arena_size, staging_size, hash_id = P.HELLO_REP.unpack_from(body)
            if len(fds) < 1 + bool(arena_size):
                raise P.ProtocolError("the daemon's handshake did not pass its memory")
            self._hasher = Hasher(P.HASHES[hash_id])
            self._staging_fd = fds[0]
            self._map_staging(staging_size)
            if arena_size:
                # Page-table entries are made now, not at each page's first read: a first pass over a 2 MiB
                # block copied at ~6.5 GB/s instead of ~8.2 (minor faults). ~30 ms per GiB, so only up to
                # POPULATE_MAX; a larger arena's pages are mapped as they are first read.
                flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if arena_size <= POPULATE_MAX else 0)
                m = mmap.mmap(fds[1], arena_size, flags, mmap.PROT_READ)
                self._arena = np.frombuffer(m, np.uint8)
        finally:
            for fd in fds[1:]:
                os.close(fd)  # the mapping keeps the arena; only staging's descriptor is mapped again

    def _map_staging(self, size: int) -> None:
        if size > len(self._staging):
            m = mmap.mmap(self._staging_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._staging = np.frombuffer(m, np.uint8)

    def _send(self, op: int, body: bytes) -> None:
        self._check()
        try:
            self._sock.sendall(P.frame(op, body))
        except socket.timeout:
            self._fail(f"the daemon at {self.path} did not take a request within {self.timeout:g} s", PeerTimeout)
        except OSError as e:
            self._fail(f"the daemon at {self.path} closed the connection ({e}); it stopped or died: connect again")

    def _call(self, op: int, body: bytes) -> tuple[int, bytes]:
        """Send one request and read its answer; raise the daemon's error as ours."""
        self._send(op, body)
        try:
            _, status, length = P.read_header(bytes(P.recv_exact(self._sock, P.HEADER.size)), P.MAX_REPLY)
            rbody = bytes(P.recv_exact(self._sock, length)) if length else b""
        except socket.timeout:
            self._fail(f"the daemon at {self.path} did not answer within {self.timeout:g} s", PeerTimeout)
        except (ServiceClosed, OSError) as e:
            self._fail(f"the daemon at {self.path} closed the connection ({e}); it stopped or died: connect again")
        if status == P.Status.ERROR:
            P.raise_error(rbody)
        return status, rbody

    def _check(self) -> None:
        if self._closed:
            raise StoreClosed("the client is closed")
        if self._broken is not None:
            raise ServiceClosed(self._broken)

    def _fail(self, message: str, cls: type[CascadeError] = ServiceClosed) -> Any:
        # a request may be half sent or its answer half read: nothing more can be said on this connection
        self._broken = message
        self._shut()
        raise cls(message)

    def _shut(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
        if self._staging_fd >= 0:
            os.close(self._staging_fd)
            self._staging_fd = -1
        self._arena = np.empty(0, np.uint8)
        self._staging = np.empty(0, np.uint8)

    def close(self) -> None:
        """End the connection (the daemon releases whatever it held for it). Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._shut()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<cascade_kv.Client {str(self.path)!r}{' closed' if self._closed else ''}>"

    # ------------------------------------------------------------------ the store's API (default namespace)
    def put(self, key: Key, array: object, is_prefix: bool = False) -> None:
        self._default.put(key, array, is_prefix)

    def put_many(self, keys: Sequence[Key], arrays: Sequence[object], *, is_prefix: bool | Sequence[bool] = False) -> None:
        self._default.put_many(keys, arrays, is_prefix=is_prefix)

    def get(self, key: Key, out: Any = None) -> Any:
        return self._default.get(key, out)

    def get_many(self, keys: Sequence[Key], outs: Sequence[Any] | None = None) -> list[Any]:
        return self._default.get_many(keys, outs)

    def lookup(self, keys: Sequence[Key]) -> int:
        return self._default.lookup(keys)

    def delete(self, key: Key) -> None:
        self._default.delete(key)

    def delete_many(self, keys: Iterable[Key]) -> None:
        self._default.delete_many(keys)

    def protect(self, key: Key) -> None:
        self._default.protect(key)

    def unprotect(self, key: Key) -> None:
        self._default.unprotect(key)

    def demote(self, keys: Iterable[Key]) -> None:
        self._default._keys_call(P.Op.DEMOTE, key_list(keys, "demote"))

    def info(self, key: Key) -> Any:
        return self._default.info(key)

    def keys(self) -> list[Key]:
        return self._default.keys()

    def contains(self, key: Key) -> bool:
        return self._default.contains(key)

    def __contains__(self, key: object) -> bool:
        return self._default.__contains__(key)

    def __len__(self) -> int:
        return len(self._default)

    def stats(self, all_namespaces: bool = False) -> StoreStats:
        with self._lock:
            _, body = self._call(P.Op.STATS, P.U32.pack(0) + bytes([bool(all_namespaces)]))
        return stats_from_dict(json.loads(body))

    def service_stats(self) -> dict[str, Any]:
        """The daemon's own counters and latency percentiles (what ``cascade stats`` prints)."""
        with self._lock:
            _, body = self._call(P.Op.SERVICE_STATS, b"")
        return json.loads(body)

    def settle(self) -> None:
        """Wait until the daemon's background promotions are done (tests and benchmarks)."""
        self._default._keys_call(P.Op.SETTLE, [])

    def namespace(self, name: str, protected_quota: int | str | None = None) -> "ClientNamespace":
        """A view that sees only its own keys (see :meth:`Store.namespace`)."""
        from ..namespace import check_name, check_quota

        name = check_name(name)
        quota = check_quota(protected_quota)
        with self._lock:
            _, body = self._call(P.Op.NAMESPACE, struct.pack("<BQ", quota is not None, quota or 0) + name.encode())
        ns, has_quota, q = struct.unpack_from("<IBQ", body)
        return ClientNamespace(self, ns, name, q if has_quota else None)


class ClientNamespace:
    """The store's API on one namespace of the daemon's store (the client's default one is ``ns`` 0)."""

    __slots__ = ("_client", "_ns", "_name", "_quota", "_prefix")

    def __init__(self, client: Client, ns: int, name: str | None, quota: int | None) -> None:
        self._client = client
        self._ns = ns
        self._name = name
        self._quota = quota
        self._prefix = P.U32.pack(ns)

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def protected_quota(self) -> int | None:
        return self._quota

    def _keys_call(self, op: int, keys: list[Key]) -> bytes:
        with self._client._lock:
            return self._client._call(op, self._prefix + P.pack_keys(keys))[1]

    # ------------------------------------------------------------------ writes
    def put(self, key: Key, array: object, is_prefix: bool = False) -> None:
        self.put_many([key], [array], is_prefix=is_prefix)

    def put_many(self, keys: Sequence[Key], arrays: Sequence[object], *, is_prefix: bool | Sequence[bool] = False) -> None:
        items = put_items(keys, arrays, is_prefix)
        c = self._client
        c._check()
        digest = c._hasher.digest
        parts = [self._prefix, P.pack_keys([k for k, _, _ in items])]
        texts: dict[np.dtype, bytes] = {}
        for _, a, p in items:
            text = texts.get(a.dtype)
            if text is None:
                text = texts[a.dtype] = P.dtype_text(a.dtype)
            parts.append(P.PUT_ITEM.pack(p, digest(byte_view(a))))  # hashed here: the daemon may need no bytes
            parts.append(P.pack_meta(a.dtype, a.shape, text))
        with c._lock:
            status, body = c._call(P.Op.PUT, b"".join(parts))
            while status == P.Status.NEED_BYTES:
                size, m = struct.unpack_from("<QI", body)
                c._map_staging(size)
                try:
                    for i, off in struct.iter_unpack("<IQ", body[12:12 + 12 * m]):
                        a = items[i][1]
                        if a.nbytes:
                            copy_bytes(memoryview(c._staging[off:off + a.nbytes]), byte_view(a))
                except BaseException:
                    c._send(P.Op.PUT_ABORT, b"")
                    raise
                status, body = c._call(P.Op.PUT_DATA, b"")

    def delete(self, key: Key) -> None:
        self.delete_many([key])

    def delete_many(self, keys: Iterable[Key]) -> None:
        self._keys_call(P.Op.DELETE, key_list(keys, "delete_many"))

    def protect(self, key: Key) -> None:
        self._keys_call(P.Op.PROTECT, [check_key(key)])

    def unprotect(self, key: Key) -> None:
        self._keys_call(P.Op.UNPROTECT, [check_key(key)])

    # ------------------------------------------------------------------ reads
    def get(self, key: Key, out: Any = None) -> Any:
        return self.get_many([key], None if out is None else [out])[0]

    def get_many(self, keys: Sequence[Key], outs: Sequence[Any] | None = None) -> list[Any]:
        keys = key_list(keys, "get_many")
        check_outs(keys, outs)
        c = self._client
        request = [self._prefix, P.pack_keys(keys)]
        if outs is not None:  # the daemon checks them against the values before it counts or pins anything
            request.append(b"\x01")
            for k, o in zip(keys, outs):
                request.append(_expect(k, o))
        with c._lock:
            _, body = c._call(P.Op.GET, b"".join(request))
            token, size, n = struct.unpack_from("<IQI", body)
            try:
                c._map_staging(size)
                off = 16
                places = []
                for _ in range(n):
                    staged, offset, nbytes = P.GET_ITEM.unpack_from(body, off)
                    dt, shape, off = P.unpack_meta(body, off + P.GET_ITEM.size)
                    places.append((staged, offset, nbytes, dt, shape))
                results = [np.empty(shape, dt) if outs is None or outs[i] is None
                           else _pieces(outs[i], keys[i], nbytes) if type(outs[i]) is list
                           else check_out(outs[i], keys[i], dt, shape)
                           for i, (_, _, nbytes, dt, shape) in enumerate(places)]
                for (staged, offset, nbytes, dt, shape), dst in zip(places, results):
                    if not nbytes:
                        continue
                    src = (c._staging if staged else c._arena)[offset:offset + nbytes]
                    if len(src) != nbytes:
                        raise P.ProtocolError(f"the daemon placed {nbytes} B at {offset}, past the mapped memory")
                    if type(dst) is list:  # a scatter list: consecutive byte ranges of the value, one per piece
                        at = 0
                        for piece in dst:
                            copy_bytes(memoryview(piece), memoryview(src[at:at + len(piece)]))
                            at += len(piece)
                    elif needs_staging(dst):
                        np.copyto(dst, src.view(dt).reshape(shape))
                    else:
                        copy_bytes(byte_view(dst), memoryview(src))
            finally:
                if token:
                    c._send(P.Op.UNPIN, P.U32.pack(token))
        if outs is None:
            return results
        for i, out in enumerate(outs):
            if type(out) is list:
                results[i] = out  # a scatter list's pieces are filled; the list is what the caller gave
        return finish_outs(outs, results)

    def lookup(self, keys: Sequence[Key]) -> int:
        """How many of ``keys``, from the first, are stored: one round trip."""
        (n,) = P.U32.unpack(self._keys_call(P.Op.LOOKUP, key_list(keys, "lookup")))
        return n

    def info(self, key: Key) -> Any:
        from ..info import KeyInfo

        d = json.loads(self._keys_call(P.Op.INFO, [check_key(key)]))
        dtype = _dtype(d["dtype"])
        return KeyInfo(dtype=dtype, shape=tuple(d["shape"]), nbytes=d["nbytes"], prefix=d["prefix"], digest=d["digest"],
                       tiers=tuple(d["tiers"]), shared_by=d["shared_by"])

    def keys(self) -> list[Key]:
        keys, _ = P.unpack_keys(self._keys_call(P.Op.KEYS, []))
        return keys

    def contains(self, key: Key) -> bool:
        return self._keys_call(P.Op.CONTAINS, [check_key(key)]) == b"\x01"

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, bytes)):
            return False
        return self.contains(key)

    def __len__(self) -> int:
        (n,) = P.U64.unpack(self._keys_call(P.Op.LEN, []))
        return n

    def stats(self) -> StoreStats:
        with self._client._lock:
            _, body = self._client._call(P.Op.STATS, self._prefix)
        return stats_from_dict(json.loads(body))

    def __repr__(self) -> str:
        return f"<ClientNamespace {self._name!r} of {self._client!r}>"


def _pieces(pieces: list[Any], key: Key, nbytes: int) -> list[np.ndarray]:
    """A scatter list's pieces as flat writable byte arrays (contiguous CPU arrays or tensors), which must
    add up to the value's size: the daemon's arena is copied straight into them, with no staging buffer (an
    engine's paged cache holds one block's layers in separate tensors)."""
    flat = []
    for p in pieces:
        if isinstance(p, np.ndarray):
            ok = p.flags.c_contiguous and p.flags.writeable
            view = p.reshape(-1).view(np.uint8) if ok else None
        elif is_tensor(p):
            ok = p.device.type == "cpu" and p.is_contiguous()
            view = p.view(-1).view(__import__("torch").uint8).numpy() if ok else None
        else:
            raise InvalidArgument(f"get({key!r}): a scatter list holds arrays or tensors, not {type(p).__name__}")
        if view is None:
            raise InvalidArgument(f"get({key!r}): a scatter list's pieces must be contiguous, writable CPU memory")
        flat.append(view)
    total = sum(len(v) for v in flat)
    if total != nbytes:
        raise InvalidArgument(f"get({key!r}): the scatter list holds {total} B; the value is {nbytes} B")
    return flat


def _expect(key: Key, out: Any) -> bytes:
    """What a get's ``out`` must match: nothing for ``None`` or a scatter list (checked by size), else its dtype
    and shape (refused here if it is not a writable array or tensor, as ``check_out`` would refuse it)."""
    if out is None or type(out) is list:
        return b"\x00"
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise InvalidArgument(f"get({key!r}): out is read-only")
        return b"\x01" + P.pack_meta(out.dtype, out.shape)
    if is_tensor(out):
        return b"\x01" + P.pack_meta(numpy_dtype(out.dtype), tuple(out.shape))
    raise InvalidArgument(f"get({key!r}): out must be a numpy array or torch tensor, not {type(out).__name__}")


def _dtype(text: str) -> np.dtype:
    from .. import catalog

    return catalog.decode_dtype(json.loads(text) if text.startswith("{") else text)


__all__ = ["Client", "ClientNamespace", "connect"]
