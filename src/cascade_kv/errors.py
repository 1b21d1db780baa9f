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


class InvalidArgument(CascadeError, ValueError):
    """An argument has the right type but a value the call cannot take: lengths that do not match, an
    ``out`` buffer of the wrong dtype or shape or read-only, demoting a protected key."""


class InvalidArgumentType(CascadeError, TypeError):
    """An argument has the wrong type: a key that is not ``str``/``bytes``, a value with no bytes to store
    (``None``, a ``str``, an object array), an ``out`` that is not a numpy array."""


class BlockNotFound(CascadeError, KeyError):
    """The key is not in the store (never written, deleted, or dropped)."""

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message
        return str(self.args[0]) if self.args else "block not found"


class TierNotFound(CascadeError, KeyError):
    """No tier has the name asked for (``StoreStats.tier``); the message lists the tiers there are."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "tier not found"


class CapacityError(CascadeError, MemoryError):
    """A block cannot be placed: no tier it may live in has room for it."""


class IntegrityError(CascadeError, ValueError):
    """A stored copy does not match its digest (corrupted or truncated)."""


class StorageError(CascadeError, OSError):
    """A tier's backing storage failed (disk full, read-only, I/O error)."""


class InternalError(CascadeError, RuntimeError):
    """An invariant of cascade-kv itself broke: a bug in cascade-kv, please report it (with the message). Raised
    instead of going on with state that would hand back wrong bytes or corrupt the store."""


class StoreClosed(CascadeError, RuntimeError):
    """The store was used after :meth:`Store.close`."""


class PeerTimeout(CascadeError, TimeoutError):
    """Another rank did not answer within the configured timeout (the message names the rank)."""


class RemoteError(CascadeError, RuntimeError):
    """A handler on ``rank`` raised (or no handler was registered for ``op``) while serving a call."""

    def __init__(self, rank: int, op: int, remote_type: str, remote_message: str) -> None:
        super().__init__(f"rank {rank}: op {op} failed: {remote_type}: {remote_message}")
        self.rank = rank
        self.op = op
        self.remote_type = remote_type
        """Name of the exception type raised on ``rank`` (e.g. ``"KeyError"``)."""
        self.remote_message = remote_message

    def __reduce__(self) -> tuple[object, ...]:  # pickled across ranks: rebuild from the fields, not the message
        return (type(self), (self.rank, self.op, self.remote_type, self.remote_message))


class ServiceClosed(CascadeError, RuntimeError):
    """A service was used after it closed: a rank's directory service (the store is closing or closed), or a
    node daemon's connection (the daemon stopped or died, or the client closed it)."""


class ServiceUnavailable(CascadeError, ConnectionError):
    """No node daemon answers at the socket path (the message names it and how to start one)."""


class VersionMismatch(CascadeError, RuntimeError):
    """A client and a node daemon of different versions: refused, with both versions named."""


class LaunchError(CascadeError, RuntimeError):
    """Ranks could not be started: no ``mpiexec``, or a launcher variable that makes no sense."""


class LaunchTimeout(LaunchError, TimeoutError):
    """``mpiexec`` and its ranks ran past their time limit and were killed; carries the output so far."""

    def __init__(self, message: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr
