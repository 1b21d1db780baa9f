"""Typed identities, so raw bytes cannot be passed where a digest is meant."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NewType, Union

Digest = NewType("Digest", bytes)
"""Cryptographic digest of a block's bytes (32 bytes for BLAKE3 and SHA-256)."""

BlockId = NewType("BlockId", bytes)
"""Identity of a stored block. With dedup on it *is* the digest, so equal bytes share one block;
with dedup off it is the digest followed by an 8-byte serial, so every put is stored apart."""

Key = Union[str, bytes]
"""A user's key. ``"a"`` and ``b"a"`` are different keys, as in a dict."""

DIGEST_SIZE = 32
TAG_SIZE = 8
"""Bytes after the digest in a block id: a namespace's tag, or a dedup-off serial (see ``block_name``)."""


@dataclass(frozen=True, slots=True)
class SpacedKey:
    """A key of a named namespace, as the store keys its tables (:meth:`Store.namespace`).

    Callers can only pass ``str``/``bytes`` keys, so no caller can forge one of these, and one never
    equals a default-namespace key or a key of another namespace. A prefix string (``"ns/key"``) was
    rejected: a default-namespace user could pass the same string and reach the namespace's key."""

    space: str
    key: Key

    def __repr__(self) -> str:  # error messages name the user's key and the namespace it was looked up in
        return f"{self.key!r} in namespace {self.space!r}"


StoreKey = Union[Key, SpacedKey]
"""A key as the store's tables hold it: a user key of the default namespace, or a :class:`SpacedKey`."""


def digest_of(block_id: BlockId) -> Digest:
    """The digest part of a block id (what its bytes must hash to)."""
    return Digest(block_id[:DIGEST_SIZE])


def block_name(block_id: BlockId) -> str:
    """Stable printable name of a block, used for file names and messages."""
    name = block_id[:DIGEST_SIZE].hex()
    if len(block_id) > DIGEST_SIZE:
        name += "-" + block_id[DIGEST_SIZE:].hex()
    return name


def parse_block_name(name: str) -> BlockId:
    """Inverse of :func:`block_name`; raises ``ValueError`` for a name that is not one."""
    digest_hex, _, serial_hex = name.partition("-")
    raw = bytes.fromhex(digest_hex)
    if len(raw) != DIGEST_SIZE:
        raise ValueError(f"not a block name: {name!r}")
    if serial_hex:
        serial = bytes.fromhex(serial_hex)
        if len(serial) != TAG_SIZE:
            raise ValueError(f"not a block name: {name!r}")
        raw += serial
    return BlockId(raw)
