"""CascadeConnector's two halves without an engine: the scheduler's arithmetic of matched tokens, loads and saves
(vLLM blocks against stored blocks of ``block_tokens``), and the worker's moves between paged cache tensors and a
real daemon, on the CPU layout ``[blocks, kv_heads, block_size, 2*head_dim]`` and a GPU-like ``[2, blocks, ...]``.
The engine tests (test_vllm.py) run it inside vLLM; these pin down the index math they cannot reach."""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install '.[vllm]')")

import torch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

from cascade_kv import ConfigError, connect  # noqa: E402
from cascade_kv.integrations.vllm import CascadeConnector  # noqa: E402
from cascade_kv.service.backends import LocalBackend  # noqa: E402
from cascade_kv.service.served import ServedStore  # noqa: E402
from cascade_kv.service.server import Server  # noqa: E402
from cascade_kv.tokens import prefix_keys  # noqa: E402

VBLOCK, LAYERS, HEADS, DIM2, NUM_BLOCKS = 16, 3, 2, 8, 40


@pytest.fixture
def sock():
    with tempfile.TemporaryDirectory(prefix="ckv-") as d:
        server = Server(LocalBackend(ServedStore(host_capacity="16MiB")), Path(d) / "s.sock").start()
        try:
            yield str(server.path)
        finally:
            server.stop()


def make(role: KVConnectorRole, sock: str, **extra: object) -> CascadeConnector:
    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"socket": sock, "prefix_min_requests": 0,
                                                                      **extra}, engine_id="test"),
        cache_config=SimpleNamespace(block_size=VBLOCK), model_config=SimpleNamespace(model="tiny", revision=None))
    return CascadeConnector(cfg, role, SimpleNamespace(num_blocks=NUM_BLOCKS, kv_cache_groups=[]))


def request(tokens: list[int], rid: str = "r") -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, prompt_token_ids=tokens, all_token_ids=tokens, cache_salt=None)


def step(rid: str, block_ids: list[int], computed: int, scheduled: int) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=rid, block_ids=(block_ids,), num_computed_tokens=computed)],
        num_scheduled_tokens={rid: scheduled}, finished_req_ids=set(),
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                              num_computed_tokens=[]))


def caches(layout: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, HEADS, VBLOCK, DIM2) if layout == "cpu" else (2, NUM_BLOCKS, VBLOCK, HEADS, DIM2 // 2)
    return {f"layer.{i}": torch.randn(shape, generator=g) for i in range(LAYERS)}


def block(c: dict[str, torch.Tensor], layout: str, b: int) -> torch.Tensor:
    """Every layer's KV of vLLM block ``b``, stacked."""
    return torch.stack([t[b] if layout == "cpu" else t[:, b] for t in c.values()])


def test_block_tokens_must_be_a_multiple_of_the_vllm_block(sock):
    with pytest.raises(ConfigError, match="multiple of vLLM's block size 16"):
        make(KVConnectorRole.SCHEDULER, sock, block_tokens=24)


@pytest.mark.parametrize("layout", ["cpu", "gpu-like"])
@pytest.mark.parametrize("group", [1, 2])
def test_saved_blocks_load_back_into_other_block_ids_bit_for_bit(sock, layout, group):
    tokens = list(range(1, 6 * VBLOCK + 5))  # 6 full vLLM blocks and 4 tokens
    sched = make(KVConnectorRole.SCHEDULER, sock, block_tokens=group * VBLOCK)
    worker = make(KVConnectorRole.WORKER, sock, block_tokens=group * VBLOCK)
    src = caches(layout, seed=1)
    worker.register_kv_caches(src)
    # first request: nothing stored; its prefill computes every token, and the full blocks are saved
    assert sched.get_num_new_matched_tokens(request(tokens), 0) == (0, False)
    ids1 = [3, 7, 1, 9, 12, 5, 20]
    sched.update_state_after_alloc(request(tokens), SimpleNamespace(get_block_ids=lambda: (ids1,)), 0)
    meta = sched.build_connector_meta(step("r", ids1, 0, len(tokens)))
    assert [len(m.keys) for m in meta.saves] == [6 // group] and not meta.loads
    worker.bind_connector_metadata(meta)
    for name, t in src.items():
        worker.save_kv_layer(name, t, None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    worker.shutdown()  # waits for the background saver
    # a second request with the same prompt, in another engine: vLLM holds its first block itself
    sched2 = make(KVConnectorRole.SCHEDULER, sock, block_tokens=group * VBLOCK)
    loader = make(KVConnectorRole.WORKER, sock, block_tokens=group * VBLOCK)
    dst = caches(layout, seed=2)
    before = {n: t.clone() for n, t in dst.items()}
    loader.register_kv_caches(dst)
    got, async_ = sched2.get_num_new_matched_tokens(request(tokens, "s"), VBLOCK)
    assert (got, async_) == (6 * VBLOCK - VBLOCK, False)  # every full block but the one vLLM computed; never the last token
    ids2 = [30, 31, 32, 33, 34, 35, 36]
    sched2.update_state_after_alloc(request(tokens, "s"), SimpleNamespace(get_block_ids=lambda: (ids2,)), got)
    meta2 = sched2.build_connector_meta(step("s", ids2, VBLOCK, 4))
    (load,) = meta2.loads
    # whole stored blocks are fetched; a vLLM block inside one that vLLM computed itself is skipped (-1)
    assert load.block_ids == (ids2[1:6] if group == 1 else [-1, 31, 32, 33, 34, 35])
    loader.bind_connector_metadata(meta2)
    loader.start_load_kv(None)
    assert loader.get_block_ids_with_load_errors() == set()
    for i in range(1, 6):
        assert torch.equal(block(dst, layout, ids2[i]), block(src, layout, ids1[i])), i
    assert torch.equal(block(dst, layout, ids2[0]), block(before, layout, ids2[0]))  # vLLM's own block untouched
    assert torch.equal(block(dst, layout, ids2[6]), block(before, layout, ids2[6]))
    loader.shutdown()
    sched2.shutdown()


def test_a_load_that_fails_reports_its_blocks_for_recompute(sock):
    tokens = list(range(1, 3 * VBLOCK + 2))
    sched = make(KVConnectorRole.SCHEDULER, sock)
    keys = prefix_keys(tokens[:3 * VBLOCK], VBLOCK, model="tiny@", kv_spec=sched._kv_spec)
    with connect(sock) as c:  # stored, but with the wrong shape: the load cannot fit it into the cache
        c.put_many(keys, [torch.zeros(5) for _ in keys])
    got, _ = sched.get_num_new_matched_tokens(request(tokens), 0)
    assert got == 3 * VBLOCK
    ids = [4, 5, 6, 7]
    sched.update_state_after_alloc(request(tokens), SimpleNamespace(get_block_ids=lambda: (ids,)), got)
    worker = make(KVConnectorRole.WORKER, sock)
    worker.register_kv_caches(caches("cpu", 3))
    worker.bind_connector_metadata(sched.build_connector_meta(step("r", ids, 0, 1)))
    worker.start_load_kv(None)  # never raises into the engine: the blocks are reported instead
    assert worker.get_block_ids_with_load_errors() == {4, 5, 6}
    worker.shutdown()
    sched.shutdown()
