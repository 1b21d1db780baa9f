"""``cascade bench engine``: vLLM recomputing less with cascade-kv, against vLLM alone and LMCache.

Every row is one vLLM engine in its own process (:mod:`.engine_runner`) on the same random Llama, with the
same CPU reservation and KV space, fp32, eager, greedy, prompts given as token ids. Rows:

* ``vllm``: no connector, no prefix caching: every prompt is computed in full (the baseline; every other
  row's tokens must equal its tokens, or the run exits 1);
* ``vllm-prefix-cache``: vLLM's own prefix caching, no connector;
* ``cascade-kv``: the :class:`~cascade_kv.integrations.vllm.CascadeConnector` on a ``cascade serve`` daemon
  started here, vLLM's prefix caching off, so every reuse comes from cascade-kv;
* ``cascade-kv-restart``: a second engine process on the same daemon replays what the first one ran: every
  block the first stored must hit;
* ``lmcache-mp``: LMCache's multi-process connector, run by this interpreter when lmcache is importable here,
  else by the one ``CASCADE_LMCACHE_PYTHON`` names (a virtual environment with lmcache 0.5.6: LMCache pins
  numpy and pulls CUDA packages, so it is best kept apart); skipped with the reason otherwise.

Each engine replays, in order: a warm-up prompt; **miss** prompts (unique: nothing cached anywhere), one at a
time, for the time to first token, and more of them with a longer output for decode tokens/s; the **turns**
of a multi-turn workload shaped like the shipped Mooncake trace (a shared system prompt, conversations
whose turns extend the previous ones), one request at a time with ``max_tokens=1`` (the TTFT a user sees;
first turns are "cold", later ones "warm"); **probe** pairs, a 1,056-token prompt and then the same first
1,024 tokens with another ending (the issue's 1,024-token cached prefix); the same pairs **back to back**;
and a second workload of the same shape submitted a turn of every conversation at a time, for requests/s.

Turns and probes leave a pause between requests (``think_s``, a user reading the answer; the same for every
row, outside the timings). Without it a connector that saves asynchronously — off the critical path, as the
issue asks — can be asked for a block a few milliseconds before its save lands; the back-to-back pairs
measure exactly that case, so neither reading is hidden.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core import MiB, Measure, Result, Run, SuiteError, SystemResult, Target
from .serve import daemon

ROWS = ("vllm", "vllm-prefix-cache", "cascade-kv", "cascade-kv-restart", "lmcache-mp")
DEFAULT_SYSTEMS = ROWS
VARIANTS = {
    "vllm": "vLLM, no connector, no prefix caching (the baseline: always run)",
    "vllm-prefix-cache": "vLLM's own prefix caching",
    "cascade-kv": "CascadeConnector on a shared cascade serve daemon, vLLM's prefix caching off",
    "cascade-kv-restart": "a second engine on the same daemon replays the cascade-kv row's work",
    "lmcache-mp": "LMCache's multi-process connector (CASCADE_LMCACHE_PYTHON names its interpreter)",
}
BASELINE = "vllm"
BLOCK = 128  # vLLM's block size on CPU: the unit of every cache here
LMCACHE_ENV = "CASCADE_LMCACHE_PYTHON"
RUNNER = Path(__file__).with_name("engine_runner.py")


@dataclass(frozen=True, slots=True)
class Sizes:
    model: dict[str, Any]  # LlamaConfig fields
    system: int  # tokens of the shared system prompt
    conversations: int
    turns: int
    user: tuple[int, int]  # tokens a user adds per turn (range)
    reply: int  # tokens of the assistant's answer carried into the next turn
    probes: int  # 1,024-token-prefix pairs
    misses: int  # unique prompts timed for TTFT (and as many for decode)
    miss_tokens: int
    decode: int  # tokens generated per decode request
    output: int  # tokens generated per request of the throughput pass
    kv_space_gib: int
    think_s: float  # pause between the requests of the turns and probe passes (a user reading the answer)

    @classmethod
    def for_run(cls, quick: bool) -> "Sizes":
        if quick:
            model = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
            return cls(model, 256, 2, 2, (96, 160), 32, 1, 2, 1056, 16, 4, 1, 0.2)
        # ~27M parameters (as engines.md measured): prefill of 1k tokens ~0.5 s on one core, so compute dominates
        model = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=4)
        return cls(model, 512, 6, 4, (160, 288), 64, 5, 5, 1056, 64, 16, 2, 0.5)

    def model_config(self) -> dict[str, Any]:
        # initializer_range 0.1: greedy decoding of a random model with the default 0.02 repeats one token
        return {**self.model, "max_position_embeddings": 4096, "initializer_range": 0.1, "tie_word_embeddings": False}


# ---------------------------------------------------------------------------------------------- the workload
@dataclass
class Workload:
    turns: list[list[int]]  # prompts in submission order (conversation by conversation, turn by turn)
    first: list[bool]  # the request is a conversation's first turn
    rounds: list[list[list[int]]]  # a second workload of the same shape, one round per turn index
    probe_cold: list[list[int]]
    probe_warm: list[list[int]]
    b2b_cold: list[list[int]]  # probe pairs of their own for the back-to-back pass (nothing of them cached before)
    b2b_warm: list[list[int]]
    misses: list[list[int]]
    decodes: list[list[int]]
    warmup: list[int] = field(default_factory=list)


def conversations(rng: np.random.Generator, s: Sizes, vocab: int) -> list[list[list[int]]]:
    """Conversations sharing one system prompt; turn k's prompt is turn k-1's plus its reply plus a user turn."""
    system = rng.integers(1, vocab, s.system).tolist()
    out = []
    for _ in range(s.conversations):
        prompt, turns = list(system), []
        for t in range(s.turns):
            if t:
                prompt += rng.integers(1, vocab, s.reply).tolist()
            prompt += rng.integers(1, vocab, int(rng.integers(s.user[0], s.user[1] + 1))).tolist()
            turns.append(list(prompt))
        out.append(turns)
    return out


def workload(s: Sizes) -> Workload:
    vocab = s.model["vocab_size"]
    rng = np.random.default_rng(11)
    convs = conversations(rng, s, vocab)
    turns = [p for c in convs for p in c]
    first = [t == 0 for c in convs for t in range(len(c))]
    other = conversations(rng, s, vocab)
    rounds = [[c[t] for c in other] for t in range(s.turns)]
    cold, warm = [], []
    for _ in range(2 * s.probes):
        prefix = rng.integers(1, vocab, 1024).tolist()
        cold.append(prefix + rng.integers(1, vocab, 32).tolist())
        warm.append(prefix + rng.integers(1, vocab, 32).tolist())
    misses = [rng.integers(1, vocab, s.miss_tokens).tolist() for _ in range(2 * s.misses)]
    n = s.probes
    return Workload(turns, first, rounds, cold[:n], warm[:n], cold[n:], warm[n:], misses[:s.misses],
                    misses[s.misses:], rng.integers(1, vocab, 200).tolist())


def shape_lines(w: Workload) -> list[str]:
    """The workload's sizes beside the shipped trace's: prompt lengths and the share of prompt blocks that
    repeat a block an earlier request read (the trace in its 512-token blocks, this one in 128)."""
    from ..trace import load_trace, prefix_lengths

    trace = load_trace()
    reused = sum(prefix_lengths(trace))
    reads = sum(len(r.hash_ids) for r in trace.requests)
    lengths = [r.input_length for r in trace.requests]

    def mine(prompts: list[list[int]]) -> tuple[float, int, int]:
        seen: set[tuple[int, ...]] = set()
        hit = total = 0
        for p in prompts:
            blocks = [tuple(p[:(i + 1) * BLOCK]) for i in range(len(p) // BLOCK)]
            run = 0
            for b in blocks:
                if b not in seen:
                    break
                run += 1
            hit += run
            total += len(blocks)
            seen.update(blocks)
        return hit / max(total, 1), min(map(len, prompts)), max(map(len, prompts))

    share, lo, hi = mine(w.turns)
    return [f"trace (shipped Mooncake): {len(lengths):,} requests, prompts {min(lengths):,}-{max(lengths):,} tokens "
            f"(median {statistics.median(lengths):,.0f}); {reused / reads:.0%} of prompt blocks reuse an earlier "
            f"request's prefix",
            f"workload: {len(w.turns)} requests ({sum(w.first)} conversations x {len(w.turns) // sum(w.first)} turns, "
            f"one shared system prompt), prompts {lo:,}-{hi:,} tokens (median "
            f"{statistics.median(map(len, w.turns)):,.0f}); {share:.0%} of prompt blocks reuse an earlier request's "
            f"prefix; throughput pass: {sum(map(len, w.rounds))} requests of the same shape in {len(w.rounds)} rounds"]


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    name: str
    python: str
    enable_prefix_caching: bool = False
    kv_transfer: dict[str, Any] | None = None
    passes: tuple[str, ...] = ("warmup", "miss", "decode", "turns", "probe", "b2b", "rounds")
    stats_dir: Path | None = None


def passes_of(w: Workload, s: Sizes, names: tuple[str, ...]) -> list[dict[str, Any]]:
    one = lambda prompts: [[p] for p in prompts]  # noqa: E731 - one request at a time
    table = {
        "warmup": (one([w.warmup]), 2, 0.0),
        "miss": (one(w.misses), 1, 0.0),
        "decode": (one(w.decodes), 1 + s.decode, 0.0),
        "turns": (one(w.turns), 1, s.think_s),
        "probe": ([[p] for pair in zip(w.probe_cold, w.probe_warm) for p in pair], 1, s.think_s),
        # the warm request the moment the cold one answered: what an asynchronous save can have stored by then
        "b2b": ([[p] for pair in zip(w.b2b_cold, w.b2b_warm) for p in pair], 1, 0.0),
        "rounds": (w.rounds, s.output, 0.0),
    }
    return [{"name": n, "rounds": table[n][0], "max_tokens": table[n][1], "think_s": table[n][2]} for n in names]


def run_row(r: Run, row: Row, s: Sizes, w: Workload, model_dir: Path) -> dict[str, Any]:
    """Run the row's engine process; its report plus the connector's counters (summed over its processes)."""
    work = Path(tempfile.mkdtemp(prefix=f"{row.name}-", dir=r.root))
    spec = {"model_dir": str(model_dir), "model_config": s.model_config(), "kv_transfer": row.kv_transfer,
            "llm": {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096, "seed": 0,
                    "enable_prefix_caching": row.enable_prefix_caching, "disable_log_stats": False},
            "passes": passes_of(w, s, row.passes)}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_KVCACHE_SPACE": str(s.kv_space_gib),
           "TOKENIZERS_PARALLELISM": "false",
           # a temp dir of the row's own, removed after it: vLLM leaves its ZMQ socket files there and torch its
           # compiler's cache, even for an eager engine (not under --dir: a socket's path must stay short)
           "TMPDIR": tempfile.mkdtemp(prefix="ckv-engine-")}
    r.tick(f"{row.name}: engine")
    try:
        return _run_engine(row, work, env)
    finally:
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)


def _run_engine(row: Row, work: Path, env: dict[str, str]) -> dict[str, Any]:
    # output to a file, not a pipe: LMCache's auto-started server inherits it and outlives the engine, and
    # reading a pipe to its end would wait for that server
    with open(work / "engine.log", "w+") as log:
        proc = subprocess.run([row.python, str(RUNNER), str(work / "spec.json"), str(work / "out.json")], env=env,
                              cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
        if proc.returncode != 0 or not (work / "out.json").exists():
            log.seek(0)
            raise SuiteError(f"{row.name}: the engine exited {proc.returncode}: {log.read()[-3000:]}")
    report = json.loads((work / "out.json").read_text())
    counters: dict[str, float] = {}
    files = stats_files(row.stats_dir) if row.stats_dir else []
    report["connector_files"] = [f.name for f in files]
    for f in files:
        for k, v in json.loads(f.read_text()).items():
            counters[k] = counters.get(k, 0) + v
        f.unlink()
    report["connector"] = counters
    return report


def stats_files(directory: Path, wait_s: float = 15.0) -> list[Path]:
    """The connector's counter files, one per process role. The engine-core process that writes the scheduler's
    can still be shutting down when the runner has exited: wait for both roles, up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        files = sorted(directory.glob("stats-*.json"))
        if {"scheduler", "worker"} <= {f.name.split("-")[1] for f in files} or time.monotonic() > deadline:
            return files
        time.sleep(0.2)


