"""The daemon's metrics: what it records on its hot path, what a Prometheus scrape sees, what ``cascade stats`` shows.

The hot path bumps plain integers under one lock, not prometheus_client's ``Counter``/``Histogram`` objects:
those take a lock per metric, so a get that moves four numbers would pay four; here it pays one, and
:meth:`ServiceMetrics.snapshot` reads the very numbers a scrape exports. Each :class:`ServiceMetrics` owns its
registry (never prometheus_client's global one), so two daemons in one process never collide.
"""
from __future__ import annotations

import logging
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ..errors import CascadeError, InvalidArgument, InvalidArgumentType
from ..stats import StoreStats

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)
"""Upper bounds (seconds) of the latency histograms: 1-2-5 steps from 10 us (a small lookup) to 1 s (a large
get from disk); slower requests fall in ``+Inf``."""

COUNTER, GAUGE = "counter", "gauge"

TIER_METRICS: tuple[tuple[str, str, str, str], ...] = (
    # (TierStats field, metric name, kind, help); every sample carries a ``tier`` label
    ("hits", "cascade_tier_hits", COUNTER, "Gets served from this tier."),
    ("misses", "cascade_tier_misses", COUNTER, "Gets that found no copy in this tier and were served by a slower one."),
    ("bytes_read", "cascade_tier_read_bytes", COUNTER, "Bytes copied from this tier to callers."),
    ("bytes_written", "cascade_tier_written_bytes", COUNTER, "Bytes written into this tier (puts, demotions, promotions)."),
    ("evictions", "cascade_tier_evictions", COUNTER, "Copies removed from this tier to make room."),
    ("blocks", "cascade_tier_blocks", GAUGE, "Blocks with a copy in this tier."),
    ("used_bytes", "cascade_tier_used_bytes", GAUGE, "Bytes allocated in this tier."),
    ("capacity_bytes", "cascade_tier_capacity_bytes", GAUGE, "Capacity of this tier (absent when unlimited)."),
)
"""How each tier's :class:`~cascade_kv.stats.TierStats` is exported (a counter's samples end in ``_total``)."""

STORE_METRICS: tuple[tuple[str, str, str, str], ...] = (
    # (StoreStats field, metric name, kind, help)
    ("keys", "cascade_keys", GAUGE, "Keys stored."),
    ("blocks", "cascade_blocks", GAUGE, "Distinct blocks stored."),
    ("logical_bytes", "cascade_logical_bytes", GAUGE, "Sum of the sizes of all keys' values, as if nothing were shared."),
    ("unique_bytes", "cascade_unique_bytes", GAUGE, "Sum of the sizes of distinct blocks."),
    ("protected_blocks", "cascade_protected_blocks", GAUGE, "Blocks referred to by at least one prefix key."),
    ("protected_in_memory", "cascade_protected_in_memory_blocks", GAUGE, "Protected blocks with a copy in memory."),
    ("puts", "cascade_puts", COUNTER, "Puts."),
    ("gets", "cascade_gets", COUNTER, "Gets."),
    ("misses", "cascade_misses", COUNTER, "Gets of keys that were not in the store."),
    ("deletes", "cascade_deletes", COUNTER, "Deletes."),
    ("dedup_hits", "cascade_dedup_hits", COUNTER, "Puts whose bytes were already stored."),
    ("dedup_bytes_saved", "cascade_dedup_saved_bytes", COUNTER, "Bytes not stored again thanks to dedup."),
    ("demotions", "cascade_demotions", COUNTER, "Copies moved down a tier to make room."),
    ("promotions", "cascade_promotions", COUNTER, "Copies made in a faster tier for blocks read often."),
    ("drops", "cascade_drops", COUNTER, "Blocks that lost their last copy because the last tier was full."),
    ("dropped_bytes", "cascade_dropped_bytes", COUNTER, "Bytes of the dropped blocks."),
    ("integrity_errors", "cascade_integrity_errors", COUNTER, "Copies that failed their digest or size check."),
    ("quarantined", "cascade_quarantined", COUNTER, "Bad copies moved aside to quarantine/."),
    ("bytes_sent", "cascade_sent_bytes", COUNTER, "Bytes this rank's memory gave to other ranks."),
    ("bytes_received", "cascade_received_bytes", COUNTER, "Bytes that reached this rank from other ranks' memory."),
    ("ranks", "cascade_ranks", GAUGE, "Ranks whose counters these are."),
    ("open_seconds", "cascade_open_seconds", GAUGE, "Seconds the store took to open."),
)
"""How the store-wide fields of :class:`~cascade_kv.stats.StoreStats` are exported."""

