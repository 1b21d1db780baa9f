"""The daemon's metrics: a scrape of a real store says what ``store.stats()`` says, daemons don't share a
registry, a store that can't answer doesn't break the scrape, the endpoint frees its port, stats survive JSON."""
from __future__ import annotations

import io
import json
import logging
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from cascade_kv import Store
from cascade_kv.config import format_size
from cascade_kv.errors import BlockNotFound, InvalidArgument, InvalidArgumentType, StoreClosed
from cascade_kv.service.metrics import LATENCY_BUCKETS, STORE_METRICS, TIER_METRICS, ServiceMetrics
from cascade_kv.service.render import render_stats
from cascade_kv.stats import StoreStats, TierStats, stats_from_dict, stats_to_dict

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return parse(r.read())


def parse(text: bytes) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def sample_name(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """Two tiers (host, and an unlimited disk), with hits, a miss, dedup, a prefix key and demotions."""
    with Store(host_capacity="8MiB", disk_path=tmp_path / "disk") as s:
        rng = np.random.default_rng(0)
        values = [rng.integers(0, 256, size=1 << 20, dtype=np.uint8) for _ in range(10)]  # 10 MiB: demotes
        for i, v in enumerate(values):
            s.put(f"k{i}", v, is_prefix=i == 0)
        s.put("dup", values[3])
        for i in (0, 5, 9, 9):
            s.get(f"k{i}")
        with pytest.raises(BlockNotFound):
            s.get("absent")
        yield s


def test_scrape_over_http_matches_store_stats(store: Store) -> None:
    metrics = ServiceMetrics(store.stats)
    with metrics.serve_http(0) as server:
        samples = scrape(server.port)
    stats = store.stats()
    assert stats.demotions > 0 and stats.dedup_hits == 1 and stats.misses == 1 and len(stats.tiers) == 2
    assert samples[("cascade_stats_up", frozenset())] == 1
    for t in stats.tiers:
        for field, name, kind, _ in TIER_METRICS:
            key = (sample_name(name, kind), frozenset({("tier", t.name)}))
            if getattr(t, field) is None:  # the unlimited disk tier has no capacity sample
                assert key not in samples
            else:
                assert samples[key] == getattr(t, field), (t.name, field)
    for field, name, kind, _ in STORE_METRICS:
        assert samples[(sample_name(name, kind), frozenset())] == getattr(stats, field), field
    # the names a dashboard would use, spelled out once
    host = frozenset({("tier", "host")})
    assert samples[("cascade_tier_hits_total", host)] == stats.tier("host").hits
    assert samples[("cascade_tier_capacity_bytes", host)] == 8 << 20
    assert samples[("cascade_keys", frozenset())] == 11
    assert samples[("cascade_dedup_hits_total", frozenset())] == 1
    assert samples[("cascade_dedup_saved_bytes_total", frozenset())] == 1 << 20


def test_service_counters_and_histograms_are_exported(store: Store) -> None:
    metrics = ServiceMetrics(store.stats, rank=2)
    metrics.client_connected()
    metrics.client_connected()
    metrics.client_disconnected(dropped=True)
    metrics.protocol_error()
    metrics.observe_lookup(3e-5, nkeys=8, hits=6)
    metrics.observe_get(4e-4, nblocks=6, nbytes=6 << 20)
    metrics.observe_get(2.0, nblocks=1, nbytes=10)  # past the last bucket: +Inf
    metrics.observe_put(1e-3, nblocks=4, nbytes=4096, digest_only_blocks=3)
    samples = parse(metrics.exposition())
    rank = frozenset({("rank", "2")})
    expect = {"cascade_service_clients": 1, "cascade_service_connections_total": 2,
              "cascade_service_dropped_clients_total": 1, "cascade_service_protocol_errors_total": 1,
              "cascade_service_lookups_total": 1, "cascade_service_lookup_keys_total": 8,
              "cascade_service_lookup_hits_total": 6, "cascade_service_gets_total": 2,
              "cascade_service_get_blocks_total": 7, "cascade_service_get_bytes_total": (6 << 20) + 10,
              "cascade_service_puts_total": 1, "cascade_service_put_digest_only_blocks_total": 3,
              "cascade_service_get_seconds_count": 2, "cascade_service_get_seconds_sum": 2.0004,
              "cascade_keys": store.stats().keys, "cascade_stats_up": 1}
    for name, value in expect.items():
        assert samples[(name, rank)] == pytest.approx(value), name
    bucket = "cascade_service_get_seconds_bucket"
    assert samples[(bucket, rank | {("le", "0.0002")})] == 0
    assert samples[(bucket, rank | {("le", "0.0005")})] == 1
    assert samples[(bucket, rank | {("le", "1.0")})] == 1
    assert samples[(bucket, rank | {("le", "+Inf")})] == 2
    assert len([k for k in samples if k[0] == bucket]) == len(LATENCY_BUCKETS) + 1
    assert all(("rank", "2") in labels for _, labels in samples)  # every metric says which daemon


def test_snapshot_is_json_and_estimates_percentiles() -> None:
    metrics = ServiceMetrics(lambda: pytest.fail("snapshot must not ask the store"))
    assert metrics.snapshot()["latency"]["get"] == {"count": 0, "mean": None, "p50": None, "p99": None}
    for _ in range(98):
        metrics.observe_get(3e-5, 1, 1)  # bucket (2e-5, 5e-5]
    metrics.observe_get(0.3, 1, 1)  # bucket (0.2, 0.5]
    metrics.observe_get(0.4, 1, 1)
    metrics.observe_lookup(1e-4, 4, 1)
    snap = json.loads(json.dumps(metrics.snapshot()))
    get = snap["latency"]["get"]
    assert get["count"] == 100 and snap["gets"] == 100 and snap["rank"] is None
    assert 2e-5 < get["p50"] <= 5e-5
    assert 0.2 < get["p99"] <= 0.5
    assert get["mean"] == pytest.approx((98 * 3e-5 + 0.7) / 100)
    assert 5e-5 < snap["latency"]["lookup"]["p50"] <= 1e-4
    assert snap["lookups"] == 1 and snap["lookup_keys"] == 4 and snap["lookup_hits"] == 1


def test_two_daemons_in_one_process_keep_their_own_metrics(store: Store) -> None:
    a = ServiceMetrics(store.stats, rank=0)
    b = ServiceMetrics(store.stats, rank=1)
    a.observe_lookup(1e-5, 3, 3)
    with a.serve_http(0) as sa, b.serve_http(0) as sb:
        assert sa.port != sb.port
        got_a, got_b = scrape(sa.port), scrape(sb.port)
    assert got_a[("cascade_service_lookups_total", frozenset({("rank", "0")}))] == 1
    assert got_b[("cascade_service_lookups_total", frozenset({("rank", "1")}))] == 0
    assert not any(name.startswith("cascade") for name, _ in parse(prometheus_client.generate_latest()))


@pytest.mark.parametrize("error", [StoreClosed("store is closed"), RuntimeError("a bug")])
def test_a_failing_stats_fn_leaves_the_rest_of_the_scrape(error: Exception,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def stats() -> StoreStats:
        calls.append(1)
        raise error

    metrics = ServiceMetrics(stats)
    metrics.observe_get(1e-4, 1, 1)
    with caplog.at_level(logging.DEBUG, logger="cascade_kv.service.metrics"):
        samples = parse(metrics.exposition())
    assert calls == [1]  # once per scrape
    assert samples[("cascade_stats_up", frozenset())] == 0
    assert samples[("cascade_service_gets_total", frozenset())] == 1
    assert not any(name.startswith(("cascade_tier_", "cascade_keys")) for name, _ in samples)
    assert str(error) in caplog.text


def test_a_closed_store_is_scraped_as_down(tmp_path: Path) -> None:
    s = Store(host_capacity="8MiB")
    metrics = ServiceMetrics(s.stats)
    assert parse(metrics.exposition())[("cascade_stats_up", frozenset())] == 1
    s.close()
    assert parse(metrics.exposition())[("cascade_stats_up", frozenset())] == 0


def can_listen(port: int) -> bool:
    """Whether a server could listen on ``port`` now (SO_REUSEADDR, as servers do: the scrape's connection
    may linger in TIME_WAIT; only a listener holds the port against it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def no_store() -> StoreStats:
    raise StoreClosed("no store here")


def test_close_frees_the_port() -> None:
    metrics = ServiceMetrics(no_store)
    server = metrics.serve_http(0)
    port = server.port
    scrape(port)
    assert not can_listen(port)
    server.close()
    server.close()  # idempotent
    assert can_listen(port)
    with metrics.serve_http(port) as again:  # the same port, for a daemon that restarts its endpoint
        assert again.port == port
        assert ("cascade_service_gets_total", frozenset()) in scrape(port)


def test_serve_http_rejects_bad_ports() -> None:
    metrics = ServiceMetrics(lambda: pytest.fail("unused"))
    with pytest.raises(InvalidArgument):
        metrics.serve_http(70000)
    with pytest.raises(InvalidArgumentType):
        metrics.serve_http("9100")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        ServiceMetrics(lambda: pytest.fail("unused"), rank=-1)
    with pytest.raises(InvalidArgumentType):
        ServiceMetrics(None)  # type: ignore[arg-type]


tier_stats = st.builds(TierStats, name=st.text(max_size=8), capacity_bytes=st.none() | st.integers(0, 1 << 60))
store_stats = st.builds(StoreStats, tiers=st.lists(tier_stats, max_size=3).map(tuple),
                        open_seconds=st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=50, deadline=None)
@given(store_stats)
def test_stats_survive_json(stats: StoreStats) -> None:
    d = json.loads(json.dumps(stats_to_dict(stats)))
    assert stats_from_dict(d) == stats


def test_stats_round_trip_of_a_real_store(store: Store) -> None:
    stats = store.stats()
    assert stats_from_dict(json.loads(json.dumps(stats_to_dict(stats)))) == stats


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("keys"),
    lambda d: d.update(extra=1),
    lambda d: d.update(tiers=[{"name": "host"}]),
    lambda d: d.update(tiers=5),
])
def test_stats_from_a_bad_dict_raises(store: Store, damage) -> None:
    d = stats_to_dict(store.stats())
    damage(d)
    with pytest.raises(InvalidArgument):
        stats_from_dict(d)


def test_render_stats_shows_tiers_store_and_service(store: Store) -> None:
    stats = store.stats()
    metrics = ServiceMetrics(store.stats, rank=1)
    metrics.client_connected()
    metrics.observe_lookup(3e-5, 10, 7)
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(*render_stats(stats, metrics.snapshot()))
    text = console.export_text()
    host, disk = stats.tier("host"), stats.tier("disk")
    for needle in ("host", "disk", "unlimited", format_size(host.bytes_read), format_size(host.used_bytes),
                   format_size(disk.bytes_written), f"{stats.keys:,}", "dedup bytes saved", "integrity errors",
                   "rank 1", "70.0 %", "p99"):
        assert needle in text, needle
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(*render_stats(stats))  # no daemon: only the store's tables
    text = console.export_text()
    assert "host" in text and "p99" not in text
