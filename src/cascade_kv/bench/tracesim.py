"""Offline replay of a trace's block reads against a cache of ``capacity`` blocks: LRU, Belady, candidates.

The model is the one ``cascade bench trace`` measures on the real store, minus the bytes: requests in
timestamp order, each reading its ``hash_ids`` in order; a cached block is a hit, any other is a miss
and is inserted (the request computed it). Pure Python over the ids, so a comparison of every policy at
three capacities runs in seconds, and the store's policy can be designed here before it is built there.

Each online policy sees, per read, only what a serving engine knows at that moment (:class:`Read`):
the block, how many earlier requests read it, whether the trace's prefix rule marks it ``is_prefix``,
and whether it is its request's last (partial) block. :func:`belady` alone sees the future.

Run ``python -m cascade_kv.bench.tracesim [--trace PATH]`` for the table (any trace in the Mooncake format).
The store's reuse credit is fitted on some traces and judged on others by :mod:`~cascade_kv.bench.tracefit`.
"""
from __future__ import annotations

import argparse
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Protocol

from ..policy import ReuseCredit as StoreCredit
from .trace import DEFAULT_TRACE, Request, Trace, load_trace, prefix_lengths


class Read(NamedTuple):
    """One block read of the replay and what an online policy may know about it."""

    block: int
    uses: int  # earlier requests that read this block (0: its first use)
    prefix: bool  # ``is_prefix`` under :func:`~cascade_kv.bench.trace.prefix_lengths`
    last: bool  # the request's last block: its partial, request-specific tail
    hinted: bool = False  # the request carries the caller's reuse hint (see :func:`reads_of`)


@dataclass(frozen=True, slots=True)
class Reads:
    """A trace flattened into reads; request ``i`` is ``reads[starts[i]:starts[i + 1]]``."""

    reads: tuple[Read, ...]
    starts: tuple[int, ...]
    distinct: int  # distinct blocks


def reads_of(trace: Trace, hint: Callable[[Request], bool] | None = None) -> Reads:
    """The trace's reads in replay order. ``hint``, if given, marks requests whose new blocks the caller
    expects to be reused (an engine-side prediction the block store could be told)."""
    uses: dict[int, int] = {}
    reads: list[Read] = []
    starts = [0]
    for req, k in zip(trace.requests, prefix_lengths(trace)):
        n = len(req.hash_ids)
        hinted = bool(hint and hint(req))
        for j, h in enumerate(req.hash_ids):
            reads.append(Read(h, uses.get(h, 0), j < k, j == n - 1, hinted))
        for h in set(req.hash_ids):
            uses[h] = uses.get(h, 0) + 1
        starts.append(len(reads))
    return Reads(tuple(reads), tuple(starts), len(uses))


@dataclass(frozen=True, slots=True)
class SimResult:
    reads: int
    hits: int  # reads served from the cache
    prefix_hits: int  # hits before the request's first miss: the KV a request can actually reuse

    @property
    def hit_rate(self) -> float:
        return self.hits / self.reads if self.reads else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.reads if self.reads else 0.0


class Policy(Protocol):
    """A cache of at most ``capacity`` blocks."""

    def access(self, r: Read) -> bool:
        """Read ``r.block``: True on a hit; on a miss insert it (all but the marked-prefix variant of
        :class:`ProtectedLRU` do), evicting as the policy chooses."""
        ...


def simulate(reads: Reads, policy: Policy) -> SimResult:
    """Replay every read through ``policy``, counting hits and the hits of each request's intact prefix."""
    access = policy.access
    hits = prefix_hits = 0
    rs, starts = reads.reads, reads.starts
    for i in range(len(starts) - 1):
        intact = True
        for r in rs[starts[i]:starts[i + 1]]:
            if access(r):
                hits += 1
                prefix_hits += intact
            else:
                intact = False
    return SimResult(len(rs), hits, prefix_hits)


def belady(reads: Reads, capacity: int) -> SimResult:
    """Belady's MIN: on a miss with the cache full, drop whichever of the cached blocks and the new one is
    next read furthest in the future (never read again counts as furthest). Optimal for hit count with
    equal-sized blocks, also against policies that skip inserting a block."""
    rs = reads.reads
    never = len(rs)
    nxt = [never] * len(rs)
    last: dict[int, int] = {}
    for i in range(len(rs) - 1, -1, -1):
        b = rs[i].block
        nxt[i] = last.get(b, never)
        last[b] = i
    cached: dict[int, int] = {}  # block -> position of its next read
    heap: list[tuple[int, int]] = []  # (-next read, block), lazily invalidated: an entry counts while it matches
    hits = prefix_hits = 0
    starts = reads.starts
    for q in range(len(starts) - 1):
        intact = True
        for i in range(starts[q], starts[q + 1]):
            b, n = rs[i].block, nxt[i]
            if b in cached:
                hits += 1
                prefix_hits += intact
            else:
                intact = False
                if capacity <= 0:
                    continue
                if len(cached) >= capacity:
                    while -heap[0][0] != cached.get(heap[0][1]):
                        heapq.heappop(heap)
                    if n >= -heap[0][0]:
                        continue  # the new block is the one read furthest ahead: do not keep it
                    del cached[heapq.heappop(heap)[1]]
            cached[b] = n
            heapq.heappush(heap, (-n, b))
    return SimResult(len(rs), hits, prefix_hits)


