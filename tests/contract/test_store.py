"""The store contract (:mod:`cascade_kv.contract`) on the single-node :class:`~cascade_kv.Store`."""
from __future__ import annotations

import pytest

from cascade_kv import CascadeConfig, Store

from .conformance import StoreContract


class TestStore(StoreContract):
    @pytest.fixture
    def open_store(self):
        # a Store is its own context manager; disk paths are the tests' tmp_path, which pytest removes
        return lambda **overrides: Store(CascadeConfig(**overrides))
