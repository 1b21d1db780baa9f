"""``cascade bench contention | strong | weak | rma``, end to end through the CLI on two ranks: the JSON holds
each experiment's figures and every read came back right."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cascade_kv.bench.suite.scaling import rank_counts
from cluster.conftest import require_mpiexec  # tests/ is on sys.path (rootdir-relative test packages)
from tests.procs import run_bounded

CLI = [sys.executable, "-m", "cascade_kv.cli", "bench"]
SYSTEMS = "cascade-kv,posix"


@pytest.fixture(scope="module", autouse=True)
def _mpiexec() -> None:
    require_mpiexec()


def _run(experiment: str, tmp_path: Path, systems: str = SYSTEMS) -> dict:
    out = tmp_path / "result.json"
    done = run_bounded([*CLI, experiment, "--quick", "--ranks", "2", "--systems", systems, "--dir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(out.read_text())
    assert got["ranks"] == 2 and got["reads_checked"] > 0 and got["reads_wrong"] == 0
    assert not got["failed"], got["failed"]
    return got


def test_contention_serves_the_prefix_from_memory_and_every_read(tmp_path: Path) -> None:
    got = _run("contention", tmp_path)
    s = got["settings"]
    assert s["distinct_data_bytes"] > s["memory_all_ranks"]  # more data than memory
    for name in ("cascade-kv", "posix"):
        mine = got["systems"][name]
        assert mine["read_GBps"]["n"] == s["passes"] and mine["served_pct"]["median"] == 100
        assert mine["write_GBps"]["n"] == 1
    cascade = got["systems"]["cascade-kv"]
    assert cascade["prefix_memory_pct"]["median"] == 100  # semantic eviction keeps the prefix in memory
    hits = cascade["tier_hits"]
    reads = s["passes"] * 2 * (s["requests_per_pass"] * s["prefix_blocks"] + s["unique_blocks_per_rank"])
    assert sum(hits.values()) == reads and hits["disk"] > 0 and hits["host"] + hits["remote"] > 0
    assert got["systems"]["posix"]["prefix_memory_pct"] == "cannot tell (page cache)"
    assert [t["key"] for t in got["targets"]] == ["prefix_memory_pct", "read_GBps"]


@pytest.mark.parametrize("experiment", ["strong", "weak"])
def test_scaling_measures_every_power_of_two_rank_count(tmp_path: Path, experiment: str) -> None:
    got = _run(experiment, tmp_path)
    assert got["settings"]["rank_counts"] == [1, 2]
    for name in ("cascade-kv", "posix"):
        mine = got["systems"][name]
        for k in (1, 2):
            assert mine[f"read_GBps[{k}]"]["n"] == got["settings"]["reps"] and mine[f"write_GBps[{k}]"]["n"] == 1
    if experiment == "strong":
        assert got["settings"]["total_blocks"] % 2 == 0
    else:
        assert got["settings"]["blocks_per_rank"] > 0


def test_rma_measures_remote_and_local_reads_beside_bare_mpi_and_again_over_tcp(tmp_path: Path) -> None:
    got = _run("rma", tmp_path, SYSTEMS + ",cascade-kv (TCP)")
    for row, suffix in (("cascade-kv", ""), ("cascade-kv (TCP)", " (TCP)")):
        cascade = got["systems"][row]
        assert cascade["remote_GBps"]["n"] == cascade["local_GBps"]["n"] == got["settings"]["passes"]
        for label in ("4 KiB", "1 MiB", "16 MiB"):
            assert cascade[f"rma_GBps[{label}]"]["n"] > 0
            assert got["ceilings"][f"bare Get {label}{suffix}"]["n"] > 0
            assert got["ceilings"][f"Send/Recv {label}{suffix}"]["n"] > 0
        assert sum(t["system"] == row for t in got["targets"]) == 4  # every target, for each twin
    assert "shared memory" in got["systems"]["cascade-kv"]["transport"]
    assert "btl tcp,self, osc rdma" in got["systems"]["cascade-kv (TCP)"]["transport"]
    assert "posix" in got["skipped"]  # not a memory system: said so, not silently left out


def test_rank_counts_are_the_powers_of_two_up_to_the_job() -> None:
    assert rank_counts(1) == [1] and rank_counts(4) == [1, 2, 4] and rank_counts(6) == [1, 2, 4]


def _result_with_reads(reads: dict[str, dict[int, float]]):
    from cascade_kv.bench.suite.core import Result, SystemResult

    res = Result("strong", "", 4)
    for name, by_k in reads.items():
        mine = res.systems[name] = SystemResult(name)
        for k, rate in by_k.items():
            mine.measure(f"read_GBps[{k}]", "GB/s").samples.extend([rate, rate])
    return res


def test_scaling_targets_the_best_peer_at_each_rank_count() -> None:
    from cascade_kv.bench.suite.scaling import _targets_and_notes, best_peers

    res = _result_with_reads({"cascade-kv": {1: 9.0, 2: 9.0, 4: 9.0},
                              "cascade-kv (no dedup)": {1: 99.0, 2: 99.0, 4: 99.0},  # a variant is no peer
                              "posix": {1: 3.0, 2: 2.0, 4: 1.0}, "hdf5": {1: 1.0, 2: 1.5, 4: 4.0},
                              "lmcache-cpu": {1: 2.0, 2: 5.0}})  # not measured at 4 ranks
    assert best_peers(res, [1, 2, 4]) == {1: "posix", 2: "lmcache-cpu", 4: "hdf5"}
    _targets_and_notes(res, [1, 2, 4])
    assert [(t.key, t.than) for t in res.targets] == [("read_GBps[1]", "posix"), ("read_GBps[2]", "lmcache-cpu"),
                                                     ("read_GBps[4]", "hdf5")]
    res.judge()
    assert [round(t.got, 2) for t in res.targets] == [3.0, 1.8, 2.25]
    alone = _result_with_reads({"cascade-kv": {1: 1.0}, "posix": {1: 2.0}})
    _targets_and_notes(alone, [1])
    assert alone.targets == []  # one rank: nothing to scale


class _Misses:
    """A backend whose every other key misses; it counts its calls."""

    name, tier = "misses", "memory"

    def __init__(self, contents) -> None:
        self.contents, self.calls = contents, 0

    def get_hits(self, keys, outs):
        self.calls += 1
        hits = [int(k) % 2 == 0 for k in keys]
        for k, out, hit in zip(keys, outs, hits):
            if hit:
                self.contents.fill(int(k), out)
        return hits


def test_contention_reads_a_batch_once_whatever_missed() -> None:
    import numpy as np

    from cascade_kv.bench.ceilings import Contents
    from cascade_kv.bench.suite.contention import BATCH, Reads

    contents = Contents(4096, seed=1)
    backend = _Misses(contents)
    reads = Reads()
    keys = [str(i) for i in range(3 * BATCH + 1)]
    outs = [np.empty(4096, np.uint8) for _ in range(BATCH)]
    served = reads.read(backend, keys, range(len(keys)), contents, outs, may_miss=True)
    assert backend.calls == 4  # one call per batch, not one more per key of a batch that missed
    assert served == reads.served == 7 and reads.asked == 13 and contents.checked == 7 and contents.wrong == 0
    with pytest.raises(KeyError):  # a system that keeps everything on disk must not miss
        Reads().read(backend, keys, range(len(keys)), contents, outs, may_miss=False)


def test_rma_twin_job_runs_over_tcp_without_the_running_jobs_launcher_variables() -> None:
    from cascade_kv.bench.suite.rma_tcp import TCP_MCA, transport, twin_environment

    env = twin_environment({"PATH": "/bin", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0", "PRTE_MCA_x": "1",
                            "OMPI_MCA_osc": "^ucx", "CASCADE_COMMAND": "cascade bench rma"})
    assert env == {"PATH": "/bin", "CASCADE_COMMAND": "cascade bench rma", **TCP_MCA}
    assert "btl tcp,self, osc rdma" in transport(env)
    assert "shared memory" in transport({"OMPI_MCA_osc": "^ucx"})


def _in_memory(log: list[tuple[str, str]]):
    """A registry factory of a backend that keeps blocks in a dict and logs each call as (its name, put | get)."""
    from cascade_kv.bench.peers.base import Backend

    class InMemory(Backend):
        tier = "tiered"

        def _open(self, setup) -> None:
            self.blocks: dict[str, bytes] = {}
            self.name = setup.workdir.name

        def put_many(self, keys, blocks, *, prefix=None) -> None:
            log.append((self.name, "put"))
            self.blocks.update((k, bytes(b)) for k, b in zip(keys, blocks))

        def get_hits(self, keys, outs) -> list[bool]:
            log.append((self.name, "get"))
            for k, out in zip(keys, outs):
                out[:] = memoryview(self.blocks[k])
            return [True] * len(keys)

        def contains_many(self, keys) -> list[bool]:
            return [k in self.blocks for k in keys]

        def close(self) -> None: ...

    return InMemory


@pytest.mark.parametrize("experiment", ["contention", "strong", "weak"])
def test_systems_write_first_then_take_every_pass_in_turns(tmp_path: Path, monkeypatch, experiment: str) -> None:
    # one system after another, each for all its passes, let a noisy minute of the machine fall on one system alone
    from cascade_kv.bench.peers import registry
    from cascade_kv.bench.suite import contention, scaling
    from cascade_kv.bench.suite.core import Run

    log: list[tuple[str, str]] = []
    for name in ("a", "b"):
        monkeypatch.setitem(registry.BACKENDS, name, _in_memory(log))
    run = Run(None, quick=True, root=tmp_path, systems=["a", "b"], tick=lambda what: None,
              options={"block": 4096})
    res = {"contention": contention.run, "strong": scaling.run_strong, "weak": scaling.run_weak}[experiment](run)
    assert not res.failed and run.counted_reads()[1] == 0
    passes = res.settings.get("passes") or res.settings["reps"]
    puts = [name for name, op in log if op == "put"]
    assert [op for _, op in log[:len(puts)]] == ["put"] * len(puts)  # every write before the first read
    gets = [name for name, op in log if op == "get"]
    per_pass = gets.count("a") // passes
    turns = [set(gets[i:i + per_pass]) for i in range(0, len(gets), per_pass)]  # one system's pass each
    assert turns == [{name} for p in range(passes) for name in (("a", "b") if p % 2 == 0 else ("b", "a"))]
    assert any("took each" in note and "in turns" in note for note in res.notes)
