"""Request traces for ``cascade bench trace``: loading, the prefix rule, block contents, the FLOP model.

A trace (Mooncake FAST'25 format, see ``traces/README.md``) is a list of requests, each naming the
KV blocks of its prompt by ``hash_ids``, one id per 512-token block. Replaying it means: for each
request in timestamp order, load the blocks it can reuse and compute (then store) the rest.

What this module fixes, so that every measured system replays the same thing:

- **which blocks are a request's reusable prefix** (:func:`prefix_lengths`): the leading run of its
  blocks that an earlier request already read. These are the blocks a replay marks ``is_prefix``.
- **what bytes a block holds** (:func:`fill_block`): a pure function of its hash id, so equal ids
  are equal bytes (and dedup) and distinct ids are distinct bytes (a wrong read is caught).
- **what reusing a prefix saves** (:class:`FlopModel`): the prefill compute of the reused tokens.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument

BLOCK_TOKENS = 512
"""Tokens per block in the Mooncake traces (one ``hash_id`` each)."""

DEFAULT_TRACE = Path(__file__).parent / "traces" / "mooncake_synthetic_trace.jsonl"
"""The Mooncake FAST'25 synthetic trace shipped with the package (Apache-2.0, see traces/README.md)."""

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
_MAX_ID = 1 << 64  # ids are 64-bit keys of the content function


@dataclass(frozen=True, slots=True)
class Request:
    """One line of a trace."""

    timestamp: float  # arrival, milliseconds from the start of the trace
    input_length: int  # prompt tokens
    output_length: int  # generated tokens
    hash_ids: tuple[int, ...]  # the prompt's blocks, in order; equal ids are the same KV block


@dataclass(frozen=True, slots=True)
class Trace:
    """Requests sorted by arrival (stable: equal timestamps keep the file's order)."""

    requests: tuple[Request, ...]
    source: str  # where it was read from, for reports

    @property
    def reads(self) -> int:
        """Block reads in a replay: every id of every request."""
        return sum(len(r.hash_ids) for r in self.requests)

    def distinct_blocks(self) -> set[int]:
        return {h for r in self.requests for h in r.hash_ids}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no block id


def _parse(line: str, where: str) -> Request:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in _FIELDS if f not in obj]
    if missing:
        raise InvalidArgument(f"{where}: missing field(s) {', '.join(missing)}")
    ts = obj["timestamp"]
    if not (_is_int(ts) or isinstance(ts, float)) or not math.isfinite(ts):
        raise InvalidArgument(f"{where}: timestamp is {ts!r}, not a finite number of milliseconds")
    for name in ("input_length", "output_length"):
        v = obj[name]
        if not _is_int(v) or v < 0:
            raise InvalidArgument(f"{where}: {name} is {v!r}, not a non-negative integer")
    ids = obj["hash_ids"]
    if not isinstance(ids, list):
        raise InvalidArgument(f"{where}: hash_ids is {type(ids).__name__}, not a list")
    for j, h in enumerate(ids):
        if not _is_int(h) or not 0 <= h < _MAX_ID:
            raise InvalidArgument(f"{where}: hash_ids[{j}] is {h!r}, not an integer in [0, 2**64)")
    return Request(ts, obj["input_length"], obj["output_length"], tuple(ids))


def load_trace(path: str | os.PathLike[str] = DEFAULT_TRACE) -> Trace:
    """Read a JSON-lines trace in the Mooncake format (any such file, not only the shipped one). Blank lines are
    skipped; a file that cannot be read, or anything else malformed, raises
    :class:`~cascade_kv.errors.InvalidArgument` (a ``ValueError``) naming the file and line. Requests come back
    sorted by timestamp, ties in file order."""
    path = Path(path)
    requests = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    requests.append(_parse(line, f"{path}:{lineno}"))
    except (OSError, UnicodeDecodeError) as e:  # a trace the user named: bad input, not a failing store
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text: {e.reason}"
        raise InvalidArgument(f"{path}: cannot read the trace ({why})") from None
    if not requests:
        raise InvalidArgument(f"{path}: no requests in the trace")
    requests.sort(key=lambda r: r.timestamp)  # list.sort is stable
    return Trace(tuple(requests), str(path))


# ---------------------------------------------------------------------------------- the prefix rule
def prefix_lengths(trace: Trace) -> list[int]:
    """For each request, how many of its leading blocks an earlier request already read.

    The rule for ``is_prefix``: block ``j`` of a request is a prefix block when ``j < prefix_lengths[i]``,
    i.e. it and every block before it were read by some earlier request (earlier in the sorted order).
    Only the leading run counts because a block's KV depends on every token before it: a block seen
    before but behind one that was not cannot be reused by this request. In the Mooncake traces the
    two readings agree (every shared block lies in the leading run).
    """
    seen: set[int] = set()
    out = []
    for r in trace.requests:
        k = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            k += 1
        out.append(k)
        seen.update(r.hash_ids)  # after the scan: a request does not share blocks with itself
    return out