# ---------------------------------------------------------------------------------- online policies
class LRU:
    """Plain least-recently-used: what the store does with semantic eviction off."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[int, None] = OrderedDict()

    def access(self, r: Read) -> bool:
        lru = self._lru
        if r.block in lru:
            lru.move_to_end(r.block)
            return True
        if self.capacity > 0:
            if len(lru) >= self.capacity:
                lru.popitem(last=False)
            lru[r.block] = None
        return False


class ProtectedLRU:
    """Unbounded protection: a block read as ``is_prefix`` is protected and never evicted while an
    unprotected block remains (an LRU list each).

    When every cached block is protected, ``bypass=False`` evicts the least recent protected one;
    ``bypass=True`` keeps the new block out instead, which is what the store's ``Policy`` does
    when every block is put with ``is_prefix=True`` (it never offers a protected copy as a victim, so the
    block lands in a lower tier). With the trace's prefix rule that fills memory with the first protected
    blocks for good."""

    def __init__(self, capacity: int, bypass: bool = False) -> None:
        self.capacity = capacity
        self.bypass = bypass
        self._plain: OrderedDict[int, None] = OrderedDict()
        self._protected: OrderedDict[int, None] = OrderedDict()

    def access(self, r: Read) -> bool:
        b = r.block
        hit = b in self._plain or b in self._protected
        self._plain.pop(b, None)
        self._protected.pop(b, None)
        if not hit:
            if self.capacity <= 0:
                return False
            if len(self._plain) + len(self._protected) >= self.capacity:
                if self._plain:
                    self._plain.popitem(last=False)
                elif self.bypass:
                    return False
                else:
                    self._protected.popitem(last=False)
        (self._protected if r.prefix else self._plain)[b] = None
        return hit


class SegmentedLRU:
    """Segmented LRU with the protected segment capped at ``protected_fraction`` of the capacity.

    A block read as ``is_prefix`` goes to the protected segment; when that segment is over its cap, its
    least recent block moves to the most recent end of the probation segment (it keeps one more chance).
    Misses evict from probation first. Because ``is_prefix`` follows the trace's history, a prefix block
    evicted and read again goes straight back to the protected segment: no ghost list is needed."""

    def __init__(self, capacity: int, protected_fraction: float = 0.9) -> None:
        if not 0 <= protected_fraction <= 1:
            raise ValueError(f"protected_fraction must be in [0, 1], got {protected_fraction}")
        self.capacity = capacity
        self.protected_cap = int(capacity * protected_fraction)
        self._probation: OrderedDict[int, None] = OrderedDict()
        self._protected: OrderedDict[int, None] = OrderedDict()

    def access(self, r: Read) -> bool:
        b, prob, prot = r.block, self._probation, self._protected
        hit = b in prob or b in prot
        prob.pop(b, None)
        prot.pop(b, None)
        if not hit:
            if self.capacity <= 0:
                return False
            if len(prob) + len(prot) >= self.capacity:
                (prob or prot).popitem(last=False)
        if r.prefix:
            prot[b] = None
            while len(prot) > self.protected_cap:
                prob[prot.popitem(last=False)[0]] = None
        else:
            prob[b] = None
        return hit


class S3FIFO:
    """S3-FIFO (Yang et al., SOSP 2023): a small FIFO (10 %) filters one-hit blocks, a main FIFO with
    2-bit frequency reinsertion keeps the rest, a ghost FIFO of evicted ids readmits straight to main."""

    def __init__(self, capacity: int, small_fraction: float = 0.1) -> None:
        self.capacity = capacity
        self.small_cap = max(1, int(capacity * small_fraction))
        self._small: OrderedDict[int, None] = OrderedDict()
        self._main: OrderedDict[int, None] = OrderedDict()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._freq: dict[int, int] = {}

    def _evict_main(self) -> None:
        main, freq = self._main, self._freq
        while True:
            b = main.popitem(last=False)[0]
            if freq[b]:
                freq[b] -= 1
                main[b] = None
            else:
                del freq[b]
                return

    def _evict_small(self) -> None:
        small, freq = self._small, self._freq
        while small:
            b = small.popitem(last=False)[0]
            if freq[b]:  # read again while in the small queue
                freq[b] = 0
                self._main[b] = None
                if len(self._main) > self.capacity - self.small_cap:
                    self._evict_main()
            else:
                del freq[b]
                self._ghost[b] = None
                if len(self._ghost) > self.capacity:
                    self._ghost.popitem(last=False)
                return

    def access(self, r: Read) -> bool:
        b, freq = r.block, self._freq
        if b in freq:
            freq[b] = min(freq[b] + 1, 3)
            return True
        if self.capacity <= 0:
            return False
        while len(self._small) + len(self._main) >= self.capacity:
            if len(self._small) >= self.small_cap or not self._main:
                self._evict_small()
            else:
                self._evict_main()
        freq[b] = 0
        if b in self._ghost:
            del self._ghost[b]
            self._main[b] = None
        else:
            self._small[b] = None
        return False


class ARC:
    """Adaptive Replacement Cache (Megiddo and Modha, FAST 2003): recency and frequency lists whose split
    adapts to hits in the ghost lists of each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.p = 0.0  # target size of t1
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def _replace(self, in_b2: bool) -> None:
        t1 = self.t1
        if t1 and (len(t1) > self.p or (in_b2 and len(t1) == self.p) or not self.t2):
            self.b1[t1.popitem(last=False)[0]] = None
        else:
            self.b2[self.t2.popitem(last=False)[0]] = None

    def access(self, r: Read) -> bool:
        b, c = r.block, self.capacity
        t1, t2, b1, b2 = self.t1, self.t2, self.b1, self.b2
        if b in t1:
            del t1[b]
            t2[b] = None
            return True
        if b in t2:
            t2.move_to_end(b)
            return True
        if c <= 0:
            return False
        if b in b1:
            self.p = min(c, self.p + max(len(b2) / len(b1), 1))
            self._replace(False)
            del b1[b]
            t2[b] = None
            return False
        if b in b2:
            self.p = max(0.0, self.p - max(len(b1) / len(b2), 1))
            self._replace(True)
            del b2[b]
            t2[b] = None
            return False
        if len(t1) + len(b1) >= c:
            if len(t1) < c:
                b1.popitem(last=False)
                self._replace(False)
            else:
                t1.popitem(last=False)
        elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
            if len(t1) + len(t2) + len(b1) + len(b2) >= 2 * c:
                b2.popitem(last=False)
            self._replace(False)
        t1[b] = None
        return False


