"""``cascade bench models``: block sizes from real model shapes, each system's put and get of them.

A KV block holds the keys and values of 512 tokens for every layer: ``2 x layers x kv_heads x head_dim x 512
x 2 bytes`` (bf16). Shapes are from the models' published ``config.json`` (num_hidden_layers,
num_key_value_heads, hidden_size / num_attention_heads). Blocks of 28-160 MiB do not fit many at a time in a
small machine's memory, so every size is divided by ``--scale`` (printed; 1 = the real size).
"""
from __future__ import annotations

from dataclasses import dataclass

from .core import GB, MiB, Result, Run, buffers_for

DEFAULT_SYSTEMS = ("cascade-kv", "posix", "hdf5", "redis", "lmcache-cpu", "mooncake")
TOKENS_PER_BLOCK = 512
BYTES_PER_VALUE = 2  # bf16


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    params_b: float
    """Parameters, in billions (for the trace replay's FLOP model)."""

    @property
    def block_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * TOKENS_PER_BLOCK * BYTES_PER_VALUE


MODELS = (
    Model("Qwen2.5-7B", 28, 4, 128, 7.6),    # hidden 3584, 28 heads
    Model("Llama-3-8B", 32, 8, 128, 8.0),    # hidden 4096, 32 heads
    Model("Qwen2.5-32B", 64, 8, 128, 32.5),  # hidden 5120, 40 heads
    Model("Llama-3-70B", 80, 8, 128, 70.6),  # hidden 8192, 64 heads
    Model("Qwen2.5-72B", 80, 8, 128, 72.7),  # hidden 8192, 64 heads
)
MODELS_BY_NAME = {m.name.lower(): m for m in MODELS}


def scaled(model: Model, scale: float) -> int:
    """The block size used for ``model`` at ``scale``: rounded down to a multiple of 4 KiB, at least 4 KiB."""
    return max(4096, int(model.block_bytes / scale) // 4096 * 4096)


def run(r: Run) -> Result:
    scale = float(r.options.get("scale") or (64 if r.quick else 4))
    count = 4 if r.quick else 8
    reps = 2 if r.quick else 3
    res = Result("models", f"block sizes from model shapes (512-token bf16 blocks, divided by --scale {scale:g})",
                 r.size, settings={"scale": scale, "blocks_per_model": count, "reps": reps,
                                   "models": {m.name: {"layers": m.layers, "kv_heads": m.kv_heads,
                                                       "head_dim": m.head_dim, "block_bytes": m.block_bytes,
                                                       "scaled_bytes": scaled(m, scale)} for m in MODELS}})
    res.columns = [(f"get_GBps[{m.name}]", f"get {m.name} ({scaled(m, scale) / MiB:.1f} MiB)") for m in MODELS]
    biggest = max(scaled(m, scale) for m in MODELS)
    memory = int(1.25 * (count + 1) * sum(scaled(m, scale) for m in MODELS)) + 64 * MiB  # every model's blocks fit
    for name in r.systems:
        with r.system(name, res, memory, biggest) as backend:
            if backend is None:
                continue
            mine = res.systems[name]
            for m in MODELS:
                size = scaled(m, scale)
                contents = r.new_contents(size, seed=61 + MODELS.index(m))
                ids = list(range(count + 1))
                keys = [f"{m.name}-{r.rank}-{i}" for i in ids]
                # a put of bytes already stored is a dedup hit, not a write: each rep puts its own blocks,
                # after one untimed warm-up block
                r.together(lambda: r.put_blocks(backend, keys[-1:], ids[-1:], contents), f"{name}: {m.name} warm-up")
                ids, keys = ids[:-1], keys[:-1]
                for group in (ids[g::reps] for g in range(reps)):
                    gk = [keys[i] for i in group]
                    put = r.together(lambda: r.put_blocks(backend, gk, group, contents), f"{name}: {m.name} put")
                    mine.measure(f"put_GBps[{m.name}]", "GB/s").samples.append(
                        r.size * len(group) * size / max(r.allgather(put)) / GB)
                outs = buffers_for(min(count, 4), size)
                for rep in range(reps):
                    got = r.together(lambda: r.get_blocks(backend, keys, ids, contents, outs),
                                     f"{name}: {m.name} get {rep + 1}")
                    mine.measure(f"get_GBps[{m.name}]", "GB/s").samples.append(
                        r.size * count * size / max(r.allgather(got)) / GB)
    return res
