"""CascadeConfig and parse_size: sizes as strings, validation on every construction, env in one place."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cascade_kv.config import SEED_RULES, CascadeConfig, format_size, parse_size
from cascade_kv.errors import CascadeError, ConfigError

GiB = 1 << 30


# -- parse_size -------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("8GiB", 8 * GiB),
    ("512MB", 512 * 10**6),
    ("1.5 GiB", 3 * GiB // 2),
    ("4k", 4096),
    ("4K", 4096),
    ("4kb", 4000),
    ("4KiB", 4096),
    ("1G", GiB),
    ("1GB", 10**9),
    ("2T", 2 << 40),
    ("100", 100),
    ("100b", 100),
    ("  64 MiB  ", 64 << 20),
    ("0", 0),
    ("1.", 1),
    (123, 123),
    (0, 0),
])
def test_parse_size(value: int | str, expected: int):
    got = parse_size(value)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [
    "", " ", "GiB", "8 XB", "8GiBs", "abc", "1.2.3", "-1", "-1GiB", "1e9", ".5GiB", "8 G iB", "nan", "inf",
])
def test_parse_size_rejects_bad_strings(value: str):
    with pytest.raises(ConfigError) as info:
        parse_size(value, "host_capacity")
    assert isinstance(info.value, ValueError) and isinstance(info.value, CascadeError)
    assert "host_capacity" in str(info.value)  # the message names the setting


@pytest.mark.parametrize("value", [-1, -GiB])
def test_parse_size_rejects_negative(value: int):
    with pytest.raises(ConfigError):
        parse_size(value)


@pytest.mark.parametrize("value", [True, False, 1.5, None, [1], b"8GiB"])
def test_parse_size_rejects_other_types(value: object):
    with pytest.raises(ConfigError):
        parse_size(value)  # type: ignore[arg-type]


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(8 * GiB) == "8.0 GiB"
    assert format_size(5 << 50) == "5120.0 TiB"


# -- CascadeConfig ----------------------------------------------------------------------------
def test_defaults():
    cfg = CascadeConfig()
    assert cfg.host_capacity == GiB
    assert cfg.disk_path is None and cfg.disk_capacity is None and cfg.persist is False
    assert cfg.hash_algorithm == "blake3" and cfg.verify_reads == "auto" and cfg.promotion_threshold == 1
    assert cfg.replica_threshold == 3  # measured on the distributed store's own workloads (issue 13)
    assert cfg.eviction_order == "reuse"  # issue 13: fitted on other traces, never below LRU (docs/policy.md)
    seed = cfg.replace(**SEED_RULES)
    assert seed.eviction_order == "lru" and seed.promotion_threshold == 3  # the seed's rules stay one call away
    assert seed.replica_threshold == 3


def test_sizes_and_paths_are_normalised(tmp_path: Path):
    cfg = CascadeConfig(host_capacity="2GiB", disk_path=str(tmp_path), disk_capacity="10GB")
    assert cfg.host_capacity == 2 * GiB and cfg.disk_capacity == 10**10
    assert isinstance(cfg.disk_path, Path) and cfg.disk_path == tmp_path


@pytest.mark.parametrize("kwargs", [
    dict(persist=True),  # persist without disk_path
    dict(hash_algorithm="md5"),
    dict(hash_algorithm="BLAKE3"),
    dict(verify_reads="never"),
    dict(eviction_order="mru"),
    dict(eviction_order="LRU"),
    dict(promotion_threshold=0),
    dict(promotion_threshold=-1),
    dict(promotion_threshold=True),
    dict(promotion_threshold=2.0),
    dict(replica_threshold=0),
    dict(replica_threshold=False),
    dict(replica_threshold="3"),
    dict(host_capacity="lots"),
    dict(host_capacity=-1),
    dict(disk_capacity="1GiB"),  # a disk capacity without a disk
    dict(disk_path=""),
    dict(disk_path=42),
    dict(persist=1),
    dict(dedup_enabled="yes"),
    dict(o_direct=None),
])
def test_invalid_config_raises_config_error(kwargs: dict[str, object]):
    with pytest.raises(ConfigError) as info:
        CascadeConfig(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_persist_with_disk_path(tmp_path: Path):
    assert CascadeConfig(persist=True, disk_path=tmp_path).persist is True


def test_frozen():
    cfg = CascadeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.host_capacity = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.persist = True  # type: ignore[misc]
    assert cfg.host_capacity == GiB


def test_replace_validates_and_keeps_the_rest(tmp_path: Path):
    cfg = CascadeConfig(host_capacity="256MiB", disk_path=tmp_path)
    derived = cfg.replace(dedup_enabled=False, disk_capacity="1GiB")
    assert derived.dedup_enabled is False and derived.disk_capacity == GiB
    assert derived.host_capacity == 256 << 20 and derived.disk_path == tmp_path
    assert cfg.dedup_enabled is True and cfg.disk_capacity is None  # the original is unchanged
    with pytest.raises(ConfigError):
        cfg.replace(promotion_threshold=0)
    with pytest.raises(ConfigError):
        CascadeConfig().replace(persist=True)
    with pytest.raises(ConfigError):
        cfg.replace(host_capacity="a lot")


def test_equal_configs_compare_equal():
    assert CascadeConfig(host_capacity="1GiB") == CascadeConfig(host_capacity=GiB)


# -- from_env ---------------------------------------------------------------------------------
def test_from_env_reads_every_kind_of_field(tmp_path: Path):
    env = {
        "CASCADE_HOST_CAPACITY": "8GiB",
        "CASCADE_DISK_PATH": str(tmp_path),
        "CASCADE_DISK_CAPACITY": "100GB",
        "CASCADE_PERSIST": "yes",
        "CASCADE_DEDUP_ENABLED": "0",
        "CASCADE_SEMANTIC_EVICTION": "Off",
        "CASCADE_LOCALITY_AWARE": "TRUE",
        "CASCADE_O_DIRECT": "false",
        "CASCADE_PROMOTION_THRESHOLD": "5",
        "CASCADE_HASH_ALGORITHM": "sha256",
        "CASCADE_VERIFY_READS": "always",
        "CASCADE_EVICTION_ORDER": "reuse",
        "UNRELATED": "ignored",
        "CASCADE_NOT_A_FIELD": "ignored too",
    }
    cfg = CascadeConfig.from_env(env)
    assert cfg == CascadeConfig(host_capacity=8 * GiB, disk_path=tmp_path, disk_capacity=100 * 10**9,
                                persist=True, dedup_enabled=False, semantic_eviction=False,
                                locality_aware=True, o_direct=False, promotion_threshold=5,
                                hash_algorithm="sha256", verify_reads="always", eviction_order="reuse")


def test_from_env_empty_gives_defaults():
    assert CascadeConfig.from_env({}) == CascadeConfig()


def test_from_env_overrides_win(tmp_path: Path):
    env = {"CASCADE_HOST_CAPACITY": "8GiB", "CASCADE_PROMOTION_THRESHOLD": "5"}
    cfg = CascadeConfig.from_env(env, host_capacity="1MiB", disk_path=tmp_path)
    assert cfg.host_capacity == 1 << 20 and cfg.promotion_threshold == 5 and cfg.disk_path == tmp_path


def test_from_env_empty_disk_path_means_none():
    cfg = CascadeConfig.from_env({"CASCADE_DISK_PATH": "", "CASCADE_DISK_CAPACITY": ""})
    assert cfg.disk_path is None and cfg.disk_capacity is None


@pytest.mark.parametrize("env", [
    {"CASCADE_PERSIST": "maybe"},
    {"CASCADE_O_DIRECT": ""},
    {"CASCADE_PROMOTION_THRESHOLD": "three"},
    {"CASCADE_PROMOTION_THRESHOLD": "0"},
    {"CASCADE_REPLICA_THRESHOLD": "many"},
    {"CASCADE_HOST_CAPACITY": "big"},
    {"CASCADE_HASH_ALGORITHM": "crc32"},
    {"CASCADE_PERSIST": "1"},  # valid boolean, but persist needs a disk_path
])
def test_from_env_rejects_bad_values(env: dict[str, str]):
    with pytest.raises(ConfigError) as info:
        CascadeConfig.from_env(env)
    assert isinstance(info.value, ValueError)


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CASCADE_HOST_CAPACITY", "3MiB")
    assert CascadeConfig.from_env().host_capacity == 3 << 20


def test_group_access_defaults_to_owner_only_and_reads_from_env():
    assert CascadeConfig().group_access is False
    assert CascadeConfig.from_env({"CASCADE_GROUP_ACCESS": "yes"}).group_access is True
    with pytest.raises(ConfigError, match="group_access"):
        CascadeConfig(group_access="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CASCADE_GROUP_ACCESS"):
        CascadeConfig.from_env({"CASCADE_GROUP_ACCESS": "maybe"})
