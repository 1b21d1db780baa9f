"""The node daemon's wire protocol: fixed-size binary frames over a Unix stream socket.

Every message is a 12-byte header (magic, op, status, body length) and a body. Block bytes never
cross the socket: a get's answer names where each block lies (the daemon's arena, which the client
maps read-only, or the connection's staging area for blocks read from a slower tier), and a put
that needs bytes is answered with where in the staging area to write them. Bodies of the hot calls
(get, put, lookup, unpin) are packed with :mod:`struct`; keys travel as length-prefixed bytes. The
rare calls' answers (``info``, ``stats``) are JSON: they carry nested values and cost a round trip
anyway. Pickle is never used: a daemon must not run code a client sends.

The two memory areas are passed once, as file descriptors (``SCM_RIGHTS``) on the answer to
``HELLO``: memfds, so nothing is left in ``/dev/shm`` however the daemon ends. The staging area
grows with ``ftruncate`` on the same descriptor; an answer says its size, and the client maps
again when it has grown.
"""
from __future__ import annotations

import enum
import json
import socket
import struct
from collections.abc import Sequence

import numpy as np

from .. import catalog
from ..errors import CascadeError, InvalidArgument, ServiceClosed
from ..ids import Key

PROTOCOL_VERSION = 1
MAGIC = b"CKVd"
HEADER = struct.Struct("<4sHHI")  # magic, op, status, body length
MAX_REQUEST = 256 << 20
"""Largest request body a daemon reads; a bigger length is garbage (a client that is not ours) and
the daemon drops the connection instead of allocating it."""
MAX_REPLY = 1 << 31
"""Largest answer a client reads (``keys()`` of millions of keys stays far below)."""


class Op(enum.IntEnum):
    HELLO = 1
    GET = 2
    UNPIN = 3  # no answer: sent after the client's copies, before its next call
    PUT = 4
    PUT_DATA = 5  # the bytes a PUT asked for are in the staging area: commit
    PUT_ABORT = 6  # no answer: the client gave up on a PUT that asked for bytes
    LOOKUP = 7
    DELETE = 8
    PROTECT = 9
    UNPROTECT = 10
    DEMOTE = 11
    INFO = 12
    KEYS = 13
    LEN = 14
    CONTAINS = 15
    STATS = 16
    NAMESPACE = 17
    SETTLE = 18
    SERVICE_STATS = 19
    CONFIG = 20  # the daemon store's config and what it does of the contract's optional parts (JSON)


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1  # body: exception class name, NUL, message
    NEED_BYTES = 2  # PUT: write the listed items' bytes into staging, then PUT_DATA


class Where(enum.IntEnum):
    ARENA = 0
    STAGING = 1


U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
HELLO_REQ = struct.Struct("<HI")  # protocol version, client pid; then the package version (utf-8)
HELLO_REP = struct.Struct("<HQQB")  # protocol version, arena size, staging size, hash id; then the version
GET_ITEM = struct.Struct("<BQQ")  # where, offset, nbytes; then dtype and shape (see pack_meta)
PUT_ITEM = struct.Struct("<B32s")  # is_prefix, digest; then dtype and shape
HASHES = ("blake3", "sha256")


# ---------------------------------------------------------------------------------------------- keys
# Two layouts: token-prefix keys are bytes of one length, sent as one run (a 64-key lookup is then one
# slice per key to decode); anything else key by key, with its type (``"a"`` and ``b"a"`` differ).
_KEYS_FIXED = 1
_KEYS_MIXED = 2
_KEYS_HEAD = struct.Struct("<BII")  # layout, count, fixed length (0 for mixed)
_KEY_HEAD = struct.Struct("<BI")  # 0 str / 1 bytes, length


def pack_keys(keys: Sequence[Key]) -> bytes:
    n = len(keys)
    if n and type(keys[0]) is bytes and keys[0]:
        width = len(keys[0])
        if set(map(len, keys)) == {width} and set(map(type, keys)) == {bytes}:  # C-speed scans, not a genexpr
            return _KEYS_HEAD.pack(_KEYS_FIXED, n, width) + b"".join(keys)  # type: ignore[arg-type]
    parts = [_KEYS_HEAD.pack(_KEYS_MIXED, n, 0)]
    for k in keys:
        raw = k.encode("utf-8", "surrogatepass") if isinstance(k, str) else k
        parts.append(_KEY_HEAD.pack(isinstance(k, bytes), len(raw)))
        parts.append(raw)
    return b"".join(parts)