_SERVICE_COUNTERS = (
    # (_Counts field, metric name, help)
    ("gets", "cascade_service_gets", "Get requests served."),
    ("get_blocks", "cascade_service_get_blocks", "Blocks returned by get requests."),
    ("get_bytes", "cascade_service_get_bytes", "Bytes returned by get requests."),
    ("lookups", "cascade_service_lookups", "Lookup requests served."),
    ("lookup_keys", "cascade_service_lookup_keys", "Keys asked about by lookup requests."),
    ("lookup_hits", "cascade_service_lookup_hits", "Keys that lookup requests found."),
    ("puts", "cascade_service_puts", "Put requests served."),
    ("put_blocks", "cascade_service_put_blocks", "Blocks offered by put requests."),
    ("put_bytes", "cascade_service_put_bytes", "Bytes offered by put requests."),
    ("put_digest_only_blocks", "cascade_service_put_digest_only_blocks",
     "Put blocks the store already held, acknowledged from their digest alone (no bytes copied)."),
    ("connections", "cascade_service_connections", "Clients that connected."),
    ("dropped_clients", "cascade_service_dropped_clients", "Clients the daemon dropped for a protocol error."),
    ("protocol_errors", "cascade_service_protocol_errors", "Malformed or unexpected messages received."),
)


@dataclass(slots=True)
class _Counts:
    """The service's own counters, under :attr:`ServiceMetrics._lock`."""

    gets: int = 0
    get_blocks: int = 0
    get_bytes: int = 0
    lookups: int = 0
    lookup_keys: int = 0
    lookup_hits: int = 0
    puts: int = 0
    put_blocks: int = 0
    put_bytes: int = 0
    put_digest_only_blocks: int = 0
    clients: int = 0  # connected now (a level, not a counter)
    connections: int = 0
    dropped_clients: int = 0
    protocol_errors: int = 0


class _Latency:
    """A histogram over :data:`LATENCY_BUCKETS`: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # bucket i holds bounds[i-1] < s <= bounds[i]
        self.sum += seconds


def _quantile(q: float, counts: list[int]) -> float | None:
    """The ``q``-quantile of a histogram, interpolated linearly inside its bucket as Prometheus'
    ``histogram_quantile`` does (so it is as coarse as the buckets: within a 1-2-5 step); the largest finite
    bound when it falls in ``+Inf``; ``None`` without samples."""
    total = sum(counts)
    if total == 0:
        return None
    rank, below = q * total, 0
    for i, n in enumerate(counts):
        if below + n >= rank and n:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - below) / n
        below += n
    raise AssertionError("unreachable: the last non-empty bucket reaches the total")


def _family(kind: str, name: str, doc: str, const: dict[str, str],
            rows: list[tuple[dict[str, str], float]]) -> Metric:
    """One metric family: a sample per ``(labels, value)`` row, each also carrying the ``const`` labels."""
    names = [*const, *(rows[0][0] if rows else ())]
    family = (CounterMetricFamily if kind == COUNTER else GaugeMetricFamily)(name, doc, labels=names)
    for labels, value in rows:
        family.add_metric([*const.values(), *labels.values()], value)
    return family


class _StoreCollector(Collector):
    """Exports the store's :class:`StoreStats`, asked for once per scrape."""

    def __init__(self, stats_fn: Callable[[], StoreStats], const: dict[str, str]) -> None:
        self._stats_fn = stats_fn
        self._const = const

    def collect(self) -> Iterator[Metric]:
        try:
            stats: StoreStats | None = self._stats_fn()
        except CascadeError as e:  # the store closed under the daemon, a peer that timed out: expected
            log.debug("metrics scrape without store stats: %s", e)
            stats = None
        except Exception:  # a bug: the scrape still serves the service's metrics, the log says why the store's are gone
            log.warning("metrics scrape without store stats", exc_info=True)
            stats = None
        yield _family(GAUGE, "cascade_stats_up", "1 if the store answered this scrape's stats call, else 0.",
                      self._const, [({}, 0 if stats is None else 1)])
        if stats is None:
            return
        for field, name, kind, doc in TIER_METRICS:
            rows = [({"tier": t.name}, getattr(t, field)) for t in stats.tiers if getattr(t, field) is not None]
            yield _family(kind, name, doc, self._const, rows)
        for field, name, kind, doc in STORE_METRICS:
            yield _family(kind, name, doc, self._const, [({}, getattr(stats, field))])


class _ServiceCollector(Collector):
    """Exports the daemon's own counters and latency histograms."""

    def __init__(self, metrics: ServiceMetrics, const: dict[str, str]) -> None:
        self._metrics = metrics
        self._const = const

    def collect(self) -> Iterator[Metric]:
        counts, latency = self._metrics._copy()
        for field, name, doc in _SERVICE_COUNTERS:
            yield _family(COUNTER, name, doc, self._const, [({}, getattr(counts, field))])
        yield _family(GAUGE, "cascade_service_clients", "Clients connected now.", self._const, [({}, counts.clients)])
        for op, (buckets, total) in latency.items():
            family = HistogramMetricFamily(f"cascade_service_{op}_seconds", f"Latency of {op} requests.",
                                           labels=list(self._const))
            cumulative, acc = [], 0
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), buckets):
                acc += n
                cumulative.append((bound, acc))
            family.add_metric(list(self._const.values()), cumulative, total)
            yield family


