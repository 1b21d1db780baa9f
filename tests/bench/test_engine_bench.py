"""``cascade bench engine --quick``, end to end through the CLI: real vLLM engines (a tiny random Llama), a real
daemon, every row's tokens checked against the engine without a connector. The numbers are the machine's:
only the report's shape is checked, and that no token differed."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from cascade_kv.bench.suite.core import Measure, SystemResult
from cascade_kv.bench.suite.engine import BLOCK, AtMost, EngineResult, Sizes, shape_lines, workload
from tests.procs import run_bounded

CASCADE_ROWS = {"vllm", "vllm-prefix-cache", "cascade-kv", "cascade-kv-restart"}


def test_the_workload_is_shaped_like_the_trace() -> None:
    s = Sizes.for_run(quick=True)
    w = workload(s)
    assert len(w.turns) == s.conversations * s.turns and sum(w.first) == s.conversations
    system = w.turns[0][:s.system]
    assert all(p[:s.system] == system for p in w.turns)  # one shared system prompt
    for i in range(1, len(w.turns)):
        if not w.first[i]:
            assert w.turns[i][:len(w.turns[i - 1])] == w.turns[i - 1]  # a turn extends the previous one
    assert all(len(c) == 1056 and c[:1024] == h[:1024] and c != h for c, h in zip(w.probe_cold, w.probe_warm))
    assert len({tuple(m) for m in w.misses + w.decodes}) == 2 * s.misses  # unique: nothing can be cached
    assert [len(r) for r in w.rounds] == [s.conversations] * s.turns
    assert workload(s).turns == w.turns  # every row replays the same prompts
    lines = shape_lines(w)
    assert lines[0].startswith("trace (shipped Mooncake): 3,993 requests") and "shared system prompt" in lines[1]


def test_an_at_most_target_passes_only_at_or_below_its_ratio() -> None:
    res = EngineResult("engine", "t", 1)
    for name, ms in (("a", 100.0), ("b", 20.0), ("c", 30.0)):
        res.systems[name] = SystemResult(name, measures={"ttft": Measure("ms", [ms])})
    res.targets = [AtMost("b", "ttft", 0.25, "a"), AtMost("c", "ttft", 0.25, "a"), AtMost("b", "ttft", 0.5, "x")]
    res.judge()
    assert [t.passed for t in res.targets] == [True, False, None]
    assert res.targets[1].got == pytest.approx(0.3)


def test_quick_run_reports_every_row_and_equal_tokens(tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None:  # not importorskip: importing vllm leaves torch's cache in TMPDIR
        pytest.skip("vLLM is not installed (pip install '.[vllm]')")
    out = tmp_path / "engine.json"
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_LMCACHE_PYTHON"}
    done = run_bounded([sys.executable, "-m", "cascade_kv.cli", "bench", "engine", "--quick", "--dir",
                           str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=900,
                          check=False, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["experiment"] == "engine" and not got["failed"]
    assert got["reads_checked"] > 0 and got["reads_wrong"] == 0, got["notes"]  # every row's tokens as vLLM's alone
    assert set(got["systems"]) == CASCADE_ROWS
    no_lmcache = importlib.util.find_spec("lmcache") is None  # importable beside vLLM, LMCache's row runs instead
    if no_lmcache:
        assert list(got["skipped"]) == ["lmcache-mp"] and got["skipped"]["lmcache-mp"].startswith("LMCache not installed")
    rows = got["systems"]
    for name in CASCADE_ROWS:
        for key in ("ttft_cold", "ttft_cold_p99", "ttft_warm", "ttft_warm_p99", "throughput"):
            assert rows[name][key]["n"] >= 1, (name, key)
        assert rows[name]["ttft_cold"]["unit"] == "ms" and rows[name]["throughput"]["unit"] == "req/s"
    for name in ("vllm", "vllm-prefix-cache", "cascade-kv"):
        for key in ("ttft_1024_cold", "ttft_1024_warm", "ttft_1024_b2b", "miss_ttft", "miss_decode"):
            assert rows[name][key]["n"] >= 1, (name, key)
        assert rows[name]["miss_cached"] == 0  # unique prompts: nothing to reuse
    assert rows["vllm"]["reused_tokens"] == 0
    assert rows["vllm-prefix-cache"]["reused_tokens"] > 0
    # cascade-kv reuses what vLLM's own cache reuses (whole blocks, the last prompt token always computed)
    assert rows["cascade-kv"]["reused_tokens"] == rows["vllm-prefix-cache"]["reused_tokens"]
    assert all(c == 1024 for c in rows["cascade-kv"]["probe_cached"])
    counters = rows["cascade-kv"]["connector"]
    assert counters["load_blocks"] * BLOCK >= rows["cascade-kv"]["reused_tokens"] and counters["save_blocks"] > 0
    assert rows["cascade-kv-restart"]["restart_hit_share"]["median"] == 1.0
    targets = {(t["system"], t["key"], t["than"]): t for t in got["targets"]}
    assert targets["cascade-kv-restart", "restart_hit_share", ""]["passed"] is True
    assert targets["cascade-kv", "ttft_1024_warm", "cascade-kv cold 1,056"]["passed"] in (True, False)  # judged
    assert targets["cascade-kv", "miss_ttft", "vllm"]["got"] is not None
    if no_lmcache:
        assert targets["cascade-kv", "ttft_1024_warm", "lmcache-mp"]["passed"] is None
        assert "not judged" in done.stdout  # the LMCache comparison, without LMCache