_STORE = StoreCredit()


class ReuseCredit:
    """LRU in which a block's recency is credited according to what is known of its reuse.

    Each cached block has a priority ``last read + credit``, time counted in block reads, credits in
    units of ``capacity`` reads; the lowest priority is evicted. Credits by class:

    - ``first``: first use (no earlier request read it); ``tail`` instead, if given, when it is its
      request's last block (partial and request-specific: 5 % of them are read again on the Mooncake
      trace, against 45 % of other first-use blocks);
    - ``second``: read by exactly one earlier request (its first reuse);
    - ``later``: read by two or more;
    - ``hinted``: if given, a first-use block of a request the caller hinted as likely to be continued.

    The defaults are the store's (:class:`~cascade_kv.policy.ReuseCredit`), fitted by
    :func:`~cascade_kv.bench.tracefit.fit` on other data than the scores that judge them.

    Within a class priority follows recency, so each class is one LRU list and a victim is the least
    of the list heads: O(classes) per eviction, no heap. With ``second == later`` it needs only the
    ``is_prefix`` flag (a prefix block is one read before), i.e. the store's two lists.
    """

    def __init__(self, capacity: int, *, first: float = _STORE.never_read,
                 second: float = _STORE.read_once, later: float = _STORE.read_twice_or_more,
                 tail: float | None = None, hinted: float | None = None) -> None:
        self.capacity = capacity
        self._credit = {"first": first, "tail": first if tail is None else tail, "second": second,
                        "later": later, "hinted": first if hinted is None else hinted}
        self._steps = {k: int(v * capacity) for k, v in self._credit.items()}
        self._lists: dict[str, OrderedDict[int, int]] = {k: OrderedDict() for k in self._credit}
        self._where: dict[int, str] = {}
        self._clock = 0

    def _class(self, r: Read) -> str:
        if r.uses >= 2:
            return "later"
        if r.uses == 1:
            return "second"
        return "tail" if r.last else "hinted" if r.hinted else "first"

    def access(self, r: Read) -> bool:
        self._clock += 1
        b, where = r.block, self._where
        hit = b in where
        if hit:
            del self._lists[where[b]][b]
        elif self.capacity <= 0:
            return False
        elif len(where) >= self.capacity:
            victim, vlist, best = None, "", 0
            for name, lst in self._lists.items():
                if lst:
                    head, prio = next(iter(lst.items()))
                    if victim is None or prio < best:
                        victim, vlist, best = head, name, prio
            assert victim is not None  # len(where) >= capacity > 0: some list is non-empty
            del self._lists[vlist][victim]
            del where[victim]
        cls = self._class(r)
        self._lists[cls][b] = self._clock + self._steps[cls]
        where[b] = cls
        return hit


