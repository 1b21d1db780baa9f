"""The client's scatter lists: a get's out may be a list of contiguous buffers that add up to the value, filled
with consecutive byte ranges of it straight from the daemon's arena (an engine's paged cache keeps one block's
layers in separate tensors)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from cascade_kv import InvalidArgument, connect
from cascade_kv.service.backends import LocalBackend
from cascade_kv.service.served import ServedStore
from cascade_kv.service.server import Server


@pytest.fixture
def client():
    with tempfile.TemporaryDirectory(prefix="ckv-") as d:
        server = Server(LocalBackend(ServedStore(host_capacity="8MiB")), Path(d) / "s.sock").start()
        try:
            with connect(server.path) as c:
                yield c
        finally:
            server.stop()


def test_a_scatter_list_receives_consecutive_byte_ranges(client):
    value = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    client.put_many(["v", "w"], [value, value * 2])
    pieces = [np.empty((4, 5), np.float32) for _ in range(3)]
    out = np.empty_like(value)
    got = client.get_many(["v", "w"], [pieces, out])
    assert got[0] is pieces and got[1] is out
    assert all(np.array_equal(p, value[i]) for i, p in enumerate(pieces)) and np.array_equal(out, value * 2)
    mixed = [np.empty(7, np.uint8), np.empty(233, np.uint8)]  # any split, any dtype: bytes are bytes
    client.get("v", mixed)
    assert bytes(mixed[0]) + bytes(mixed[1]) == value.tobytes()


def test_torch_pieces(client):
    torch = pytest.importorskip("torch", reason="the test extra (torch) is not installed (pip install '.[test]')")
    value = torch.randn(2, 3, 8).to(torch.bfloat16)
    client.put("t", value)
    pieces = [torch.empty(3, 8, dtype=torch.bfloat16) for _ in range(2)]
    client.get("t", pieces)
    assert torch.equal(torch.stack(pieces), value)


@pytest.mark.parametrize("bad", ["short", "long", "non-contiguous", "read-only", "not-an-array"])
def test_a_scatter_list_that_does_not_fit_is_refused_and_nothing_is_written(client, bad):
    value = np.arange(64, dtype=np.uint8)
    client.put("v", value)
    pieces = [np.full(32, 7, np.uint8), np.full(32, 7, np.uint8)]
    if bad == "short":
        pieces[1] = np.full(31, 7, np.uint8)
    elif bad == "long":
        pieces.append(np.full(1, 7, np.uint8))
    elif bad == "non-contiguous":
        pieces[1] = np.full(64, 7, np.uint8)[::2]
    elif bad == "read-only":
        pieces[1].flags.writeable = False
    else:
        pieces[1] = bytearray(32)
    with pytest.raises(InvalidArgument):
        client.get("v", pieces)
    assert all((np.asarray(p) == 7).all() for p in pieces if isinstance(p, np.ndarray))
    assert np.array_equal(client.get("v"), value)  # the connection is still good
