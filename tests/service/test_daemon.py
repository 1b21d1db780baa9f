"""``cascade serve`` as its users meet it: connecting (or not), versions, a full arena, stopping by signal,
the socket's privacy, metrics and ``cascade stats``, torch tensors, and two client processes sharing blocks."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import cascade_kv
from cascade_kv import __version__
from cascade_kv.errors import CapacityError, CascadeError, ServiceUnavailable, VersionMismatch
from cascade_kv.service import protocol as P

from .daemon_util import Daemon, RawConn, daemon, kill, read_line, start_child, value

MiB = 1 << 20
SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests that do not stop it: a 4 MiB arena, no disk tier, metrics on any port."""
    with daemon(tmp_path_factory.mktemp("daemon") / "s.sock", "--host-capacity", "4MiB", "--metrics-port", "0") as d:
        yield d


@pytest.fixture
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("d")  # short: a Unix socket path holds 107 bytes


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cascade_kv.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


# ---------------------------------------------------------------------------------------------- connecting
@pytest.mark.parametrize("where", ["missing", "missing dir", "regular file"])
def test_no_daemon_is_service_unavailable(base: Path, where: str) -> None:
    path = {"missing": base / "none.sock", "missing dir": base / "no" / "none.sock", "regular file": base / "file"}[where]
    if where == "regular file":
        path.write_text("not a socket")
    with pytest.raises(ServiceUnavailable) as info:
        cascade_kv.connect(path, timeout=5)
    assert isinstance(info.value, CascadeError) and isinstance(info.value, ConnectionError)
    assert str(path) in str(info.value) and "cascade serve" in str(info.value)