# ---------------------------------------------------------------------------------- the comparison
CANDIDATES: dict[str, Callable[[int], Policy]] = {
    "lru": LRU,
    "protected-lru": ProtectedLRU,
    "marked-prefix": partial(ProtectedLRU, bypass=True),
    "slru-50": partial(SegmentedLRU, protected_fraction=0.5),
    "slru-90": partial(SegmentedLRU, protected_fraction=0.9),
    "s3-fifo": S3FIFO,
    "arc": ARC,
    "credit-4-2": partial(ReuseCredit, second=4.0, later=2.0),
    "reuse-credit": ReuseCredit,
}
"""Online policies compared by :func:`compare`. ``reuse-credit`` is the store's default order
(:class:`~cascade_kv.policy.ReuseCredit`); ``credit-4-2`` its constants before issue 13, chosen on the whole
shipped trace (in-sample: better there, below LRU on conversation traces, see ``docs/policy.md``).
``protected-lru`` is the store's two lists, protected copies yielding only when memory holds nothing else;
``marked-prefix`` (the store with every reused block put ``is_prefix=True``: protected copies never yield)
falls far below LRU."""

HINTED: dict[str, Callable[[int], Policy]] = {"reuse-credit+hint": partial(ReuseCredit, hinted=2.0)}
"""Policies that use the caller's per-request hint (only meaningful with ``reads_of(..., hint=...)``)."""


@dataclass(frozen=True, slots=True)
class Row:
    policy: str
    fraction: float  # capacity as a fraction of the trace's distinct blocks
    capacity: int
    result: SimResult


def compare(reads: Reads, fractions: Sequence[float] = (1 / 8, 1 / 4, 1 / 2),
            policies: dict[str, Callable[[int], Policy]] | None = None) -> list[Row]:
    """Every policy and Belady's optimum (as ``"belady"``) at each capacity."""
    policies = CANDIDATES if policies is None else policies
    rows = []
    for f in fractions:
        cap = int(reads.distinct * f)
        rows.append(Row("belady", f, cap, belady(reads, cap)))
        for name, make in policies.items():
            rows.append(Row(name, f, cap, simulate(reads, make(cap))))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    fractions = sorted({r.fraction for r in rows})
    names = list(dict.fromkeys(r.policy for r in rows))
    by = {(r.policy, r.fraction): r for r in rows}
    lru = {f: by[("lru", f)].result.hit_rate for f in fractions if ("lru", f) in by}
    opt = {f: by[("belady", f)].result.hit_rate for f in fractions if ("belady", f) in by}
    head = f"{'policy':<16}" + "".join(f"{f'1/{round(1 / f)}' if f < 1 else f:>22}" for f in fractions)
    lines = [head, f"{'':<16}" + "".join(f"{'hit  prefix  gap':>22}" for _ in fractions)]
    for name in names:
        cells = []
        for f in fractions:
            r = by.get((name, f))
            if r is None:
                cells.append(f"{'-':>22}")
                continue
            gap = ""
            if f in lru and f in opt and opt[f] > lru[f]:
                gap = f"{(r.result.hit_rate - lru[f]) / (opt[f] - lru[f]):+.0%}"
            cells.append(f"{r.result.hit_rate:>8.4f} {r.result.prefix_hit_rate:7.4f} {gap:>5}")
        lines.append(f"{name:<16}" + "".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cascade_kv.bench.tracesim", description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="JSON-lines trace (Mooncake format)")
    p.add_argument("--hint-output-below", type=int, default=None, metavar="TOKENS",
                   help="also run the hinted policy, hinting requests whose output is shorter than TOKENS")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    trace = load_trace(args.trace)
    policies = dict(CANDIDATES)
    hint = None
    if args.hint_output_below is not None:
        below = args.hint_output_below
        hint = lambda req: req.output_length < below
        policies.update(HINTED)
    reads = reads_of(trace, hint)
    rows = compare(reads, policies=policies)
    print(f"{trace.source}: {len(trace.requests)} requests, {len(reads.reads)} block reads, "
          f"{reads.distinct} distinct blocks; capacity as a fraction of distinct blocks; "
          f"gap = share of the LRU-to-Belady gap closed")
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