class MetricsServer:
    """A running HTTP ``/metrics`` endpoint (see :meth:`ServiceMetrics.serve_http`); a context manager."""

    def __init__(self, httpd: ThreadingWSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port
        """The port it listens on (the one the OS picked when asked for port 0)."""

    def close(self) -> None:
        """Stop serving and free the port. Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()  # returns once serve_forever's loop has ended
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a line on stderr per scrape is noise; the daemon logs what matters


class ServiceMetrics:
    """The daemon's metrics: its own request counters and latencies, and the store's :class:`StoreStats`
    (``stats_fn()``, called once per scrape). ``rank``, when given, labels every metric (one daemon per
    rank on a node shares one Prometheus job). Recording methods are safe from any thread."""

    def __init__(self, stats_fn: Callable[[], StoreStats], *, rank: int | None = None) -> None:
        if not callable(stats_fn):
            raise InvalidArgumentType(f"stats_fn must be callable, got {type(stats_fn).__name__}")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
            raise InvalidArgumentType(f"rank must be an int or None, got {type(rank).__name__}")
        if rank is not None and rank < 0:
            raise InvalidArgument(f"rank must be >= 0, got {rank}")
        self.rank = rank
        self._lock = threading.Lock()
        self._c = _Counts()
        self._get, self._lookup, self._put = _Latency(), _Latency(), _Latency()
        const = {} if rank is None else {"rank": str(rank)}
        self.registry = CollectorRegistry()
        """This daemon's registry (a scrape of it sees only this daemon)."""
        self.registry.register(_ServiceCollector(self, const))
        self.registry.register(_StoreCollector(stats_fn, const))

    # ------------------------------------------------------------------ hot path: count, never log
    def observe_get(self, seconds: float, nblocks: int, nbytes: int) -> None:
        with self._lock:
            self._get.observe(seconds)
            c = self._c
            c.gets += 1
            c.get_blocks += nblocks
            c.get_bytes += nbytes

    def observe_lookup(self, seconds: float, nkeys: int, hits: int) -> None:
        with self._lock:
            self._lookup.observe(seconds)
            c = self._c
            c.lookups += 1
            c.lookup_keys += nkeys
            c.lookup_hits += hits

    def observe_put(self, seconds: float, nblocks: int, nbytes: int, digest_only_blocks: int) -> None:
        with self._lock:
            self._put.observe(seconds)
            c = self._c
            c.puts += 1
            c.put_blocks += nblocks
            c.put_bytes += nbytes
            c.put_digest_only_blocks += digest_only_blocks

    def client_connected(self) -> None:
        with self._lock:
            self._c.clients += 1
            self._c.connections += 1

    def client_disconnected(self, dropped: bool) -> None:
        """A client left; ``dropped``: the daemon dropped it for a protocol error."""
        with self._lock:
            self._c.clients -= 1
            self._c.dropped_clients += bool(dropped)

    def protocol_error(self) -> None:
        with self._lock:
            self._c.protocol_errors += 1

    # ------------------------------------------------------------------ reading
    def _copy(self) -> tuple[_Counts, dict[str, tuple[list[int], float]]]:
        """A consistent copy of the counters and histograms, taken under the lock."""
        with self._lock:
            latency = {op: (list(h.counts), h.sum)
                       for op, h in (("get", self._get), ("lookup", self._lookup), ("put", self._put))}
            return _Counts(**asdict(self._c)), latency

    def snapshot(self) -> dict[str, object]:
        """The service's counters and, per operation, its request count, mean and p50/p99 latency in seconds
        (``None`` before the first request), as JSON types (what ``cascade stats`` shows). Percentiles are
        estimated from the histogram buckets, as Prometheus would, and cover the daemon's whole life."""
        counts, latency = self._copy()
        out: dict[str, object] = {"rank": self.rank, **asdict(counts)}
        out["latency"] = {op: {"count": sum(buckets), "mean": total / sum(buckets) if sum(buckets) else None,
                               "p50": _quantile(0.50, buckets), "p99": _quantile(0.99, buckets)}
                          for op, (buckets, total) in latency.items()}
        return out

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what a scrape of :meth:`serve_http` returns)."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve the metrics over HTTP on ``addr:port`` (port 0: a free one, see ``.port``) from a daemon
        thread, until ``.close()``. Loopback by default: metrics are for the node's Prometheus agent, not the
        world. A port in use raises ``OSError``."""
        if not isinstance(port, int) or isinstance(port, bool):
            raise InvalidArgumentType(f"port must be an int, got {type(port).__name__}")
        if not 0 <= port <= 65535:
            raise InvalidArgument(f"port must be in 0..65535, got {port}")
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]  # "::1" needs AF_INET6

        class Server(ThreadingWSGIServer):
            address_family = family  # a class attribute: the socket is made in __init__

        httpd = make_server(addr, port, make_wsgi_app(self.registry), Server, handler_class=_QuietHandler)
        # prometheus_client's start_http_server polls for shutdown every 0.5 s; 50 ms makes close() prompt
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"cascade-metrics:{httpd.server_port}", daemon=True)
        thread.start()
        return MetricsServer(httpd, thread)