def reused_tokens(request: Request, blocks: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Prompt tokens covered by the request's first ``blocks`` blocks (the last block may be partial)."""
    return min(blocks * block_tokens, request.input_length)


# ---------------------------------------------------------------------------------- block contents
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd: adding multiples of it walks all of 2**64
_PI = np.uint64(0x243F6A8885A308D3)  # any constant: keeps block 0's key off the pool's first word
_POOL_WORDS = 1 << 17  # 1 MiB pattern, XORed with one 64-bit key per MiB of block


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, a bijection of uint64 (numpy's uint64 arithmetic wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@cache
def _pool() -> np.ndarray:
    # defined by arithmetic, not by a numpy Generator, so the bytes cannot change with numpy's version
    pool = _splitmix64((np.arange(_POOL_WORDS, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)  # SplitMix64's stream
    pool.flags.writeable = False
    return pool


def fill_block(hash_id: int, out: np.ndarray) -> np.ndarray:
    """Write the bytes of block ``hash_id`` into ``out`` (C-contiguous, a multiple of 8 bytes); returns ``out``.

    Word ``w`` of MiB ``c`` is ``pool[w] ^ ((splitmix64(hash_id) ^ PI) + c * GOLDEN)`` (mod 2**64), ``pool``
    being the first 2**17 outputs of SplitMix64 seeded 0: one XOR per word, as cheap as a copy. Every word
    of the first MiB differs between two ids (splitmix64 is a bijection), so distinct ids never share
    contents, and a shorter block is a prefix of a longer one with the same id. A numpy Generator seeded
    by the id was rejected: it fills at about 1 GB/s, too slow for a replay that writes tens of GB.
    """
    if not out.flags.c_contiguous or out.nbytes % 8:
        raise ValueError(f"block buffer must be C-contiguous and a multiple of 8 bytes, got {out.nbytes} B")
    if not 0 <= hash_id < _MAX_ID:
        raise ValueError(f"hash id {hash_id} is not in [0, 2**64)")
    words = out.reshape(-1).view(np.uint8).view(np.uint64)
    pool = _pool()
    chunks = -(-words.size // _POOL_WORDS)
    base = _splitmix64(np.array([hash_id], dtype=np.uint64)) ^ _PI
    keys = base + np.arange(chunks, dtype=np.uint64) * _GOLDEN
    full = words.size // _POOL_WORDS
    if full:
        np.bitwise_xor(pool[None, :], keys[:full, None],
                       out=words[:full * _POOL_WORDS].reshape(full, _POOL_WORDS))
    rest = words.size - full * _POOL_WORDS
    if rest:
        np.bitwise_xor(pool[:rest], keys[full], out=words[full * _POOL_WORDS:])
    return out


def block_bytes(hash_id: int, nbytes: int) -> np.ndarray:
    """A new ``uint8`` array holding block ``hash_id`` at ``nbytes`` bytes."""
    return fill_block(hash_id, np.empty(nbytes, dtype=np.uint8))


# ---------------------------------------------------------------------------------- models and FLOPs
@dataclass(frozen=True, slots=True)
class ModelShape:
    """A dense decoder-only transformer with grouped-query attention and a gated (SwiGLU) MLP,
    as given by its published ``config.json``."""

    name: str
    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    heads: int  # num_attention_heads (queries)
    kv_heads: int  # num_key_value_heads
    head_dim: int
    ffn: int  # intermediate_size
    dtype_bytes: int = 2  # bf16 KV cache

    @property
    def matmul_params(self) -> int:
        """Weights every prompt token multiplies: q, k, v, o projections and the three MLP matrices of
        each layer (biases, norms and the embedding lookup are under 0.1 % and left out; the LM head
        runs for the last token only, the same with or without a reused prefix)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.ffn)

    def kv_block_bytes(self, tokens: int = BLOCK_TOKENS) -> int:
        """Bytes of one KV block: K and V of every layer for ``tokens`` tokens."""
        return self.layers * 2 * self.kv_heads * self.head_dim * tokens * self.dtype_bytes


MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("Qwen2.5-7B", layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, ffn=18944),
    ModelShape("Qwen2.5-32B", layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, ffn=27648),
    ModelShape("Qwen2.5-72B", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=29568),
    ModelShape("Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336),
    ModelShape("Llama-3-70B", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672),
)}
"""Shapes from the models' published configs (Hugging Face ``config.json``)."""


@dataclass(frozen=True, slots=True)
class FlopModel:
    """Prefill compute of a prompt, and what reusing its cached prefix saves.

    FLOPs of a forward pass over tokens ``1..n`` (counting a multiply-add as 2):

        F(n) = 2 * P * n  +  2 * layers * (heads * head_dim) * n * (n + 1)

    The first term is every token through the ``P`` :attr:`ModelShape.matmul_params` weights. The second
    is causal attention: token ``i`` scores ``i`` keys (QK^T) and sums ``i`` values (AV), 2 + 2 FLOPs per
    key and query dimension in each layer; summed over ``i`` that is ``4 * d * n(n+1)/2`` per layer.
    Reusing the KV of the first ``n`` tokens skips exactly ``F(n)``: the rest of the prompt costs the same
    either way, since it attends to the same positions. Time is ``F(n) / (peak_flops * utilization)``.
    """

    model: ModelShape
    peak_flops: float = 989e12  # H100 SXM, dense BF16 tensor-core peak
    utilization: float = 0.5  # model-FLOPs utilisation of a long prefill (an assumption; printed with results)

    def __post_init__(self) -> None:
        if not self.peak_flops > 0:
            raise ValueError(f"peak_flops must be positive, got {self.peak_flops}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {self.utilization}")

    def prefill_flops(self, tokens: int) -> float:
        m = self.model
        return 2.0 * m.matmul_params * tokens + 2.0 * m.layers * m.heads * m.head_dim * tokens * (tokens + 1)

    def prefill_seconds(self, tokens: int) -> float:
        """Time to compute the KV of ``tokens`` prompt tokens from scratch: the time saved by loading it."""
        return self.prefill_flops(tokens) / (self.peak_flops * self.utilization)

    def describe(self) -> str:
        return (f"F(n) = 2*P*n + 2*L*d*n*(n+1), {self.model.name}: P = {self.model.matmul_params / 1e9:.2f} G, "
                f"L = {self.model.layers}, d = {self.model.heads * self.model.head_dim}; "
                f"{self.peak_flops / 1e12:.0f} TFLOP/s peak at {self.utilization:.0%} utilisation")
