"""``Policy.accessed_many`` is ``accessed`` per use, in order: the same victims, for both orders."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_kv.policy import Policy, ReuseCredit

_IDS = [bytes([i]) * 32 for i in range(6)]
_OPS = st.lists(st.tuples(st.sampled_from(["add", "use", "protect", "unprotect", "remove"]),
                          st.integers(0, 5), st.integers(1, 4096)), max_size=40)


def _victims(p: Policy) -> list[bytes]:
    return list(p.victims(0))


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, order=st.sampled_from(["lru", "reuse"]), batches=st.lists(st.integers(1, 4), min_size=1))
def test_batch_of_uses_is_each_use_in_turn(ops: list[tuple[str, int, int]], order: str, batches: list[int]) -> None:
    one, many = (Policy([1 << 16], order=order, credit=ReuseCredit()) for _ in range(2))  # type: ignore[arg-type]
    reads = {i: 0 for i in range(len(_IDS))}
    pending: list[tuple[bytes, int, int]] = []
    sizes = iter(batches * 40)

    def flush() -> None:
        many.accessed_many(0, pending)
        pending.clear()

    for op, i, nbytes in ops:
        b = _IDS[i]
        if op == "use":
            reads[i] += 1
            one.accessed(0, b, nbytes, reads[i])
            pending.append((b, nbytes, reads[i]))
            if len(pending) >= next(sizes):
                flush()
            continue
        flush()
        for p in (one, many):
            if op == "add":
                p.added(0, b, nbytes, reads[i])
            elif op == "remove":
                p.removed(0, b)
            else:
                p.set_protected(b, op == "protect", reads[i])
    flush()
    assert _victims(one) == _victims(many)
    assert one._clock == many._clock
