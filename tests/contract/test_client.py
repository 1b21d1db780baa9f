"""The store contract (:mod:`cascade_kv.contract`) on the node daemon's client: every test of the suite runs
through ``connect()`` against a daemon serving a :class:`~cascade_kv.service.served.ServedStore` in this
process (its own threads, its own socket), so a put and a get cross the real protocol and shared memory."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade_kv import CascadeConfig, connect
from cascade_kv.service.backends import LocalBackend
from cascade_kv.service.served import ServedStore
from cascade_kv.service.server import Server

from .conformance import StoreContract


@contextlib.contextmanager
def served(**overrides: object) -> Iterator[object]:
    """A daemon with a store of ``overrides`` and a client of it; the client is the store under test. Leaving
    stops both (stopping the daemon closes its store, which removes its block files unless persist)."""
    with tempfile.TemporaryDirectory(prefix="ckv-sock-") as d:
        server = Server(LocalBackend(ServedStore(CascadeConfig(**overrides))), Path(d) / "s.sock").start()
        try:
            with connect(server.path, timeout=30) as client:
                yield client
        finally:
            server.stop()


class TestClient(StoreContract):
    @pytest.fixture
    def open_store(self):
        return served
