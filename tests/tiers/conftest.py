"""Fixtures shared by the tier tests (the conformance suite sets up its own tiers)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cascade_kv.hashing import Hasher
from cascade_kv.tiers import DiskTier


@pytest.fixture
def make_disk(tmp_path: Path, hasher: Hasher) -> Callable[..., DiskTier]:
    """``make_disk(**kwargs)``: a disk tier rooted at ``tmp_path/"disk"`` (the same root every call,
    so a second call is the same directory reopened, as after a restart)."""

    def make(**kwargs: object) -> DiskTier:
        return DiskTier(tmp_path / "disk", hasher, **kwargs)  # type: ignore[arg-type]

    return make