def unpack_keys(buf: memoryview | bytes, off: int = 0) -> tuple[list[Key], int]:
    """Keys packed by :func:`pack_keys` at ``off``, and the offset after them. ProtocolError on garbage."""
    try:
        layout, n, width = _KEYS_HEAD.unpack_from(buf, off)
        off += _KEYS_HEAD.size
        if layout == _KEYS_FIXED:
            end = off + n * width
            if end > len(buf):
                raise ProtocolError("keys run past the message")
            raw = bytes(buf[off:end])
            return [raw[i:i + width] for i in range(0, n * width, width)], end
        if layout != _KEYS_MIXED:
            raise ProtocolError(f"unknown key layout {layout}")
        keys: list[Key] = []
        for _ in range(n):
            is_bytes, length = _KEY_HEAD.unpack_from(buf, off)
            off += _KEY_HEAD.size
            raw = bytes(buf[off:off + length])
            if len(raw) != length:
                raise ProtocolError("a key runs past the message")
            off += length
            keys.append(raw if is_bytes else raw.decode("utf-8", "surrogatepass"))
        return keys, off
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"bad key list: {e}") from None


# ---------------------------------------------------------------------------------------------- dtype and shape
_META = struct.Struct("<HB")  # dtype text length, ndim; then the text and ndim u64 dimensions
_dtype_cache: dict[bytes, np.dtype] = {}  # the few dtypes a client uses, decoded once


def dtype_text(dt: np.dtype) -> bytes:
    enc = catalog.encode_dtype(dt)  # the lossless codec the journal uses: titles, metadata (bfloat16 tags)...
    return (enc if isinstance(enc, str) else json.dumps(enc, separators=(",", ":"))).encode()


def pack_meta(dt: np.dtype, shape: tuple[int, ...], text: bytes | None = None) -> bytes:
    text = dtype_text(dt) if text is None else text
    return _META.pack(len(text), len(shape)) + text + struct.pack(f"<{len(shape)}Q", *shape)


def unpack_meta(buf: memoryview | bytes, off: int) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        tlen, ndim = _META.unpack_from(buf, off)
        off += _META.size
        text = bytes(buf[off:off + tlen])
        off += tlen
        dt = _dtype_cache.get(text)
        if dt is None:
            dt = catalog.decode_dtype(text.decode() if text[:1] != b"{" else json.loads(text))
            if len(_dtype_cache) < 1024:
                _dtype_cache[text] = dt
        shape = struct.unpack_from(f"<{ndim}Q", buf, off)
        return dt, shape, off + 8 * ndim
    except (struct.error, ValueError, TypeError, KeyError) as e:
        raise ProtocolError(f"bad dtype or shape: {e}") from None


# ---------------------------------------------------------------------------------------------- errors
class ProtocolError(CascadeError, ValueError):
    """A message that does not follow this protocol (the daemon drops the connection that sent it)."""


def pack_error(e: BaseException) -> bytes:
    return type(e).__name__.encode() + b"\0" + str(e).encode("utf-8", "replace")


def raise_error(body: bytes) -> None:
    """Raise the daemon's exception on the client's side, as the same class when it is one of ours."""
    from .. import errors

    name, _, message = body.partition(b"\0")
    text = message.decode("utf-8", "replace")
    cls = getattr(errors, name.decode("ascii", "replace"), None)
    if not (isinstance(cls, type) and issubclass(cls, CascadeError)):
        cls = _BUILTIN_ERRORS.get(name.decode("ascii", "replace"), errors.RemoteError)
    if cls is errors.RemoteError:
        raise errors.RemoteError(-1, 0, name.decode("ascii", "replace"), text)
    if cls is ProtocolError:
        raise ProtocolError(text)
    raise cls(text)


# a daemon's bug surfaces as the builtin a caller can catch, but still in the family
class _RemoteValueError(CascadeError, ValueError):
    pass


class _RemoteTypeError(CascadeError, TypeError):
    pass


class _RemoteKeyError(CascadeError, KeyError):
    pass


_BUILTIN_ERRORS: dict[str, type[CascadeError]] = {"ValueError": _RemoteValueError, "TypeError": _RemoteTypeError,
                                                  "KeyError": _RemoteKeyError, "ProtocolError": ProtocolError}


# ---------------------------------------------------------------------------------------------- framing
def frame(op: int, body: bytes = b"", status: int = Status.OK) -> bytes:
    return HEADER.pack(MAGIC, op, status, len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes from ``sock``; ServiceClosed when the peer closed the connection first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ServiceClosed("connection closed by the other side")
        got += k
    return buf


def read_header(head: bytes | bytearray, limit: int) -> tuple[int, int, int]:
    """``(op, status, body length)`` of a header; ProtocolError for anything that is not ours."""
    magic, op, status, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a cascade-kv client or daemon")
    if length > limit:
        raise ProtocolError(f"message of {length} B is over the limit of {limit} B")
    return op, status, length


def check_count(n: int, what: str, limit: int = 1 << 24) -> int:
    if n > limit:
        raise InvalidArgument(f"{what}: {n} items in one call (at most {limit})")
    return n
