"""One row of ``cascade bench engine``: one vLLM engine replays the passes it is given and reports.

Run as a script by the interpreter of the row (``python engine_runner.py SPEC OUT``): the LMCache row runs in
another virtual environment, where cascade_kv is not installed, so this file imports nothing of the package
(the cascade rows name the connector by module path; vLLM imports it in its own processes).

SPEC (JSON) holds the model (its directory, built here from ``model_config`` with a fixed seed when absent,
so every row gets the same weights), the engine's settings (``llm``: keyword arguments of ``LLM`` besides the
model; ``kv_transfer``: a ``KVTransferConfig``'s fields or null) and the passes. A pass is a list of rounds; a
round is a list of prompts (token ids) submitted together in one ``generate``, timed as a whole: a round of
one prompt with ``max_tokens=1`` is the time to first token a user sees. A pass's ``think_s`` is a pause
between its rounds (a user reading an answer), outside the timings. OUT receives, per pass and round,
the wall time and per output its tokens, ``num_cached_tokens`` and vLLM's own timestamps when it fills them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def build_model(directory: Path, config: dict[str, Any]) -> None:
    """A random Llama saved where vLLM reads it; the same seed and config give the same weights."""
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():  # config.json last: its presence says the directory is complete
        if f.name != "config.json":
            f.replace(directory / f.name)
    (tmp / "config.json").replace(directory / "config.json")
    tmp.rmdir()


def _timings(out: Any) -> dict[str, float] | None:
    """vLLM's per-request timestamps (engine-core monotonic seconds), when this build fills them."""
    m = getattr(out, "metrics", None)
    if m is None or not getattr(m, "first_token_ts", 0):
        return None
    return {"scheduled": m.scheduled_ts, "first_token": m.first_token_ts, "last_token": m.last_token_ts,
            "generated": m.num_generation_tokens}


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    model_dir = Path(spec["model_dir"])
    if not (model_dir / "config.json").exists():
        build_model(model_dir, spec["model_config"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kwargs = dict(spec["llm"])
    if spec.get("kv_transfer"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer"])
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, **kwargs)
    report: dict[str, Any] = {"engine_start_s": time.perf_counter() - t0, "passes": {}}
    for p in spec["passes"]:
        params = SamplingParams(temperature=0, max_tokens=p["max_tokens"], ignore_eos=True)
        rounds = []
        for i, prompts in enumerate(p["rounds"]):
            if i and p.get("think_s"):
                time.sleep(p["think_s"])  # a user reading the answer before the next turn: the same for every row
            t = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
            wall = time.perf_counter() - t
            rounds.append({"wall_s": wall, "outputs": [
                {"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0, "vllm": _timings(o)}
                for o in outs]})
        report["passes"][p["name"]] = rounds
        print(f"pass {p['name']}: {len(rounds)} rounds", file=sys.stderr, flush=True)
    # vLLM writes the connectors' counters (stats_path) as its processes shut down: shut down before exiting
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
    Path(out_path).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn: nothing may run on import
    sys.exit(main(sys.argv[1], sys.argv[2]))
