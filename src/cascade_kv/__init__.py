"""cascade-kv: a tiered, content-addressed KV-cache block store for LLM inference.

>>> from cascade_kv import CascadeConfig, Store
>>> with Store(CascadeConfig(host_capacity="64MiB")) as store:
...     store.put("sys_prompt_v1", kv, is_prefix=True)
...     out = store.get("sys_prompt_v1", np.empty_like(kv))
"""
from .config import CascadeConfig, format_size, parse_size
from .errors import (BlockNotFound, CapacityError, CascadeError, ConfigError, IntegrityError, StorageError,
                     StoreClosed)
from .ids import BlockId, Digest, Key
from .stats import StoreStats, TierStats
from .store import KeyInfo, Store

__version__ = "0.1.0"

__all__ = [
    "CascadeConfig", "Store", "StoreStats", "TierStats", "KeyInfo",
    "CascadeError", "ConfigError", "BlockNotFound", "CapacityError", "IntegrityError", "StorageError",
    "StoreClosed", "BlockId", "Digest", "Key", "parse_size", "format_size", "__version__",
]
