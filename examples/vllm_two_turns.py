"""Two turns of one conversation on vLLM with cascade-kv: the second turn skips the prefill the first paid for.

    pip install '.[vllm]' && pip uninstall -y torchvision torchaudio torchcodec    # vLLM's CPU build, here
    cascade serve --host-capacity 2GiB &                                          # the node's cache
    python examples/vllm_two_turns.py [MODEL]                                     # default: a small random Llama

No model can be downloaded on an offline machine, so without MODEL the example builds a small random Llama
(its tokens are nonsense, its timings are real). Prompts are token ids (``skip_tokenizer_init``). vLLM's own
prefix cache is turned off, so every token reused comes from cascade-kv. Prints, per turn, the prompt's
length, the tokens served from the cache and the time to the first token.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB for vLLM's own KV cache on a CPU


def random_llama(path: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
                                   initializer_range=0.1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def main() -> None:
    scratch = None if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="llama-")
    try:
        run(sys.argv[1] if scratch is None else random_llama(scratch))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run(model: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from cascade_kv.service.server import default_socket_path

    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=8192, enforce_eager=True,
              enable_prefix_caching=False,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="CascadeConnector", kv_connector_module_path="cascade_kv.integrations.vllm",
                  kv_role="kv_both", kv_load_failure_policy="recompute",
                  # the daemon started above (at the default per-user socket); leave "socket" out to give the
                  # engine a private daemon of its own instead
                  kv_connector_extra_config={"socket": str(default_socket_path())}))
    system = list(range(10, 1034))  # a 1,024-token system prompt
    turn1 = system + list(range(2000, 2040))
    params = SamplingParams(temperature=0, max_tokens=32)
    history: list[int] = []
    for n, user in enumerate((turn1, list(range(3000, 3030))), 1):
        prompt = history + user
        t0 = time.perf_counter()
        first = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(temperature=0, max_tokens=1),
                             use_tqdm=False)[0]
        ttft = time.perf_counter() - t0
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        print(f"turn {n}: prompt {len(prompt)} tokens, {first.num_cached_tokens or 0} from the cache, "
              f"time to first token {ttft * 1e3:.0f} ms")
        history = prompt + list(out.outputs[0].token_ids)


if __name__ == "__main__":
    main()
