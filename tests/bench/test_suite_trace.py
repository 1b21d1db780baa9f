"""``cascade bench trace``: a hand-made trace replayed in one process, and the CLI on the shipped trace."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from cascade_kv.bench import trace as tr
from cascade_kv.bench import tracesim
from cascade_kv.bench.suite import trace_replay
from cascade_kv.bench.peers.cascade import CascadeKV
from cascade_kv.bench.suite.core import Run, SuiteError
from cascade_kv.config import CascadeConfig
from cascade_kv.errors import CascadeError
from cluster.conftest import require_mpiexec  # tests/ is on sys.path (rootdir-relative test packages)
from tests.procs import run_bounded

CLI = [sys.executable, "-m", "cascade_kv.cli", "bench", "trace"]
SCALE = tr.MODELS["Qwen2.5-7B"].kv_block_bytes() / 4096  # 4 KiB blocks

# 12 distinct blocks (memory: 3), shared prefixes of 1 to 4 blocks, a line out of timestamp order
REQUESTS = [
    (0, [1, 2, 3]),
    (10, [1, 2, 3, 4]),
    (20, [5, 6]),
    (30, [1, 2, 7]),
    (40, [5, 6, 8, 9]),
    (60, [1, 2, 3, 4, 10]),
    (50, [11, 12]),
    (70, [5, 6, 8, 9, 1]),
    (80, [1, 2, 7]),
]


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"timestamp": ts, "input_length": 512 * len(ids) - 100, "output_length": 8,
                                        "hash_ids": ids}) + "\n" for ts, ids in REQUESTS))
    return path


def _replay(tmp_path: Path, trace_file: Path, systems: list[str], settle: bool = True):
    """``settle``: promotions land after each request's loads, so hit rates are exact (the CLI does not)."""
    run = Run(None, quick=True, root=tmp_path, systems=systems, tick=lambda what: None,
              options={"trace": trace_file, "scale": SCALE, "settle": settle})
    return run, trace_replay.run(run)


def test_every_reusable_block_is_loaded_checked_and_put_once(tmp_path: Path, trace_file: Path) -> None:
    run, res = _replay(tmp_path, trace_file, ["cascade-kv", "posix"])
    assert not res.failed and not res.skipped
    trace = tr.load_trace(trace_file)
    reusable = sum(tr.prefix_lengths(trace))  # 19 by the trace's rule
    distinct = len(trace.distinct_blocks())
    assert res.settings["block_size"] == 4096 and res.settings["capacity_blocks"] == distinct // 4 == 3
    assert res.settings["reusable_blocks"] == reusable and res.settings["block_reads"] == trace.reads
    for name in ("cascade-kv", "posix"):  # neither loses a block: cascade-kv demotes to disk, posix keeps files
        got = res.systems[name].values
        assert (got["loaded"], got["held"], got["held_behind_a_miss"]) == (reusable, reusable, 0), name
        assert got["puts"] == distinct and got["gone_before_read"] == 0
        assert res.systems[name].measures["prefix_hit_rate"].median == 1.0
    hits = dict(part.split() for part in res.systems["cascade-kv"].values["tier_hits"].split(", "))
    assert int(hits["host"]) + int(hits["disk"]) == reusable and int(hits["disk"]) > 0  # memory holds 3 of 12
    memory = res.systems["cascade-kv"].measures["memory_hit_rate"].median
    assert memory == int(hits["host"]) / trace.reads
    assert "memory_hit_rate" not in res.systems["posix"].measures  # a page cache it cannot count
    assert run.counted_reads() == (2 * reusable, 0)
    opt = res.settings["offline"]["belady"]["hit_rate"]
    assert res.ceilings["offline Belady optimum, memory hit rate"].median == opt >= memory
    # the prefill saved is the FLOP model's time for the tokens of the loaded prefixes
    flops = tr.FlopModel(tr.MODELS["Qwen2.5-7B"])
    want = sum(flops.prefill_seconds(tr.reused_tokens(q, k)) for q, k in zip(trace.requests, tr.prefix_lengths(trace))
               if k)
    assert res.systems["cascade-kv"].measures["prefill_saved_s"].median == pytest.approx(want)


def test_the_plain_lru_store_hits_exactly_what_offline_lru_hits(tmp_path: Path, trace_file: Path) -> None:
    _, res = _replay(tmp_path, trace_file, ["cascade-kv (plain LRU)"])
    # the row fails when peers/cascade.py stops passing the variant's options on (a mislabelled row)
    assert not res.skipped and not res.failed, (res.skipped, res.failed)
    reads = tracesim.reads_of(tr.load_trace(trace_file))
    lru = tracesim.simulate(reads, tracesim.LRU(res.settings["capacity_blocks"]))
    assert res.systems["cascade-kv (plain LRU)"].measures["memory_hit_rate"].median == lru.hit_rate


def test_the_prefix_marked_row_protects_reused_blocks(tmp_path: Path, trace_file: Path) -> None:
    run, res = _replay(tmp_path, trace_file, ["cascade-kv (prefix-marked)"])
    assert not res.failed and list(res.systems) == ["cascade-kv (prefix-marked)"]
    marked = res.systems["cascade-kv (prefix-marked)"].values
    assert marked["loaded"] == marked["loaded_blocks_put_again_marked"] == res.settings["reusable_blocks"]
    assert marked["puts"] == res.settings["distinct_blocks"]
    assert marked["prefix_marks_refused"] > 0  # 3 blocks of memory fill with protected blocks, then marks are refused
    assert run.counted_reads() == (res.settings["reusable_blocks"], 0)