def lmcache_row(python: str) -> Row:
    return Row("lmcache-mp", python, kv_transfer={
        "kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.mp.autostart": True,
            # engine_driven: without it vLLM hangs on CPU (engines.md)
            "lmcache.mp.autostart.server_args": "--l1-size-gb 2 --eviction-policy LRU "
                                                "--supported-transfer-mode engine_driven"}})


def lmcache_servers() -> set[int]:
    """Pids of running LMCache server processes (its auto-started server outlives vLLM)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"lmcache" in cmd and d.name != str(os.getpid()):
                out.add(int(d.name))
    return out


# ---------------------------------------------------------------------------------------------- figures
class EngineResult(Result):
    def judge(self) -> None:
        super().judge()
        for t in self.targets:
            if isinstance(t, AtMost) and t.got is not None:
                t.passed = t.got <= t.factor


@dataclass
class AtMost(Target):
    """A ratio the figure must stay under (a latency against another's): the suite's Target knows only 'at least'."""


def _ms(xs: list[float]) -> Measure:
    return Measure("ms", [x * 1e3 for x in xs])


def _p99(xs: list[float]) -> Measure:
    ranked = sorted(xs)
    return Measure("ms", [ranked[min(len(ranked) - 1, int(0.99 * len(ranked)))] * 1e3] if ranked else [])


def figures(res: Result, name: str, report: dict[str, Any], w: Workload, restart: bool) -> SystemResult:
    row = res.systems.setdefault(name, SystemResult(name))
    row.setup_seconds = report["engine_start_s"]
    p = report["passes"]
    if "turns" in p:
        walls = [rd["wall_s"] for rd in p["turns"]]
        cold = [t for t, f in zip(walls, w.first) if f]
        warm = [t for t, f in zip(walls, w.first) if not f]
        row.measures.update(ttft_cold=_ms(cold), ttft_cold_p99=_p99(cold), ttft_warm=_ms(warm),
                            ttft_warm_p99=_p99(warm))
        row.values["p99"] = f"{row.measures['ttft_cold_p99'].median:,.0f} / {row.measures['ttft_warm_p99'].median:,.0f} ms"
        cached = [rd["outputs"][0]["cached"] for rd in p["turns"]]
        usable = [(len(t) - 1) // BLOCK * BLOCK for t in w.turns]
        row.values["reused_tokens"] = sum(cached)
        row.values["reused"] = f"{sum(cached):,} ({sum(cached) / sum(map(len, w.turns)):.0%})"
        if restart:  # every block of every prompt was stored by the first engine: each must hit
            row.values["restart_hits"] = f"{sum(cached) // BLOCK} of {sum(usable) // BLOCK} blocks"
            row.measures["restart_hit_share"] = Measure("", [sum(cached) / max(sum(usable), 1)])
    if "probe" in p:
        walls = [rd["wall_s"] for rd in p["probe"]]
        row.measures.update(ttft_1024_cold=_ms(walls[0::2]), ttft_1024_warm=_ms(walls[1::2]))
        row.values["probe_cached"] = [rd["outputs"][0]["cached"] for rd in p["probe"][1::2]]
    if "b2b" in p:
        row.measures["ttft_1024_b2b"] = _ms([rd["wall_s"] for rd in p["b2b"]][1::2])
        row.values["b2b_cached"] = [rd["outputs"][0]["cached"] for rd in p["b2b"][1::2]]
    if "miss" in p:
        row.measures["miss_ttft"] = _ms([rd["wall_s"] for rd in p["miss"]])
        row.values["miss_cached"] = sum(rd["outputs"][0]["cached"] for rd in p["miss"])
    if "decode" in p:
        row.measures["miss_decode"] = Measure("tok/s", [decode_rate(rd) for rd in p["decode"]])
        row.values["decode_timed_by"] = ("vLLM's token timestamps" if all(rd["outputs"][0].get("vllm")
                                                                           for rd in p["decode"]) else "wall time")
    if "rounds" in p:
        n = sum(len(rd["outputs"]) for rd in p["rounds"])
        row.measures["throughput"] = Measure("req/s", [n / sum(rd["wall_s"] for rd in p["rounds"])])
    c = report.get("connector") or {}
    if c:
        row.values.update(kv_load=f"{c.get('load_seconds', 0):.2f} s / {int(c.get('load_blocks', 0))}",
                          kv_save=f"{c.get('save_seconds', 0):.2f} s / {int(c.get('save_blocks', 0))}",
                          connector=c)
    return row


def decode_rate(rd: dict[str, Any]) -> float:
    """Tokens/s after the first token: from vLLM's timestamps where it fills them, else the round's wall time."""
    o = rd["outputs"][0]
    t = o.get("vllm")
    if t and t["last_token"] > t["first_token"]:
        return (t["generated"] - 1) / (t["last_token"] - t["first_token"])
    return len(o["tokens"]) / rd["wall_s"]


def check_tokens(base: dict[str, Any], other: dict[str, Any], name: str, tally: Any, res: Result) -> None:
    """Every output of ``other`` against the baseline's for the same prompts (greedy: they must be equal)."""
    for pass_name, rounds in other["passes"].items():
        if pass_name not in base["passes"]:
            continue
        for i, (a, b) in enumerate(zip(base["passes"][pass_name], rounds)):
            for j, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
                tally.checked += 1
                if x["tokens"] != y["tokens"]:
                    tally.wrong += 1
                    res.notes.append(f"TOKENS DIFFER: {name}, pass {pass_name}, round {i}, request {j}: "
                                     f"{y['tokens'][:8]} vs {x['tokens'][:8]} without a connector")


@dataclass
class Tally:
    checked: int = 0
    wrong: int = 0


# ---------------------------------------------------------------------------------------------- the experiment
def run(r: Run) -> Result:
    if r.size > 1:
        raise SuiteError("cascade bench engine runs engines on one node: run it without --ranks")
    s = Sizes.for_run(r.quick)
    w = workload(s)
    wanted = [n for n in ROWS if n in r.systems or n == BASELINE]
    res = EngineResult("engine", "vLLM time to first token and throughput with cascade-kv, vLLM alone and LMCache",
                       1, settings={"model": s.model_config(), "block_tokens": BLOCK, "kv_space_gib": s.kv_space_gib,
                                    "reserved_cpus": 1, "dtype": "float32", "rows": wanted,
                                    "think_s": s.think_s, "python": sys.executable})
    res.columns = [("ttft_cold", "TTFT cold"), ("ttft_warm", "TTFT warm"), ("p99", "p99 cold / warm"),
                   ("ttft_1024_cold", "1,056 cold"), ("ttft_1024_warm", "1,024 cached"),
                   ("ttft_1024_b2b", "1,024 b2b"), ("reused", "reused tokens"), ("kv_load", "KV load"),
                   ("kv_save", "KV save"), ("throughput", "throughput"), ("miss_ttft", "miss TTFT"),
                   ("miss_decode", "miss decode")]
    res.notes += [
        "TTFT: one request at a time, max_tokens=1, wall time of generate(); cold: a conversation's first turn "
        "(only the shared system prompt can be cached), warm: its later turns; "
        f"{s.think_s:g} s between requests (a user reading), outside the timings",
        "1,056 cold / 1,024 cached: a 1,056-token prompt, then its first 1,024 tokens with another ending; "
        "b2b: the same with the second request sent the moment the first answered",
        "reused tokens: num_cached_tokens over the turns; KV load/save: the connector's counters over the whole "
        "row (seconds / blocks); throughput: a second workload of the same shape, a turn of every conversation at a "
        f"time, {s.output} tokens out; miss: unique prompts ({s.miss_tokens} tokens), decode {s.decode} tokens"]
    res.notes += shape_lines(w)
    if importlib.util.find_spec("vllm") is None:  # `cascade bench all` on a machine without the [vllm] extra
        res.skipped.update({n: "vLLM not installed (pip install 'cascade-kv[vllm]')" for n in wanted})
        return res
    tally = Tally()
    r.contents.append(tally)  # type: ignore[arg-type]  # counted with the suite's checks: wrong tokens exit 1
    model_dir = r.root / "model"
    reports: dict[str, dict[str, Any]] = {}

    def one(row: Row) -> None:
        try:
            reports[row.name] = run_row(r, row, s, w, model_dir)
        except SuiteError as e:
            if row.name == BASELINE:
                raise
            res.failed[row.name] = str(e)
            return
        figures(res, row.name, reports[row.name], w, row.name == "cascade-kv-restart")
        if row.name != BASELINE:
            check_tokens(reports[BASELINE], reports[row.name], row.name, tally, res)

    one(Row(BASELINE, sys.executable))
    if "vllm-prefix-cache" in wanted:
        one(Row("vllm-prefix-cache", sys.executable, enable_prefix_caching=True))
    if "cascade-kv" in wanted or "cascade-kv-restart" in wanted:
        # the daemon holds everything both engines store (no eviction: the restart row expects every block)
        with daemon(2048 * MiB if not r.quick else 512 * MiB) as d:
            stats = r.root / "connector-stats"
            stats.mkdir()
            kv = {"kv_connector": "CascadeConnector", "kv_connector_module_path": "cascade_kv.integrations.vllm",
                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                  "kv_connector_extra_config": {"socket": str(d.socket), "stats_path": str(stats / "stats.json")}}
            one(Row("cascade-kv", sys.executable, kv_transfer=kv, stats_dir=stats))
            if "cascade-kv-restart" in wanted and "cascade-kv" in reports:
                one(Row("cascade-kv-restart", sys.executable, kv_transfer=kv, stats_dir=stats,
                        passes=("warmup", "turns", "rounds")))
            elif "cascade-kv-restart" in wanted:
                res.skipped["cascade-kv-restart"] = "the cascade-kv row did not run"
    if "lmcache-mp" in wanted:
        python = os.environ.get(LMCACHE_ENV)
        if not python and importlib.util.find_spec("lmcache") is not None:
            python = sys.executable  # installed beside vLLM in this interpreter
        if not python:
            res.skipped["lmcache-mp"] = (f"LMCache not installed (not importable here, and {LMCACHE_ENV} names no "
                                         f"interpreter that has it)")
        else:
            before = lmcache_servers()
            try:
                one(lmcache_row(python))
            finally:
                for pid in lmcache_servers() - before:  # the server this row's engine started, by its pid
                    try:
                        os.kill(pid, 15)
                    except ProcessLookupError:
                        pass
    targets(res)
    return res


def targets(res: Result) -> None:
    res.targets += [
        AtMost(n, "ttft_1024_warm", 0.25, "", "warm TTFT at a 1,024-token cached prefix <= 0.25x its cold TTFT")
        for n in ("vllm-prefix-cache", "cascade-kv", "lmcache-mp") if n in res.systems]
    for t in res.targets:  # the cold TTFT of the same row is the reference: held as a ceiling per row
        res.ceilings[f"{t.system} cold 1,056"] = res.systems[t.system].measures["ttft_1024_cold"]
        t.than = f"{t.system} cold 1,056"
    res.targets.append(AtMost("cascade-kv", "ttft_1024_warm", 0.5, "lmcache-mp", "warm TTFT <= 0.5x LMCache's"))
    res.targets.append(Target("cascade-kv-restart", "restart_hit_share", 1.0, "",
                              "after a restart every stored prefix block hits (share of blocks)"))
    res.targets.append(AtMost("cascade-kv", "miss_ttft", 1.05, BASELINE, "on a miss TTFT within 5 % of no connector"))
    res.targets.append(Target("cascade-kv", "miss_decode", 0.95, BASELINE,
                              "on a miss decode tokens/s within 5 % of no connector"))
