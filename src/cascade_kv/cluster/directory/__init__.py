"""The global directory: which rank holds which block, and which digest each key names.

Every rank is home to a share of the digests (:func:`~..homes.home_of_digest`) and of the keys
(:func:`~..homes.home_of_key`); ``docs/distributed-design.md`` ("Directory protocol") walks through the
rules. One job per module:

- :mod:`.records`: the value types (locations, key records, the homes' answers) and the dtype text.
- :mod:`.state`: :class:`DirectoryState`, one rank's share as a state machine (no MPI, unit-tested alone).
- :mod:`.codec`: the wire format of records and answers (no pickle).
- :mod:`.rpc`: :class:`Directory`, the client every rank calls and the server of its share.

Importing the package, its records or its state starts no MPI: :mod:`.rpc` imports the service, hence
``mpi4py.MPI``, which initialises MPI when imported, so its names (``Directory``, the ``OP_*`` numbers) are
loaded on first use. The state machine and the records are used, and unit-tested, without MPI.
"""
from typing import TYPE_CHECKING

from .records import (DEFAULT_LEASE_S, LOCATION, TIER_DISK, TIER_MEMORY, Claim, ClaimStatus, CopyStatus, HomeStats,
                      KeyRecord, LoadStatus, Located, Location, Released, dtype_of, dtype_text, space_tag)
from .state import DirectoryState

if TYPE_CHECKING:
    from .rpc import (OP_BIND, OP_BOUND, OP_CLAIM, OP_DROP_COPY, OP_FORGET, OP_KEYS, OP_LOAD, OP_LOCATE, OP_LOOKUP,
                      OP_MOVE, OP_PROTECT, OP_PUBLISH, OP_SET_PREFIX, OP_SPACE_PROTECTED, OP_UNBIND, OP_UNREF, OPS,
                      Directory)

_RPC_NAMES = frozenset({"OP_BIND", "OP_BOUND", "OP_CLAIM", "OP_DROP_COPY", "OP_FORGET", "OP_KEYS", "OP_LOAD",
                        "OP_LOCATE", "OP_LOOKUP", "OP_MOVE", "OP_PROTECT", "OP_PUBLISH", "OP_SET_PREFIX",
                        "OP_SPACE_PROTECTED", "OP_UNBIND", "OP_UNREF", "OPS", "Directory"})


def __getattr__(name: str) -> object:
    if name in _RPC_NAMES:
        from . import rpc

        return getattr(rpc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_LEASE_S", "LOCATION", "OPS", "OP_BIND", "OP_BOUND", "OP_CLAIM", "OP_DROP_COPY", "OP_FORGET",
           "OP_KEYS", "OP_LOAD", "OP_LOCATE", "OP_LOOKUP", "OP_MOVE", "OP_PROTECT", "OP_PUBLISH", "OP_SET_PREFIX",
           "OP_SPACE_PROTECTED", "OP_UNBIND", "OP_UNREF", "TIER_DISK", "TIER_MEMORY", "Claim", "ClaimStatus",
           "CopyStatus", "Directory", "DirectoryState", "HomeStats", "KeyRecord", "LoadStatus", "Located", "Location",
           "Released", "dtype_of", "dtype_text", "space_tag"]
