"""``cascade serve`` under MPI: every rank serves its own socket and together they are one DistributedStore, so a
client of either rank sees what a client of the other stored; SIGTERM to the ranks stops them together."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import cascade_kv
from cascade_kv.tokens import prefix_keys

from cluster.conftest import require_mpiexec  # tests/ is on sys.path (rootdir-relative test packages)


@pytest.fixture
def two_ranks(tmp_path):
    """Two daemons of one job (sockets s.sock.0 and s.sock.1) and their pids; killed whatever the test did."""
    require_mpiexec()
    sock = tmp_path / "s.sock"
    job_tmp = tmp_path / "job"
    job_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(job_tmp))
    proc = subprocess.Popen([sys.executable, "-m", "cascade_kv.cli", "launch", "-n", "2", "--timeout", "120",
                             sys.executable, "-m", "cascade_kv.cli", "serve", "--socket", str(sock),
                             "--host-capacity", "8MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    pids, lines = {}, []
    try:
        while len(pids) < 2:  # the pipe is the synchronisation: each rank prints once it listens
            line = proc.stdout.readline()
            if not line:
                pytest.fail("the job ended before both ranks listened:\n" + "".join(lines))
            lines.append(line)
            m = re.search(r"rank (\d): listening on (\S+) \(pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(3))
                assert m.group(2) == f"{sock}.{m.group(1)}", line  # two ranks on one node: .LOCAL_RANK appended
        yield sock, pids, proc, lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_a_client_of_either_rank_sees_the_whole_cluster_cache(two_ranks):
    sock, pids, proc, lines = two_ranks
    keys = prefix_keys(np.arange(64 * 16), 16, model="tiny")
    blocks = [np.random.default_rng(i).standard_normal((2, 16, 8)).astype(np.float32) for i in range(len(keys))]
    with cascade_kv.connect(f"{sock}.0") as a, cascade_kv.connect(f"{sock}.1") as b:
        a.put_many(keys[:40], blocks[:40], is_prefix=[i < 4 for i in range(40)])
        assert b.lookup(keys) == 40 and a.lookup(keys) == 40
        outs = [np.empty_like(x) for x in blocks[:40]]
        assert all(o is r for o, r in zip(outs, b.get_many(keys[:40], outs)))
        assert all(np.array_equal(o, x) for o, x in zip(outs, blocks))
        b.put_many(keys[40:], blocks[40:])  # the other way round
        assert all(np.array_equal(v, x) for v, x in zip(a.get_many(keys[40:]), blocks[40:]))
        assert a.lookup(keys) == len(keys) and b.info(keys[0]).prefix
        b.delete_many(keys[:10])
        assert a.lookup(keys) == 0 and a.lookup(keys[10:]) == len(keys) - 10
        ns_a, ns_b = a.namespace("tenant"), b.namespace("tenant")
        ns_a.put("k", blocks[0])
        assert np.array_equal(ns_b.get("k"), blocks[0]) and "k" not in b
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)  # what scancel and srun do: every rank gets it
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert "rank 0: stopped" in text and "rank 1: stopped" in text, text
    assert not list(sock.parent.glob("s.sock*")), "a socket file was left behind"
