"""The directory's wire codec: records as fixed structs plus length-prefixed bytes, no pickle.

Every op takes a *batch*: ``u32 count`` then ``count`` records, and answers with ``count`` results in
order (:mod:`.rpc`). digest = ``u8 len`` + bytes; key = ``u32 len`` + the type-tagged key (``b"s"`` +
UTF-8 or ``b"b"`` + raw; a namespaced key ``b"n"`` + u16 length + namespace + one of those:
``homes.encode_key``); location = :data:`~.records.LOCATION`; locations = ``u32 count`` + locations;
array metadata = ``u8 len`` + numpy :func:`~.records.dtype_text` (``u16 len`` + ASCII), ``u8 ndim`` +
``ndim`` little-endian u64 dims.
"""
from __future__ import annotations

import functools
import struct
from collections.abc import Iterable

from ...errors import InvalidArgument
from ...ids import Digest, StoreKey
from ..homes import decode_key, encode_key
from .records import LOCATION, KeyRecord, LoadStatus, Located, Location

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_CLAIM_REQ = struct.Struct("<QB")  # nbytes, prefix; after the digest
_STATUS_REPLY = struct.Struct("<BiII")  # status, pending rank (-1 unless PENDING), protected, refs; then locations
_UNREF_REPLY = struct.Struct("<BB")  # freed, unprotected; then locations


@functools.lru_cache(maxsize=64)
def _dims(ndim: int) -> struct.Struct:
    """The struct of ``ndim`` little-endian u64 dims (built once per rank: a record decodes one per key)."""
    return struct.Struct(f"<{ndim}Q")


class _Reader:
    """Reads records off a payload in order; raises ValueError on a short or overlong payload."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf, self.pos = memoryview(buf), 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"payload of {len(self.buf)} B ends inside a record (at {self.pos} + {n})")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple:
        pos, end = self.pos, self.pos + s.size
        if end > len(self.buf):
            raise ValueError(f"payload of {len(self.buf)} B ends inside a record (at {pos} + {s.size})")
        self.pos = end
        return s.unpack_from(self.buf, pos)  # no intermediate bytes: lookups decode a dozen fields each

    def u8(self) -> int:
        pos = self.pos
        if pos >= len(self.buf):
            raise ValueError(f"payload of {len(self.buf)} B ends inside a record (at {pos} + 1)")
        self.pos = pos + 1
        return self.buf[pos]

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def digest(self) -> bytes:
        return self.take(self.u8())

    def key(self) -> StoreKey:
        return decode_key(self.take(self.u32()))

    def location(self) -> Location:
        return Location(*self.unpack(LOCATION))

    def locations(self) -> tuple[Location, ...]:
        return tuple(self.location() for _ in range(self.u32()))

    def record(self) -> KeyRecord:
        digest = Digest(self.digest())
        dtype = self.take(self.unpack(_U16)[0]).decode("ascii")
        ndim = self.u8()
        shape = self.unpack(_dims(ndim)) if ndim else ()
        return KeyRecord(digest, dtype, shape, bool(self.u8()))

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ValueError(f"payload has {len(self.buf) - self.pos} B after its last record")


def _digest(digest: bytes) -> bytes:
    if not isinstance(digest, (bytes, bytearray)) or not 0 < len(digest) < 256:
        raise ValueError(f"digest must be 1..255 bytes, got {digest!r:.80}")
    return _U8.pack(len(digest)) + digest


def _key(key: StoreKey) -> bytes:
    raw = encode_key(key)
    return _U32.pack(len(raw)) + raw


def _locations(locations: Iterable[Location]) -> bytes:
    locations = list(locations)
    return _U32.pack(len(locations)) + b"".join(loc.pack() for loc in locations)


def _record(record: KeyRecord) -> bytes:
    dtype = record.dtype.encode("ascii")
    if len(dtype) > 65535 or len(record.shape) > 255:
        raise InvalidArgument(f"dtype {record.dtype!r} or shape {record.shape} too long to encode")
    return (_digest(record.digest) + _U16.pack(len(dtype)) + dtype + _U8.pack(len(record.shape))
            + b"".join(_U64.pack(d) for d in record.shape) + _U8.pack(record.prefix))


def _located(x: Located) -> bytes:
    return _STATUS_REPLY.pack(x.status, x.pending_rank, x.protected, x.refs) + _locations(x.locations)


def _read_located(r: _Reader) -> Located:
    status, pending, protected, refs = r.unpack(_STATUS_REPLY)
    return Located(r.locations(), protected, LoadStatus(status), pending, refs)


# A reply's record travels with its length, so the reader can take its bytes at once and decode each distinct
# record once (a lookup answers the same records over and over: a prompt's prefix blocks, read by every
# request that shares them); the home encodes each distinct record once. Both caches are bounded by entries
# (a record is ~100 B, so 64k of them ~10 MB) and hold values only, never what the directory decides on.
_RECORD_CACHE = 1 << 16


@functools.lru_cache(maxsize=_RECORD_CACHE)
def _record_reply(record: KeyRecord) -> bytes:
    body = _record(record)
    return b"\x01" + _U16.pack(len(body)) + body


@functools.lru_cache(maxsize=_RECORD_CACHE)
def _record_of(body: bytes) -> KeyRecord:
    r = _Reader(body)
    record = r.record()
    r.done()
    return record


def _optional_record(record: KeyRecord | None) -> bytes:
    return b"\x00" if record is None else _record_reply(record)


def _read_optional_record(r: _Reader) -> KeyRecord | None:
    if not r.u8():
        return None
    return _record_of(r.take(r.unpack(_U16)[0]))


__all__ = ["_Reader"]
