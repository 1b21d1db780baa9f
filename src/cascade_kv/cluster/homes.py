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

import blake3

from ..arrays import check_key
from ..ids import DIGEST_SIZE, Key

# One byte ahead of the key's bytes says what they were, so "a" and b"a" (different keys,
# as in a dict) hash apart. The tag is a prefix of fixed length, so no two distinct
# (type, bytes) pairs can encode alike.
_STR_TAG = b"s"
_BYTES_TAG = b"b"


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


def home_of_key(key: Key, size: int) -> int:
    """Home rank of a user key among ``size`` ranks: BLAKE3 of the type-tagged key."""
    _check_size(size)
    check_key(key)
    encoded = _STR_TAG + key.encode("utf-8", "surrogatepass") if isinstance(key, str) else _BYTES_TAG + key
    return int.from_bytes(blake3.blake3(encoded).digest(length=8), "little") % size


__all__ = ["home_of_digest", "home_of_key"]
