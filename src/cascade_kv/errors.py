"""One error family for cascade-kv.

Every error derives from :class:`CascadeError` *and* from the builtin a caller
would already catch for the same situation, so ``except KeyError`` keeps
working for a missing key and ``except OSError`` for a failing disk.
Messages carry the numbers (sizes, paths, ranks) that explain the failure.
"""
from __future__ import annotations


class CascadeError(Exception):
    """Base class of every error raised by cascade-kv."""


class ConfigError(CascadeError, ValueError):
    """A configuration value is invalid (raised when the config is built)."""


class BlockNotFound(CascadeError, KeyError):
    """The key is not in the store (never written, deleted, or dropped)."""

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message
        return str(self.args[0]) if self.args else "block not found"


class CapacityError(CascadeError, MemoryError):
    """A block cannot be placed: no tier it may live in has room for it."""


class IntegrityError(CascadeError, ValueError):
    """A stored copy does not match its digest (corrupted or truncated)."""


class StorageError(CascadeError, OSError):
    """A tier's backing storage failed (disk full, read-only, I/O error)."""


class StoreClosed(CascadeError, RuntimeError):
    """The store was used after :meth:`Store.close`."""


class PeerTimeout(CascadeError, TimeoutError):
    """Another rank did not answer within the configured timeout (the message names the rank)."""