def test_other_client_version_is_refused(served: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    with cascade_kv.connect(served.socket) as other:
        monkeypatch.setattr("cascade_kv.service.client.__version__", "0.0.0-other")
        with pytest.raises(VersionMismatch) as info:
            cascade_kv.connect(served.socket)
        assert "0.0.0-other" in str(info.value) and __version__ in str(info.value)
        monkeypatch.undo()
        other.put("after-mismatch", np.arange(5))  # a client already connected is still served
        with cascade_kv.connect(served.socket) as again:  # and so is a new one
            np.testing.assert_array_equal(again.get("after-mismatch"), np.arange(5))
            again.delete("after-mismatch")


def test_other_protocol_version_is_refused(served: Daemon) -> None:
    conn = RawConn(served.socket)
    try:
        status, body = conn.hello(version=P.PROTOCOL_VERSION + 1)
        assert status == P.Status.ERROR
        with pytest.raises(VersionMismatch, match=f"protocol {P.PROTOCOL_VERSION + 1}.*protocol {P.PROTOCOL_VERSION}"):
            P.raise_error(body)
        assert conn.closed_by_peer()
    finally:
        conn.close()
    with cascade_kv.connect(served.socket) as c:
        assert c.lookup(["absent"]) == 0


# ---------------------------------------------------------------------------------------------- a full arena
def test_full_arena_without_disk_is_capacity_error(served: Daemon) -> None:
    with cascade_kv.connect(served.socket) as c:
        with pytest.raises(CapacityError):
            c.put("too-big", value("too-big", 5 * MiB))
        keys = [f"prot{i}" for i in range(5)]
        with pytest.raises(CapacityError):  # protected blocks are never dropped, and there is no disk
            for k in keys:
                c.put(k, value(k, MiB), is_prefix=True)
        present = [k for k in keys if k in c]
        assert 0 < len(present) < len(keys) and "too-big" not in c
        for k, got in zip(present, c.get_many(present)):
            np.testing.assert_array_equal(got, value(k, MiB))
        c.delete_many(present)


def test_full_arena_with_disk_demotes(base: Path) -> None:
    with daemon(base / "s.sock", "--host-capacity", "1MiB", "--disk-path", str(base / "disk")) as d, \
            cascade_kv.connect(d.socket) as c:
        keys = [f"k{i}" for i in range(48)]  # 3 MiB through a 1 MiB arena
        for k in keys:
            c.put(k, value(k))
        s = c.stats()
        assert s.keys == len(keys) and s.demotions > 0 and s.tiers[1].blocks > 0
        for k, got in zip(keys, c.get_many(keys)):
            np.testing.assert_array_equal(got, value(k), err_msg=k)


# ---------------------------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("persist", [False, True])
def test_signal_stops_cleanly(base: Path, sig: signal.Signals, persist: bool) -> None:
    shm = set(os.listdir(SHM)) if SHM.is_dir() else set()
    disk = base / "disk"
    args = ("--host-capacity", "1MiB", "--disk-path", str(disk)) + (("--persist",) if persist else ())
    with daemon(base / "s.sock", *args) as d:
        with cascade_kv.connect(d.socket) as c:
            keys = [f"k{i}" for i in range(32)]  # 2 MiB: half of it demoted to disk
            c.put_many(keys, [value(k) for k in keys])
            assert c.stats().tiers[1].blocks > 0
        assert d.stop(sig) == 0, d.stderr()
    assert not (base / "s.sock").exists()
    files = sorted(p.relative_to(disk) for p in disk.rglob("*") if p.is_file()) if disk.exists() else []
    if persist:
        assert files, "--persist kept nothing"
        with daemon(base / "s.sock", *args) as d, cascade_kv.connect(d.socket) as c:
            assert sorted(c.keys()) == sorted(keys)
            np.testing.assert_array_equal(c.get("k0"), value("k0"))
    else:
        assert files == []
    assert (set(os.listdir(SHM)) if SHM.is_dir() else set()) <= shm


# ---------------------------------------------------------------------------------------------- privacy
def test_default_socket_is_private_and_single(base: Path) -> None:
    runtime = base / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_SOCKET"}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    path = runtime / "cascade-kv" / "cascade.sock"
    with daemon(None, "--host-capacity", "1MiB", env=env, log=base / "serve.log") as d:
        assert d.socket == path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        second = cli("serve", "--host-capacity", "1MiB", env=env)
        assert second.returncode == 2, second
        assert "already serves" in second.stderr and str(path) in second.stderr
        with cascade_kv.connect(path) as c:  # the first daemon is untouched
            c.put("k", np.arange(3))
        d.stop(signal.SIGKILL)
    assert path.is_socket()  # stale
    with daemon(None, "--host-capacity", "1MiB", env=env, log=base / "serve.log") as d, cascade_kv.connect(path) as c:
        assert d.socket == path and "k" not in c


# ---------------------------------------------------------------------------------------------- metrics and stats
def test_metrics_endpoint_and_cascade_stats(served: Daemon) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert served.metrics_url is not None, served.line
    with cascade_kv.connect(served.socket) as c:
        c.put_many(["m1", "m2"], [np.arange(10), np.arange(20)])
        puts = c.service_stats()["puts"]
        with urllib.request.urlopen(served.metrics_url, timeout=30) as r:
            text = r.read().decode()
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        assert samples["cascade_service_puts_total"] == puts >= 1
        assert samples["cascade_keys"] >= 2
        assert all(name.startswith("cascade_") for name in samples if not name.startswith(("python_", "process_")))
        tables = cli("stats", "--socket", str(served.socket))
        assert tables.returncode == 0, tables
        assert "put" in tables.stdout.lower()
        as_json = cli("stats", "--socket", str(served.socket), "--json")
        assert as_json.returncode == 0, as_json
        d = json.loads(as_json.stdout)
        assert d["store"]["keys"] >= 2 and d["service"]["puts"] >= puts
        c.delete_many(["m1", "m2"])


def test_cascade_stats_without_daemon(base: Path) -> None:
    done = cli("stats", "--socket", str(base / "none.sock"))
    assert done.returncode == 2 and "cascade serve" in done.stderr


# ---------------------------------------------------------------------------------------------- torch
def test_torch_tensors(served: Daemon) -> None:
    torch = pytest.importorskip("torch", reason="the test extra (torch) is not installed (pip install '.[test]')")
    with cascade_kv.connect(served.socket) as c:
        x = torch.randn(4, 8, 16).to(torch.bfloat16)
        c.put("bf16", x)
        out = torch.empty_like(x)
        got = c.get("bf16", out=out)
        assert got.dtype == torch.bfloat16 and torch.equal(out, x)
        strided = torch.arange(64, dtype=torch.float32).reshape(8, 8).t()
        assert not strided.is_contiguous()
        c.put("strided", strided)
        np.testing.assert_array_equal(c.get("strided"), strided.numpy())
        c.delete_many(["bf16", "strided"])


# ---------------------------------------------------------------------------------------------- two processes
def test_two_client_processes_share_blocks(served: Daemon) -> None:
    with cascade_kv.connect(served.socket) as c:
        child = start_child("client-put", served.socket, "shared")
        try:
            assert read_line(child, "") == "put\n"
            np.testing.assert_array_equal(c.get("shared"), value("shared"))
            before = c.service_stats()
            c.put("shared-again", value("shared"))  # the other process's bytes: only the digest is sent
            after = c.service_stats()
            assert after["put_digest_only_blocks"] == before["put_digest_only_blocks"] + 1
            np.testing.assert_array_equal(c.get("shared-again"), value("shared"))
            assert c.info("shared").digest == c.info("shared-again").digest
        finally:
            kill(child)
        c.delete_many(["shared", "shared-again"])