def test_a_mislabelled_variant_fails(tmp_path: Path, trace_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose store runs with other settings than the row's name says is a failure, never a skip."""
    wrong = trace_replay.Variant("cascade-kv", {"eviction_order": "lru"}, check=(("eviction_order", "reuse"),))
    monkeypatch.setitem(trace_replay.VARIANTS, "cascade-kv (mislabelled)", wrong)
    _, res = _replay(tmp_path, trace_file, ["cascade-kv (mislabelled)", "cascade-kv (seed rules)"])
    assert not res.skipped
    assert "mislabelled" in res.failed["cascade-kv (mislabelled)"]
    assert "eviction_order='lru' (wants 'reuse')" in res.failed["cascade-kv (mislabelled)"]
    assert list(res.systems) == ["cascade-kv (seed rules)"]  # the other rows still run
    seed = res.systems["cascade-kv (seed rules)"].values
    assert (seed["eviction_order"], seed["promotion_threshold"]) == ("lru", 3)


def test_a_memory_hit_rate_of_zero_fails(tmp_path: Path, trace_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline LRU hits blocks at this capacity; a row that counts none measured nothing: a failure."""
    monkeypatch.setattr(CascadeKV, "tier_hits", lambda self: {"host": 0, "disk": 0})
    _, res = _replay(tmp_path, trace_file, ["cascade-kv"])
    assert res.settings["offline"]["lru"]["hit_rate"] > 0
    assert "memory hit rate 0" in res.failed["cascade-kv"]


def test_the_default_row_runs_the_default_config_on_the_callers_schedule(tmp_path: Path, trace_file: Path) -> None:
    """Without settling between requests (the CLI's replay), the row reports the promoter's CPU time beside the
    timings, and runs with the shipped defaults."""
    run, res = _replay(tmp_path, trace_file, ["cascade-kv"], settle=False)
    assert not res.failed and not res.skipped
    mine = res.systems["cascade-kv"]
    assert mine.measures["promoter_cpu_s"].median >= 0 and "promoter_cpu_s" in dict(res.columns)
    defaults = CascadeConfig()
    assert (mine.values["eviction_order"], mine.values["promotion_threshold"]) == (defaults.eviction_order,
                                                                                   defaults.promotion_threshold)
    assert mine.values["loaded"] + mine.values["gone_before_read"] <= res.settings["reusable_blocks"]
    assert run.counted_reads()[1] == 0  # every byte read is still checked
    assert any("any JSON-lines trace in the Mooncake format" in n for n in res.notes)
    assert not any("settled" in n for n in res.notes)


def test_the_promoter_cpu_is_read_for_threads_of_that_name() -> None:
    cpu = trace_replay.ThreadCpu("test-busy-thread")
    done = threading.Event()

    def spin() -> None:
        x = 0
        for i in range(200_000):
            x += i
        cpu.sample()  # from inside: the thread is alive and has used some CPU
        done.set()

    t = threading.Thread(target=spin, name="test-busy-thread")
    t.start()
    t.join()
    assert done.is_set() and cpu.seen and cpu.seconds > 0
    cpu.sample()  # the thread has exited: its last sample stays
    assert cpu.seconds > 0


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_cli_replays_the_shipped_trace(tmp_path: Path, ranks: int) -> None:
    if ranks > 1:
        require_mpiexec()
    out = tmp_path / "trace.json"
    done = run_bounded([*CLI, "--quick", "--requests", "120", "--systems", "cascade-kv,posix", "--ranks", str(ranks),
                           "--dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(out.read_text())
    assert got["ranks"] == ranks and got["reads_wrong"] == 0 and got["reads_checked"] > 0
    assert got["settings"]["requests"] == 120 and got["settings"]["model"] == "Qwen2.5-7B"
    assert set(got["systems"]) == {"cascade-kv", "posix"}
    for system in got["systems"].values():
        assert system["requests"] == 120 and system["loaded"] <= got["settings"]["reusable_blocks"]
    assert [t["system"] for t in got["targets"]] == ["cascade-kv", "cascade-kv", "cascade-kv (plain LRU)"]


@pytest.mark.parametrize(("option", "value", "message"), [("model", "GPT-9", "unknown model"),
                                                         ("trace", "nosuch.jsonl", "No such file"),
                                                         ("trace", "bad.jsonl", "bad.jsonl:1: not JSON"),
                                                         ("requests", -3, "at least 1")])
def test_bad_options_are_refused_before_any_system_opens(tmp_path: Path, trace_file: Path, option: str, value: object,
                                                         message: str) -> None:
    (tmp_path / "bad.jsonl").write_text("{timestamp: 0}\n")
    run = Run(None, quick=True, root=tmp_path, systems=["posix"], tick=lambda what: None,
              options={"trace": trace_file, option: tmp_path / value if option == "trace" else value})
    with pytest.raises(SuiteError, match=message) as e:  # printed by the CLI without a traceback
        trace_replay.run(run)
    assert isinstance(e.value, CascadeError) and isinstance(e.value, ValueError)  # and one of the error family


def test_a_replay_leaves_nothing_behind(leftovers_of, tmp_path: Path) -> None:
    # --json records the MPI library's version: asking mpi4py for it used to start MPI, whose segment stayed
    assert leftovers_of([*CLI, "--quick", "--requests", "60", "--json", str(tmp_path / "r.json")]) == []
