"""One vLLM engine for the connector's tests, run as its own process (vLLM starts its engine core with spawn).

``python vllm_runner.py SPEC.json`` builds (or reuses) a small random Llama in ``spec["model"]``, starts
``LLM`` with or without the CascadeConnector, runs ``spec["steps"]`` in order and prints one JSON line per
prompt: its output tokens and vLLM's ``num_cached_tokens``. A step ``{"kill": PID}`` SIGKILLs that process
(the cache daemon) between two prompts. The last line is ``{"done": true}``.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # the same compute threads with and without a connector


def build_model(path: Path) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   initializer_range=0.1)  # 0.1: varied greedy tokens (0.02 repeats one)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def wait_keys(socket: str, n: int, limit: float = 60.0) -> None:
    """Until the daemon holds ``n`` keys. The daemon offers no event for a save landing, so this polls; the
    10 ms pause leaves the cores to the threads doing the saves, and ``limit`` only turns a hang into a failure
    (nothing here asserts how long the saves took)."""
    import time

    import cascade_kv

    with cascade_kv.connect(socket) as c:
        deadline = time.monotonic() + limit
        while c.stats(all_namespaces=True).keys < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"the daemon holds {c.stats(all_namespaces=True).keys} keys after {limit} s, not {n}")
            time.sleep(0.01)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    model = Path(spec["model"])
    if not (model / "config.json").exists():
        build_model(model)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = {}
    if spec.get("connector") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="CascadeConnector", kv_connector_module_path="cascade_kv.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=spec["connector"])
    if spec.get("engine_id"):
        kw["kv_transfer_config"].engine_id = spec["engine_id"]
    llm = LLM(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=4096, enforce_eager=True,
              enable_prefix_caching=False, seed=0, **kw)
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8))
    for step in spec["steps"]:
        if "wait_keys" in step:  # saves are asynchronous: wait until the daemon holds them (polled: see wait_keys)
            wait_keys(step["socket"], step["wait_keys"])
            continue
        if "kill" in step:
            os.kill(step["kill"], signal.SIGKILL)
            print(json.dumps({"killed": step["kill"]}), flush=True)
            continue
        prompt = TokensPrompt(prompt_token_ids=step["tokens"])
        if step.get("salt"):
            prompt["cache_salt"] = step["salt"]
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        print(json.dumps({"name": step["name"], "tokens": list(out.outputs[0].token_ids),
                          "cached": out.num_cached_tokens or 0}), flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
