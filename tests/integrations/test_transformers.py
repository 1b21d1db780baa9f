"""The transformers prefix cache (cascade_kv.integrations.transformers) on a tiny random Llama: restored KV gives
the logits and greedy tokens of a full recompute; keys keep salts, model names and KV layouts apart; a failing
store degrades to recompute. Through an in-process Store and through a real daemon."""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers", reason="the vllm extra (transformers) is not installed (pip install '.[vllm]')")

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from cascade_kv import CascadeConfig, InvalidArgument, Store, connect
from cascade_kv.integrations.transformers import (
    KVLayout,
    PrefixCache,
    generate_with_prefix_cache,
)
from cascade_kv.service.backends import LocalBackend
from cascade_kv.service.served import ServedStore
from cascade_kv.service.server import Server
from cascade_kv.tokens import namespace_for

BLOCK = 64
NEW_TOKENS = 12


def tiny_llama(kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, initializer_range=0.1)
    return LlamaForCausalLM(config).to(torch.float32).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(model, prompt) -> torch.Tensor:
    """Greedy tokens of plain generate, no cache of ours involved."""
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                          do_sample=False)


@pytest.fixture
def store() -> Iterator[Store]:
    with Store(CascadeConfig(host_capacity="64MiB")) as s:
        yield s


def prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return out.logits, out.past_key_values


def greedy(model, prompt, prefix_cache) -> torch.Tensor:
    return generate_with_prefix_cache(model, prompt, prefix_cache, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_restored_prefix_gives_the_logits_of_a_full_forward(model, prompt, store):
    pc = PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK)
    _, cache = prefill(model, prompt[:, :256])
    assert pc.save(prompt[:, :256], cache) == 4

    restored, n = pc.restore(prompt)
    assert n == 256 and restored.get_seq_length() == 256
    with torch.no_grad():
        suffix = model(prompt[:, n:], past_key_values=restored, use_cache=True).logits
    full, _ = prefill(model, prompt)
    assert torch.allclose(suffix, full[:, n:], atol=1e-5)
    assert torch.equal(suffix.argmax(-1), full[:, n:].argmax(-1))


def test_greedy_generation_is_the_same_cold_and_warm(model, prompt, reference, store):
    pc = PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK)
    assert torch.equal(greedy(model, prompt, pc), reference)  # cold: computes all, saves the blocks
    # the finished sequence's full blocks: 300 prompt + 12 generated tokens, the cache holds 311 -> 4 blocks
    assert len(store) == 311 // BLOCK
    assert pc.restore(prompt)[1] == 256
    assert torch.equal(greedy(model, prompt, pc), reference)  # warm: the first 256 tokens restored
    assert len(store) == 311 // BLOCK


def test_save_sends_only_the_blocks_the_store_lacks(model, prompt, store):
    pc = PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK)
    _, cache = prefill(model, prompt)
    assert pc.save(prompt[:, :128], cache) == 2  # ids shorter than the cache: their blocks only
    assert pc.save(prompt[:, :150], cache) == 0
    puts = store.stats().puts
    assert pc.save(prompt, cache) == 2
    assert store.stats().puts - puts == 2
    assert pc.restore(prompt[0, :256])[1] == 192  # one token is always left to compute
    assert pc.restore(prompt[0, :257])[1] == 256
    assert pc.restore(prompt[0, :BLOCK])[1] == 0
    assert pc.restore(prompt[0, :0])[1] == 0
    _, short = prefill(model, prompt[:, :BLOCK - 1])
    assert pc.save(prompt, short) == 0  # the cache holds no full block


def test_salt_and_model_name_keep_caches_apart(model, prompt, store):
    _, cache = prefill(model, prompt)
    a = PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK, salt=b"tenant-a")
    assert a.save(prompt, cache) == 4
    assert len(store) == 0 and len(store.namespace(namespace_for(b"tenant-a"))) == 4  # in the salt's namespace
    assert PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK,
                                 salt=b"tenant-a").restore(prompt)[1] == 256
    for other in ({"model": "tiny-llama", "salt": b"tenant-b"}, {"model": "tiny-llama"},
                  {"model": "tiny-llama-v2", "salt": b"tenant-a"}):
        assert PrefixCache.for_model(store, model, block_tokens=BLOCK, **other).restore(prompt)[1] == 0
    assert PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=2 * BLOCK,
                                 salt=b"tenant-a").restore(prompt)[1] == 0


