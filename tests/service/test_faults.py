"""The node daemon under faults: garbage from a client, clients and daemons SIGKILLed or stopped at the worst
moment. Each test says what must hold afterwards; none waits on the clock (pipes and the daemon's answers
are the synchronisation)."""
from __future__ import annotations

import random
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import cascade_kv
from cascade_kv.errors import CapacityError, CascadeError, PeerTimeout, ServiceClosed
from cascade_kv.service import protocol as P

from .daemon_util import Daemon, RawConn, daemon, kill, read_line, sigkill, start_child, start_daemon, value, wait_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests that do not kill it: a 4 MiB arena, no disk tier."""
    with daemon(tmp_path_factory.mktemp("faults") / "s.sock", "--host-capacity", "4MiB") as d:
        yield d


@pytest.fixture
def sock_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("d") / "s.sock"  # short: a Unix socket path holds 107 bytes


def connected_clients(c: cascade_kv.Client) -> int:
    return c.service_stats()["clients"]


# ---------------------------------------------------------------------------------------------- garbage
def _after_hello(conn: RawConn, frame: bytes) -> None:
    assert conn.hello()[0] == P.Status.OK
    conn.sock.sendall(frame)


GARBAGE = {
    "bad magic": lambda c: _after_hello(c, b"XXXX" + P.HEADER.pack(P.MAGIC, P.Op.LEN, 0, 4)[4:] + bytes(4)),
    "unknown op": lambda c: _after_hello(c, P.frame(999, bytes(4))),
    "absurd length": lambda c: _after_hello(c, P.HEADER.pack(P.MAGIC, P.Op.GET, 0, 1 << 31)),
    "truncated GET": lambda c: _after_hello(c, P.frame(P.Op.GET, b"\0\0")),  # shorter than its namespace id
    "truncated PUT": lambda c: _after_hello(c, P.frame(P.Op.PUT, P.U32.pack(0) + P.pack_keys(["a", "b"]))),
    "truncated UNPIN": lambda c: _after_hello(c, P.frame(P.Op.UNPIN, b"\1")),
    "unpin not held": lambda c: _after_hello(c, P.frame(P.Op.UNPIN, P.U32.pack(12345))),
    "PUT_DATA without PUT": lambda c: _after_hello(c, P.frame(P.Op.PUT_DATA)),
    "unknown namespace": lambda c: _after_hello(c, P.frame(P.Op.LEN, P.U32.pack(7) + P.pack_keys([]))),
    "first not HELLO": lambda c: c.sock.sendall(P.frame(P.Op.LEN, P.U32.pack(0) + P.pack_keys([]))),
    "short HELLO": lambda c: c.sock.sendall(P.frame(P.Op.HELLO, b"\1")),
    "bad magic first": lambda c: c.sock.sendall(b"GET / HTTP/1.1\r\n\r\n"),
}


@pytest.mark.parametrize("case", GARBAGE)
def test_garbage_drops_only_its_sender(served: Daemon, case: str) -> None:
    with cascade_kv.connect(served.socket, timeout=30) as other:
        other.put(f"g-{case}", np.arange(100))
        before = other.service_stats()
        conn = RawConn(served.socket)
        try:
            GARBAGE[case](conn)
            assert conn.closed_by_peer(), f"{case}: the daemon answered instead of dropping the client"
        finally:
            conn.close()
        # counted before the daemon closes the connection; the drop itself is counted just after
        assert other.service_stats()["protocol_errors"] == before["protocol_errors"] + 1
        wait_for(lambda: other.service_stats()["dropped_clients"] == before["dropped_clients"] + 1,
                 f"{case}: the client is counted as dropped")
        np.testing.assert_array_equal(other.get(f"g-{case}"), np.arange(100))  # the other client is still served
        other.delete(f"g-{case}")
    with cascade_kv.connect(served.socket, timeout=30) as again:  # and new ones are accepted
        assert f"g-{case}" not in again


def test_client_gone_mid_message_is_no_error(served: Daemon) -> None:
    """A header promising more than arrives before EOF is a client that died mid-send, not garbage."""
    with cascade_kv.connect(served.socket) as other:
        before = other.service_stats()["protocol_errors"]
        conn = RawConn(served.socket)
        _after_hello(conn, P.HEADER.pack(P.MAGIC, P.Op.GET, 0, 100) + b"\0" * 10)
        conn.close()
        wait_for(lambda: connected_clients(other) == 1, "the connection of a client gone mid-message is released")
        assert other.service_stats()["protocol_errors"] == before
        assert len(other) == len(other.keys())


# ---------------------------------------------------------------------------------------------- a client killed
@pytest.mark.parametrize("mode", ["put", "put-partial"])
def test_half_written_put_is_never_visible(served: Daemon, mode: str) -> None:
    """A client that wrote half its bytes into staging and then died (or committed them anyway) stored
    nothing; the same key and bytes can then be put and read back."""
    key = f"half-{mode}"
    with cascade_kv.connect(served.socket) as c:
        blocks = c.stats().blocks
        child = start_child(mode, served.socket, key)
        try:
            report = read_line(child, "")
        finally:
            sigkill(child) if mode == "put" else kill(child)
        if mode == "put":
            assert report.startswith("half written"), report
            wait_for(lambda: connected_clients(c) == 1, "the killed client's connection is released")
        else:
            assert report.split() == [str(int(P.Status.ERROR)), "IntegrityError"], report
        assert key not in c and c.lookup([key]) == 0 and c.stats().blocks == blocks
        c.put(key, value(key))
        np.testing.assert_array_equal(c.get(key), value(key))
        c.delete(key)


def test_client_killed_in_a_put_loop_leaves_only_whole_values(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("loop") / "s.sock"
    with daemon(path, "--host-capacity", "4MiB") as d:
        child = start_child("loop", d.socket, "L")
        try:
            acked = -1
            for _ in range(random.Random(10).randint(3, 20)):
                acked = int(read_line(child, ""))
        finally:
            sigkill(child)  # somewhere inside the next put_many (or its delete)
        with cascade_kv.connect(d.socket) as c:
            wait_for(lambda: connected_clients(c) == 1, "the killed client's connection is released")
            keys = c.keys()
            assert {f"L{acked}-{j}" for j in range(4)} <= set(keys)  # the last acknowledged batch
            for k, got in zip(keys, c.get_many(keys)):
                np.testing.assert_array_equal(got, value(k), err_msg=k)
            assert c.stats().blocks == len(keys)


def test_dead_clients_pins_are_released(sock_path: Path) -> None:
    with daemon(sock_path, "--host-capacity", "4MiB") as d, cascade_kv.connect(d.socket) as c:
        c.put("pinned", value("pinned", MiB))
        child = start_child("get", d.socket, "pinned")
        try:
            assert read_line(child, "").startswith("pinned"), "the child's GET did not pin"
            c.delete("pinned")  # the key goes; the block stays while pinned
            assert c.stats().tiers[0].used_bytes >= MiB
        finally:
            sigkill(child)
        wait_for(lambda: c.stats().tiers[0].used_bytes == 0, "the dead client's pin is released")
        assert c.stats().blocks == 0
        # the whole arena, protected (nothing to evict, no disk to demote to): needs the room the pin held
        keys = [f"fill{i}" for i in range(4)]
        c.put_many(keys, [value(k, MiB) for k in keys], is_prefix=True)
        for k, got in zip(keys, c.get_many(keys)):
            np.testing.assert_array_equal(got, value(k, MiB))
        with pytest.raises(CapacityError):  # and the arena really is full now
            c.put("one-more", value("one-more", MiB), is_prefix=True)


# ---------------------------------------------------------------------------------------------- the daemon killed
def test_daemon_sigkill_fails_the_next_call(sock_path: Path) -> None:
    with daemon(sock_path, "--host-capacity", "4MiB") as d:
        c = cascade_kv.connect(d.socket, timeout=30)
        c.put("k", np.arange(1000))
        d.stop(signal.SIGKILL)
        with pytest.raises(ServiceClosed):
            c.get("k")
        with pytest.raises(ServiceClosed):  # the connection stays broken: connect again
            c.put("k2", np.arange(3))
        c.close()


def test_daemon_sigstop_times_out(sock_path: Path) -> None:
    with daemon(sock_path, "--host-capacity", "4MiB") as d:
        c = cascade_kv.connect(d.socket, timeout=0.5)
        c.put("k", np.arange(1000))
        d.send(signal.SIGSTOP)
        try:
            with pytest.raises(PeerTimeout):
                c.get("k")
            with pytest.raises(CascadeError):
                c.lookup(["k"])
        finally:
            d.send(signal.SIGCONT)
            c.close()


def test_persistent_daemon_killed_keeps_acknowledged_keys(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("persist")
    args = ("--host-capacity", "1MiB", "--disk-path", str(base / "disk"), "--persist")
    keys = [f"p{i}" for i in range(24)]  # 1.5 MiB: some only on disk, some also in memory
    with daemon(base / "s.sock", *args) as d:
        with cascade_kv.connect(d.socket) as c:
            c.put_many(keys[:12], [value(k) for k in keys[:12]])
            for k in keys[12:]:
                c.put(k, value(k))
        d.stop(signal.SIGKILL)
    assert (base / "s.sock").is_socket()  # the dead daemon's socket file is left behind...
    with pytest.raises(cascade_kv.ServiceUnavailable):
        cascade_kv.connect(base / "s.sock")
    with daemon(base / "s.sock", *args) as d2, cascade_kv.connect(d2.socket) as c:  # ...and replaced
        assert sorted(c.keys()) == sorted(keys)
        for k, got in zip(keys, c.get_many(keys)):
            np.testing.assert_array_equal(got, value(k), err_msg=k)


def test_raw_pin_then_unpin_twice_is_dropped(served: Daemon) -> None:
    """A token is spent by its UNPIN: a second one is garbage (a client that could unpin twice could free
    a block another client is copying)."""
    with cascade_kv.connect(served.socket) as c:
        used = c.stats().tiers[0].used_bytes
        c.put("twice", np.arange(10))
        conn = RawConn(served.socket)
        try:
            conn.hello()
            status, body = conn.call(P.Op.GET, P.U32.pack(0) + P.pack_keys(["twice"]))
            (token,) = struct.unpack_from("<I", body)
            assert status == P.Status.OK and token
            conn.send(P.Op.UNPIN, P.U32.pack(token))
            assert conn.call(P.Op.LEN, P.U32.pack(0) + P.pack_keys([]))[0] == P.Status.OK
            conn.send(P.Op.UNPIN, P.U32.pack(token))
            assert conn.closed_by_peer()
        finally:
            conn.close()
        c.delete("twice")
        wait_for(lambda: c.stats().tiers[0].used_bytes == used, "the block is freed")


def test_start_daemon_failure_is_reported(sock_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        start_daemon(sock_path, "--host-capacity", "not-a-size")
