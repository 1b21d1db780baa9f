"""Which rank is home to a digest or a key: the placement rule of the global directory.

Both rules are pure functions of the bytes and the communicator size, so every
rank computes the same home without asking anyone, in every process and every
run (Python's ``hash()`` was rejected: it is salted per process for ``str``
and ``bytes``).

A home is ``h mod size`` over 64 uniform bits. Consistent hashing (jump hash,
rings) was rejected: it only pays off when the set of ranks changes, and an MPI
communicator's size is fixed for its lifetime. The modulo bias over 64 bits is
below 2**-50 for any realistic size.
"""
from __future__ import annotations

import struct

import blake3

from ..arrays import check_key
from ..errors import InvalidArgument
from ..ids import DIGEST_SIZE, SpacedKey, StoreKey

# One byte ahead of the key's bytes says what they were, so "a" and b"a" (different keys,
# as in a dict) hash apart. The tag is a prefix of fixed length, so no two distinct
# (type, bytes) pairs can encode alike. A namespaced key is b"n" + u16 length + the
# namespace's UTF-8 + the user key's own encoding: length-prefixed, so ("a", "bc") and
# ("ab", "c") differ, and never equal to a default key's (whose first byte is s or b).
_STR_TAG = b"s"
_BYTES_TAG = b"b"
_SPACE_TAG = b"n"
_U16 = struct.Struct("<H")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"communicator size must be an int >= 1, got {size!r}")


def home_of_digest(digest: bytes, size: int) -> int:
    """Home rank of a block digest among ``size`` ranks.

    A digest is already uniform, so its first 8 bytes are used as they are (no second
    hash); a :class:`~cascade_kv.ids.BlockId` therefore has the same home as its digest.
    """
    _check_size(size)
    if not isinstance(digest, (bytes, bytearray, memoryview)):
        raise TypeError(f"digest must be bytes, not {type(digest).__name__}")
    if len(digest) < DIGEST_SIZE:
        raise ValueError(f"digest must be at least {DIGEST_SIZE} bytes, got {len(digest)}")
    return int.from_bytes(bytes(digest[:8]), "little") % size


def encode_key(key: StoreKey) -> bytes:
    """The type-tagged bytes of a key (what its home is hashed from, and what the directory sends)."""
    if isinstance(key, SpacedKey):
        name = key.space.encode("utf-8", "surrogatepass")
        if len(name) > 0xFFFF:
            raise InvalidArgument(f"namespace name of {len(name)} B is too long (64 KiB at most)")
        return _SPACE_TAG + _U16.pack(len(name)) + name + encode_key(check_key(key.key))
    check_key(key)
    return _STR_TAG + key.encode("utf-8", "surrogatepass") if isinstance(key, str) else _BYTES_TAG + key


def decode_key(raw: bytes) -> StoreKey:
    """Inverse of :func:`encode_key`; ValueError for bytes that are not one."""
    tag, body = raw[:1], raw[1:]
    if tag == _STR_TAG:
        return body.decode("utf-8", "surrogatepass")
    if tag == _BYTES_TAG:
        return body
    if tag == _SPACE_TAG and len(body) >= 2:
        n = _U16.unpack_from(body)[0]
        name, inner = body[2:2 + n], body[2 + n:]
        if len(name) == n and n and inner[:1] in (_STR_TAG, _BYTES_TAG):
            return SpacedKey(name.decode("utf-8", "surrogatepass"), decode_key(inner))  # type: ignore[arg-type]
    raise ValueError(f"not an encoded key: {raw[:40]!r}")


def home_of_key(key: StoreKey, size: int) -> int:
    """Home rank of a key among ``size`` ranks: BLAKE3 of the type-tagged key (a namespaced key's includes
    its namespace, so one user's keys spread over the ranks like anyone's)."""
    _check_size(size)
    return home_of_encoded(encode_key(key), size)


def home_of_encoded(raw: bytes, size: int) -> int:
    """:func:`home_of_key` of the key whose :func:`encode_key` is ``raw``: the directory encodes a key once
    and takes both its home and its wire form from those bytes (the receiver checks the home the same way,
    without decoding and encoding again)."""
    return int.from_bytes(blake3.blake3(raw).digest(length=8), "little") % size


__all__ = ["decode_key", "encode_key", "home_of_digest", "home_of_encoded", "home_of_key"]
