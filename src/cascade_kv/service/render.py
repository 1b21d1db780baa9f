"""What ``cascade stats`` prints: the store's :class:`StoreStats` and the daemon's snapshot as rich tables."""
from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table

from ..config import format_size
from ..stats import StoreStats


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def format_seconds(s: float | None) -> str:
    """A latency in the unit that keeps it short (``"-"`` for none)."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _tiers(stats: StoreStats) -> Table:
    table = Table(title="Tiers", title_justify="left")
    for name in ("tier", "hits", "hit %", "misses", "read", "written", "evictions", "blocks", "used", "capacity"):
        table.add_column(name, justify="left" if name == "tier" else "right")
    for t in stats.tiers:
        table.add_row(t.name, f"{t.hits:,}", _percent(t.hits, t.hits + t.misses), f"{t.misses:,}",
                      format_size(t.bytes_read), format_size(t.bytes_written), f"{t.evictions:,}", f"{t.blocks:,}",
                      format_size(t.used_bytes),
                      "unlimited" if t.capacity_bytes is None else format_size(t.capacity_bytes))
    return table


def _two_columns(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def _summary(s: StoreStats) -> Table:
    return _two_columns("Store", [
        ("keys", f"{s.keys:,}"),
        ("blocks", f"{s.blocks:,}"),
        ("logical / unique", f"{format_size(s.logical_bytes)} / {format_size(s.unique_bytes)}"),
        ("protected blocks (in memory)", f"{s.protected_blocks:,} ({s.protected_in_memory:,})"),
        ("puts / gets / misses", f"{s.puts:,} / {s.gets:,} / {s.misses:,}"),
        ("dedup hits", f"{s.dedup_hits:,}"),
        ("dedup bytes saved", format_size(s.dedup_bytes_saved)),
        ("promotions", f"{s.promotions:,}"),
        ("demotions", f"{s.demotions:,}"),
        ("drops", f"{s.drops:,} ({format_size(s.dropped_bytes)})"),
        ("integrity errors", f"{s.integrity_errors:,}"),
    ])


def _service(sv: Mapping[str, object]) -> list[Table]:
    n: Mapping[str, int] = sv  # type: ignore[assignment]  # every field but rank and latency is an int
    rank = sv.get("rank")
    service = _two_columns("Service" if rank is None else f"Service (rank {rank})", [
        ("clients (connections, dropped)", f"{n['clients']:,} ({n['connections']:,}, {n['dropped_clients']:,})"),
        ("protocol errors", f"{n['protocol_errors']:,}"),
        ("lookups (keys, hit %)",
         f"{n['lookups']:,} ({n['lookup_keys']:,}, {_percent(n['lookup_hits'], n['lookup_keys'])})"),
        ("gets (blocks, bytes)", f"{n['gets']:,} ({n['get_blocks']:,}, {format_size(n['get_bytes'])})"),
        ("puts (blocks, bytes)", f"{n['puts']:,} ({n['put_blocks']:,}, {format_size(n['put_bytes'])})"),
        ("put blocks by digest only", f"{n['put_digest_only_blocks']:,}"),
    ])
    latency = Table(title="Latency (estimated from histogram buckets)", title_justify="left")
    for name in ("request", "count", "mean", "p50", "p99"):
        latency.add_column(name, justify="left" if name == "request" else "right")
    for op, h in sv["latency"].items():  # type: ignore[union-attr]
        latency.add_row(op, f"{h['count']:,}", format_seconds(h["mean"]), format_seconds(h["p50"]),
                        format_seconds(h["p99"]))
    return [service, latency]


def render_stats(stats: StoreStats, service: Mapping[str, object] | None = None) -> list[Table]:
    """The tables ``cascade stats`` prints (``console.print(*render_stats(...))``): the tiers, the store, and
    with ``service`` (a :meth:`ServiceMetrics.snapshot`) the daemon's requests and latencies."""
    tables = [_tiers(stats), _summary(stats)]
    if service is not None:
        tables += _service(service)
    return tables
