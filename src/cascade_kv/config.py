"""The store's configuration: one frozen, typed, validated object.

Sizes are accepted as ints (bytes) or strings such as ``"8GiB"``, ``"512MB"``
or ``"1.5 GiB"`` and are normalised to ints when the config is built, so every
other module sees plain byte counts. Environment variables are read in one
place only, :meth:`CascadeConfig.from_env`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")

_FLAGS = ("persist", "dedup_enabled", "semantic_eviction", "locality_aware", "o_direct", "group_access")

HashAlgorithm = Literal["blake3", "sha256"]
VerifyMode = Literal["auto", "always"]
EvictionOrder = Literal["reuse", "lru"]


def parse_size(value: int | str, name: str = "size") -> int:
    """Return ``value`` in bytes; ``"8GiB"`` -> 8589934592, ``"1GB"`` -> 10**9.

    Bare ``K``/``M``/``G``/``T`` are binary units, as ``ulimit`` and SLURM use them.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: size must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ConfigError(f"{name}: cannot parse size {value!r} (try '512MiB' or '8GiB')")
        return int(float(m.group(1)) * _UNITS[unit])
    raise ConfigError(f"{name}: expected int or str size, got {type(value).__name__}")


def format_size(n: float) -> str:
    """Human-readable binary size, for messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class CascadeConfig:
    """Everything a :class:`~cascade_kv.Store` needs to know, validated on construction.

    The config is immutable; derive a variant with :meth:`replace`
    (``cfg.replace(dedup_enabled=False)``).
    """

    host_capacity: int | str = "1GiB"
    """Bytes of host DRAM in the arena (tier 2). Allocated and touched when the store opens."""

    disk_path: str | os.PathLike[str] | None = None
    """Directory of the disk tier (tier 5; Lustre ``$SCRATCH`` on a cluster). ``None``: memory only,
    and the host tier is the last tier (its eviction victims are dropped)."""

    disk_capacity: int | str | None = None
    """Bytes the disk tier may hold; ``None`` is unlimited. Only when it is full are blocks dropped."""

    persist: bool = False
    """Write every put through to disk (fsynced) before ``put`` returns, and journal the keys, so a
    store reopened on the same ``disk_path`` (after a clean close or a crash) finds them. Needs ``disk_path``."""

    dedup_enabled: bool = True
    """Content-addressed dedup: bytes already stored, under any key, are not stored again."""

    semantic_eviction: bool = True
    """Honour ``is_prefix=True``: protected blocks stay in memory while unprotected data can go instead.
    ``False`` makes eviction plain LRU (the prefix flag is recorded but ignored)."""

    eviction_order: EvictionOrder = "reuse"
    """Which unprotected copy leaves memory first. ``"reuse"`` (the default): least recently used, but a block
    read since it was stored ranks as if used a fraction of a tier's capacity of traffic later (a reused KV
    block is likely to be reused again): :class:`~cascade_kv.policy.ReuseCredit`, its constants fitted on other
    data than they are judged on; above plain LRU on the shipped Mooncake trace at 1/8, 1/4 and 1/2 of its
    distinct blocks (``docs/policy.md`` has every figure, misses included). ``"lru"``: the least recently used
    (the seed's rule, :data:`SEED_RULES`)."""

    locality_aware: bool = True
    """Promote blocks read often from a lower tier to the fastest tier with room."""

    promotion_threshold: int = 1
    """Reads from a lower tier after which a block is promoted. 1 (the default): a block read from disk comes
    back to memory at once, in the background, as a cache's miss would insert it (a KV prefix read once is
    likely read again; with 3, the seed's hot threshold, its next reads come from disk: 0.383 of the shipped
    trace's reads from memory against plain LRU's 0.444)."""

    replica_threshold: int = 3
    """In a :class:`~cascade_kv.cluster.store.DistributedStore`: reads of a block served by peers after which a
    rank keeps a replica in its own memory (with ``locality_aware``). 3 (the default, and the seed's), not the
    single store's promotion threshold of 1: on the distributed store's own workload (``cascade bench
    contention --ranks 2``) replicas bought nothing at either threshold (every variant served the same reads
    from the same tiers: under memory pressure a replica is the first victim, so replicas of a prefix read in
    turn displace each other before they are read), and a replica is a block's copy made on the reader's
    clock; three runs read 0.90, 0.87 and 0.71 GB/s at 1 against 1.03, 0.86 and 0.87 at 3. See
    ``docs/distributed-design.md``, replicas."""

    hash_algorithm: HashAlgorithm = "blake3"
    """Digest of a block's bytes: ``"blake3"`` (fast, multithreaded) or ``"sha256"`` (hashlib)."""

    verify_reads: VerifyMode = "auto"
    """How disk reads are checked against the digest. ``"auto"``: a file is hashed on its first read and
    again whenever its inode, size or ctime changed (any write through the file system changes them);
    ``"always"``: every read is hashed (about 3x slower on a page-cache hit)."""

    o_direct: bool = False
    """Read and write disk blocks with ``O_DIRECT`` (bypass the page cache; needs a file system that
    supports it)."""

    group_access: bool = False
    """Let the owner's group read the disk tier: files the store creates (block files, the journal,
    ``FORMAT``, ``LOCK``) are ``0640`` and its directories ``0750``. ``False``: owner only (``0600``/``0700``),
    since a block holds a prompt's KV and the journal every key name. Modes are set explicitly, whatever
    the umask; directories that already exist keep theirs."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, here
        set_(self, "host_capacity", parse_size(self.host_capacity, "host_capacity"))
        if self.disk_capacity is not None:
            set_(self, "disk_capacity", parse_size(self.disk_capacity, "disk_capacity"))
        if self.disk_path is not None:
            if not isinstance(self.disk_path, (str, os.PathLike)) or str(self.disk_path) == "":
                raise ConfigError(f"disk_path: expected a directory path, got {self.disk_path!r}")
            set_(self, "disk_path", Path(self.disk_path))
        for flag in _FLAGS:
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}: expected True or False, got {getattr(self, flag)!r}")
        if self.persist and self.disk_path is None:
            raise ConfigError("persist=True needs a disk_path to persist to")
        for name in _COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected an int >= 1, got {value!r}")
        if self.eviction_order not in ("reuse", "lru"):
            raise ConfigError(f"eviction_order: expected 'reuse' or 'lru', got {self.eviction_order!r}")
        if self.hash_algorithm not in ("blake3", "sha256"):
            raise ConfigError(f"hash_algorithm: expected 'blake3' or 'sha256', got {self.hash_algorithm!r}")
        if self.verify_reads not in ("auto", "always"):
            raise ConfigError(f"verify_reads: expected 'auto' or 'always', got {self.verify_reads!r}")
        if self.disk_capacity is not None and self.disk_path is None:
            raise ConfigError("disk_capacity is set but disk_path is not")

    def replace(self, **changes: object) -> "CascadeConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: os._Environ[str] | dict[str, str] | None = None, **overrides: object) -> "CascadeConfig":
        """Build a config from ``CASCADE_<FIELD>`` variables (e.g. ``CASCADE_HOST_CAPACITY=8GiB``),
        then apply ``overrides``. The only place the environment is read."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"CASCADE_{f.name.upper()}")
            if raw is None:
                continue
            if f.name in _FLAGS:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ConfigError(f"CASCADE_{f.name.upper()}: expected a boolean, got {raw!r}")
                kwargs[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.name in _COUNTS:
                try:
                    kwargs[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(f"CASCADE_{f.name.upper()}: expected an int, got {raw!r}") from None
            elif f.name in ("disk_path", "disk_capacity") and raw == "":
                kwargs[f.name] = None
            else:
                kwargs[f.name] = raw
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]


SEED_RULES: dict[str, object] = {"eviction_order": "lru", "promotion_threshold": 3, "replica_threshold": 3}
"""The seed's placement rules (LRU victims; promotion after 3 reads from a lower tier and a replica after 3
reads from peers, its hot threshold), the defaults before issue 13: ``CascadeConfig(**SEED_RULES)`` or
``cfg.replace(**SEED_RULES)``."""

_COUNTS = ("promotion_threshold", "replica_threshold")
"""The fields that are counts of reads: ints, at least 1."""

__all__ = ["CascadeConfig", "SEED_RULES", "parse_size", "format_size", "HashAlgorithm", "VerifyMode", "EvictionOrder"]
