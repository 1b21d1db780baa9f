"""Large byte copies split over threads: every byte lands where it belongs, whatever the split."""
from __future__ import annotations

import numpy as np
import pytest

from cascade_kv import memcopy


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 4095, memcopy.PARALLEL_MIN - 1, memcopy.PARALLEL_MIN,
                               memcopy.PARALLEL_MIN + 1, memcopy.PARALLEL_MIN + 63, 3 * memcopy.PARALLEL_MIN + 5])
def test_every_byte_is_copied(monkeypatch: pytest.MonkeyPatch, n: int, threads: int) -> None:
    monkeypatch.setattr(memcopy, "_threads", lambda: threads)
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n + 2, np.uint8)  # a guard byte on each side
    memcopy.copy_bytes(memoryview(dst[1:-1]), memoryview(src))
    assert np.array_equal(dst[1:-1], src) and dst[0] == 0 and dst[-1] == 0


def test_a_size_mismatch_is_refused_before_any_byte_moves() -> None:
    dst = np.zeros(10, np.uint8)
    with pytest.raises(ValueError, match="copy of 11 B into 10 B"):
        memcopy.copy_bytes(memoryview(dst), memoryview(np.ones(11, np.uint8)))
    assert not dst.any()


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 4096, memcopy.PARALLEL_MIN, memcopy.PARALLEL_MIN + 4097])
def test_in_parts_covers_every_byte_once_at_aligned_cuts(monkeypatch: pytest.MonkeyPatch, n: int,
                                                          threads: int) -> None:
    monkeypatch.setattr(memcopy, "_threads", lambda: threads)
    parts = memcopy.in_parts(n, 4096, lambda a, b: (a, b))  # results in order: the caller's share first
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(x[1] == y[0] for x, y in zip(parts, parts[1:]))
    assert all(a % 4096 == 0 for a, _ in parts)
    assert len(parts) == (threads if n >= memcopy.PARALLEL_MIN else 1)


def test_in_parts_raises_a_helpers_error_after_every_share_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memcopy, "_threads", lambda: 2)
    done = []

    def part(a: int, b: int) -> None:
        done.append(a)
        if a:
            raise OSError("a helper's share failed")

    with pytest.raises(OSError, match="helper's share"):
        memcopy.in_parts(memcopy.PARALLEL_MIN, 64, part)
    assert sorted(done) == [0, memcopy.PARALLEL_MIN // 2]
