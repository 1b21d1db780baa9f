"""A synthetic multi-turn conversation trace in the Mooncake format, for judging policies on data they were
not fitted on.

The shipped trace (``traces/mooncake_synthetic_trace.jsonl``) is dominated by requests that share long
leading runs with one earlier request and then add blocks nobody reads again. A chat service looks
different, and this generator makes that shape instead:

- **Sessions** arrive as a Poisson process over ``duration_s``. Each opens with one of ``system_prompts``
  system prompts (Zipf-popular, 1 to 4 whole blocks, so sessions with the same one share its blocks).
- **Turns.** A session has a geometric number of turns (mean ``turns``). Turn ``t``'s prompt is the system
  prompt, every earlier user message and answer, and the new user message, so it extends the previous
  prompt; the user thinks for an exponential time (mean ``think_s``) after each answer.
- **Lengths** (tokens) are log-normal: the first user message (median ``first_tokens``, long pasted
  context), later ones (median ``user_tokens``), answers (median ``answer_tokens``).
- **Block ids** as Mooncake's: one id per 512-token block of the prompt, equal ids for equal tokens after the
  same prefix. A full block of the conversation keeps its id from turn to turn; the partial last block of a
  prompt is new at every turn (more tokens follow it next time).

Everything comes from one ``numpy`` Generator seeded with ``seed``, so a seed names a trace.
Run ``python -m cascade_kv.bench.tracegen --out FILE [--seed N ...]``.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from .trace import BLOCK_TOKENS


@dataclass(frozen=True, slots=True)
class ConversationShape:
    """The knobs of :func:`conversations` (defaults: about 4,000 requests over 20 minutes)."""

    sessions: int = 1100  # conversations in the trace
    duration_s: float = 1200.0  # sessions start uniformly (Poisson) within this time
    turns: float = 3.5  # mean turns per session (geometric)
    think_s: float = 40.0  # mean pause between an answer and the next user message
    system_prompts: int = 8  # distinct system prompts; popularity Zipf(1.2)
    first_tokens: float = 3000.0  # median first user message
    user_tokens: float = 200.0  # median later user message
    answer_tokens: float = 350.0  # median answer

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.system_prompts < 1:
            raise ValueError(f"sessions and system_prompts must be >= 1, got {self.sessions}, {self.system_prompts}")
        for name in ("duration_s", "think_s", "first_tokens", "user_tokens", "answer_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.turns >= 1:
            raise ValueError(f"turns (a mean) must be >= 1, got {self.turns}")


def _lognormal(rng: np.random.Generator, median: float) -> int:
    return max(1, int(rng.lognormal(np.log(median), 0.8)))


def conversations(shape: ConversationShape = ConversationShape(), seed: int = 0) -> list[dict[str, object]]:
    """The trace's requests as Mooncake JSON objects, sorted by timestamp (ties by session, then turn)."""
    rng = np.random.default_rng(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    prompts = [fresh(int(rng.integers(1, 5))) for _ in range(shape.system_prompts)]
    zipf = 1.0 / np.arange(1, shape.system_prompts + 1) ** 1.2
    out: list[tuple[float, int, int, dict[str, object]]] = []
    for s in range(shape.sessions):
        system = prompts[int(rng.choice(shape.system_prompts, p=zipf / zipf.sum()))]
        blocks = list(system)  # ids of the conversation's full blocks so far
        tokens = len(system) * BLOCK_TOKENS
        at = float(rng.uniform(0, shape.duration_s))
        for turn in range(int(rng.geometric(1 / shape.turns))):
            tokens += _lognormal(rng, shape.first_tokens if turn == 0 else shape.user_tokens)
            full = tokens // BLOCK_TOKENS
            blocks += fresh(full - len(blocks))
            ids = blocks + (fresh(1) if tokens % BLOCK_TOKENS else [])  # the partial tail: new each turn
            answer = _lognormal(rng, shape.answer_tokens)
            out.append((at, s, turn, {"timestamp": int(at * 1000), "input_length": tokens,
                                      "output_length": answer, "hash_ids": ids}))
            tokens += answer
            at += float(rng.exponential(shape.think_s)) + answer / 50  # ~50 tokens/s of decoding
    out.sort(key=lambda x: x[:3])
    return [x[3] for x in out]


def write(path: str | os.PathLike[str], requests: Sequence[dict[str, object]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in requests)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cascade_kv.bench.tracegen", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON-lines file to write")
    p.add_argument("--seed", type=int, default=0)
    defaults = ConversationShape()
    for f in fields(ConversationShape):
        default = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default, dest=f.name)
    args = vars(p.parse_args(argv))
    out, seed = args.pop("out"), args.pop("seed")
    try:
        requests = conversations(ConversationShape(**args), seed)
    except ValueError as e:
        p.error(str(e))
    write(out, requests)
    print(f"{out}: {len(requests)} requests, seed {seed}")


if __name__ == "__main__":
    main()
