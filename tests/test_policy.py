"""The placement policy on its own: victim order per tier, protection, the reuse credit, promotion; and the
same ranking for a distributed store's arena (ArenaPolicy: replicas, unprotected, protected)."""
from __future__ import annotations

import pytest

from cascade_kv.config import SEED_RULES, CascadeConfig
from cascade_kv.policy import ArenaPolicy, Policy, ReuseCredit

CAP = 4 * 100  # a tier of four 100-byte blocks


def ids(n: int) -> list[bytes]:
    return [bytes([i]) * 32 for i in range(n)]


def fill(p: Policy, blocks: list[bytes], tier: int = 0) -> None:
    for b in blocks:
        p.added(tier, b, 100)


def test_lru_offers_the_least_recently_used_first() -> None:
    p = Policy([CAP], order="lru")
    a, b, c = ids(3)
    fill(p, [a, b, c])
    p.accessed(0, a, 100, reads=1)
    assert list(p.victims(0)) == [b, c, a]


def test_a_read_block_outranks_newer_blocks_never_read() -> None:
    p = Policy([CAP], order="reuse")  # read once: the default credit, one capacity of traffic
    a, *rest = ids(4)
    p.added(0, a, 100)
    p.accessed(0, a, 100, reads=1)
    fill(p, rest)  # 5 newer blocks, never read
    assert list(p.victims(0)) == [*rest, a]


def test_the_credit_runs_out() -> None:
    p = Policy([CAP], order="reuse", credit=ReuseCredit(read_once=1.1))
    a, *rest = ids(7)
    p.added(0, a, 100)
    p.accessed(0, a, 100, reads=1)  # ranked as if used 440 bytes of traffic from now
    fill(p, rest)  # 600 bytes of newer, unread blocks: the last two rank above it
    assert list(p.victims(0)) == [*rest[:4], a, *rest[4:]]


def test_lru_order_has_no_credit_and_is_the_default() -> None:
    p = Policy([CAP])
    a, *rest = ids(6)
    p.added(0, a, 100)
    p.accessed(0, a, 100, reads=1)
    fill(p, rest)
    assert list(p.victims(0)) == [a, *rest]


def test_moving_a_copy_does_not_age_the_others() -> None:
    p = Policy([CAP, None], order="reuse")
    a, b, c = ids(3)
    p.added(0, a, 100)
    p.accessed(0, a, 100, reads=1)
    for _ in range(100):  # demotions and promotions back and forth are no use of the blocks
        p.added(1, b, 100, use=False)
        p.removed(1, b)
    p.added(0, c, 100)
    assert list(p.victims(0)) == [c, a]


def test_protected_copies_are_never_offered_and_come_back_when_unprotected() -> None:
    p = Policy([CAP])
    a, b = ids(2)
    fill(p, [a, b])
    p.set_protected(a, True)
    assert list(p.victims(0)) == [b]
    p.added(0, a, 100)  # a copy added while protected stays off the list too
    assert list(p.victims(0)) == [b]
    p.set_protected(a, False)
    assert set(p.victims(0)) == {a, b}


def test_without_semantic_eviction_protection_is_ignored() -> None:
    p = Policy([CAP], semantic=False)
    a, b = ids(2)
    fill(p, [a, b])
    p.set_protected(a, True)
    assert list(p.victims(0)) == [a, b]


def test_removed_copies_leave_every_list() -> None:
    p = Policy([CAP, CAP])
    a, b = ids(2)
    fill(p, [a, b])
    fill(p, [a], tier=1)
    p.accessed(0, a, 100, reads=2)
    p.removed(0, a)
    assert list(p.victims(0)) == [b] and list(p.victims(1)) == [a]


def test_an_unbounded_tier_is_plain_lru() -> None:
    p = Policy([None], order="reuse")
    a, b = ids(2)
    fill(p, [a, b])
    p.accessed(0, a, 100, reads=1)
    assert list(p.victims(0)) == [b, a]


def test_the_store_defaults_are_the_fitted_credit_and_the_seed_rules_stay_available() -> None:
    """The defaults: reuse order with the fitted credit (one capacity of traffic for a block read once or more,
    docs/policy.md) and promotion at the first read from disk; the seed's rules are one replace away."""
    cfg = CascadeConfig()
    assert (cfg.eviction_order, cfg.promotion_threshold) == ("reuse", 1)
    assert ReuseCredit().by_reads() == (0.0, 1.0, 1.0)
    seed = cfg.replace(**SEED_RULES)
    assert (seed.eviction_order, seed.promotion_threshold) == ("lru", 3)
    a, b, *rest = ids(5)
    p = Policy([CAP], order=seed.eviction_order, promotion_threshold=seed.promotion_threshold)
    fill(p, [a, b, *rest])
    p.accessed(0, a, 100, reads=1)
    assert list(p.victims(0))[0] == b and not p.should_promote(2) and p.should_promote(3)


def test_promotion_threshold_and_switch() -> None:
    assert not Policy([CAP], promotion_threshold=3).should_promote(2)
    assert Policy([CAP], promotion_threshold=3).should_promote(3)
    assert not Policy([CAP], promotion_threshold=1, promote=False).should_promote(5)


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="eviction order"):
        Policy([CAP], order="mru")  # type: ignore[arg-type]


# -- ArenaPolicy: one rank's arena in the distributed store ---------------------------------------------------
R, U, P = ArenaPolicy.REPLICA, ArenaPolicy.UNPROTECTED, ArenaPolicy.PROTECTED


def test_arena_classes_replicas_then_unprotected_then_protected_on_request() -> None:
    p = ArenaPolicy(CAP)
    a, b, c = ids(3)
    assert (p.class_of(replica=True, protected=True), p.class_of(replica=False, protected=True),
            p.class_of(replica=False, protected=False)) == (R, P, U)
    p.added(P, a, 100)
    p.added(U, b, 100)
    p.added(R, c, 100)
    assert list(p.victims(protected=False)) == [c, b]
    assert list(p.victims(protected=True)) == [c, b, a]
    assert sorted(p.listed()) == sorted([(R, c), (U, b), (P, a)])


def test_arena_lru_a_read_or_a_kept_victim_goes_last_in_its_class() -> None:
    p = ArenaPolicy(CAP)
    a, b, c = ids(3)
    for x in (a, b, c):
        p.added(U, x, 100)
    p.accessed(U, a, 100, reads=1)
    assert list(p.victims(protected=False)) == [b, c, a]
    p.kept(U, b, reads=0)  # a victim that could not go is tried last next time
    assert list(p.victims(protected=False)) == [c, a, b]
    p.removed(U, c)
    assert list(p.victims(protected=False)) == [a, b]


def test_arena_reuse_order_credits_a_read_copy_as_the_single_store_does() -> None:
    """The same events give the same victims in both policies: eviction_order means one thing."""
    single, arena = Policy([CAP], order="reuse"), ArenaPolicy(CAP, order="reuse")
    a, *rest = ids(4)
    single.added(0, a, 100)
    arena.added(U, a, 100)
    single.accessed(0, a, 100, reads=1)
    arena.accessed(U, a, 100, reads=1)
    for x in rest:
        single.added(0, x, 100)
        arena.added(U, x, 100)
    assert list(arena.victims(protected=False)) == list(single.victims(0)) == [*rest, a]


def test_arena_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="eviction order"):
        ArenaPolicy(CAP, order="mru")  # type: ignore[arg-type]