def test_another_kv_layout_never_matches(model, prompt, store):
    other = tiny_llama(kv_heads=4)
    pc = PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK)
    pc_other = PrefixCache.for_model(store, other, model="tiny-llama", block_tokens=BLOCK)
    assert pc.layout.spec != pc_other.layout.spec
    _, cache = prefill(model, prompt)
    _, other_cache = prefill(other, prompt)
    assert pc.save(prompt, cache) == 4
    assert pc_other.restore(prompt)[1] == 0
    with pytest.raises(InvalidArgument, match="wants"):
        pc.save(prompt, other_cache)  # a cache of another layout is refused, not stored under this spec
    half = PrefixCache(store, KVLayout(2, 2, 16, torch.float16), model="tiny-llama", block_tokens=BLOCK)
    assert half.restore(prompt)[1] == 0


def test_batches_and_foreign_caches_are_refused(model, prompt, store):
    pc = PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK)
    two = prompt[:, :130].repeat(2, 1)
    _, cache2 = prefill(model, two)
    with pytest.raises(InvalidArgument, match="batch 1"):
        pc.restore(two)
    with pytest.raises(InvalidArgument, match="batch 1"):
        pc.save(prompt[0, :130], cache2)
    with pytest.raises(TypeError):
        pc.save(prompt, [(torch.zeros(1), torch.zeros(1))])
    with pytest.raises(InvalidArgument):
        PrefixCache.for_model(store, model, model="", block_tokens=BLOCK)
    with pytest.raises(InvalidArgument):
        generate_with_prefix_cache(model, prompt, pc, past_key_values=DynamicCache())
    assert len(store) == 0


def test_sliding_window_models_are_refused():
    cfg = SimpleNamespace(layer_types=["full_attention", "sliding_attention"], num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
    cfg.get_text_config = lambda decoder: cfg
    with pytest.raises(InvalidArgument, match="sliding_attention"):
        KVLayout.of_model(SimpleNamespace(config=cfg, dtype=torch.float32))


def test_a_failing_store_degrades_to_recompute(model, prompt, reference, caplog):
    store = Store(CascadeConfig(host_capacity="64MiB"))
    pc = PrefixCache.for_model(store, model, model="tiny-llama", block_tokens=BLOCK)
    _, cache = prefill(model, prompt)
    assert pc.save(prompt, cache) == 4
    store.close()
    with caplog.at_level(logging.WARNING, logger="cascade_kv.integrations.transformers"):
        restored, n = pc.restore(prompt)
        assert n == 0 and restored.get_seq_length() == 0
        assert pc.save(prompt, cache) == 0
        assert torch.equal(greedy(model, prompt, pc), reference)
    assert any("StoreClosed" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def daemon() -> Iterator[tuple[Server, object]]:
    # a short directory of its own: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not
    with tempfile.TemporaryDirectory(prefix="ckv-sock-") as d:
        server = Server(LocalBackend(ServedStore(CascadeConfig(host_capacity="64MiB"))), Path(d) / "s.sock").start()
        try:
            with connect(server.path, timeout=30) as client:
                yield server, client
        finally:
            server.stop()


def test_through_a_daemon(model, prompt, reference):
    with daemon() as (server, client):
        pc = PrefixCache.for_model(client, model, model="tiny-llama", block_tokens=BLOCK, salt=b"tenant-a")
        assert torch.equal(greedy(model, prompt, pc), reference)
        # a second client of the same daemon (another engine process) reads what the first saved
        with connect(server.path, timeout=30) as second:
            pc2 = PrefixCache.for_model(second, model, model="tiny-llama", block_tokens=BLOCK, salt=b"tenant-a")
            restored, n = pc2.restore(prompt)
            assert n == 256
            with torch.no_grad():
                suffix = model(prompt[:, n:], past_key_values=restored).logits
            full, _ = prefill(model, prompt)
            assert torch.allclose(suffix, full[:, n:], atol=1e-5)
            assert torch.equal(greedy(model, prompt, pc2), reference)
        server.stop()  # the daemon goes away under a live client: recompute, same tokens
        assert pc.restore(prompt)[1] == 0
        assert torch.equal(greedy(model, prompt, pc), reference)
