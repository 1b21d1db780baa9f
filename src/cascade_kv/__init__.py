"""cascade-kv: a tiered, content-addressed KV-cache block store for LLM inference.

>>> from cascade_kv import CascadeConfig, Store
>>> with Store(CascadeConfig(host_capacity="64MiB")) as store:
...     store.put("sys_prompt_v1", kv, is_prefix=True)
...     out = store.get("sys_prompt_v1", np.empty_like(kv))

Across the ranks of an MPI job (``mpiexec -n 4 python app.py``), ``DistributedStore`` pools every rank's
memory into one cache with the same API (imported lazily: ``import cascade_kv`` does not initialise MPI).
"""
from .config import CascadeConfig, format_size, parse_size
from .errors import (BlockNotFound, CapacityError, CascadeError, ConfigError, IntegrityError, InternalError,
                     InvalidArgument, InvalidArgumentType, LaunchError, LaunchTimeout, PeerTimeout, RemoteError,
                     ServiceClosed, ServiceUnavailable, VersionMismatch, StorageError, StoreClosed, TierNotFound)
from .ids import BlockId, Digest, Key
from .persistence import RecoveryReport
from .stats import StoreStats, TierStats
from .info import KeyInfo
from .store import Store

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # DistributedStore imports mpi4py.MPI, which initialises MPI: only a program that asks for it pays for that
    if name == "DistributedStore":
        from .cluster.store import DistributedStore

        return DistributedStore
    if name == "connect":  # the client of cascade serve: its imports (sockets, metrics) only for those who use it
        from .service.client import connect

        return connect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CascadeConfig", "Store", "DistributedStore", "connect", "StoreStats", "TierStats", "KeyInfo", "RecoveryReport",
    "CascadeError", "ConfigError", "InvalidArgument", "InvalidArgumentType", "BlockNotFound", "TierNotFound", "CapacityError", "IntegrityError", "StorageError",
    "StoreClosed", "InternalError", "PeerTimeout", "RemoteError", "ServiceClosed", "ServiceUnavailable", "VersionMismatch", "LaunchError", "LaunchTimeout", "BlockId", "Digest", "Key", "parse_size", "format_size", "__version__",
]
