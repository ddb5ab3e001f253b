"""Objects several tests (and benches) build the same way."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.data.records import ScoredExample
from core.scoring.tokens import TokenScores, _offsets

#: Six small prompt/response pairs the training tests (and the kill-resume harness) train on.
TRAIN_ROWS = [
    {"id": "a", "prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"id": "b", "prompt": "What is 7 times 8?", "response": "7 times 8 is 56."},
    {"id": "c", "prompt": "Capital of France?", "response": "The capital of France is Paris."},
    {"id": "d", "prompt": "Reverse 'abc'.", "response": "'cba'"},
    {"id": "e", "prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b"},
    {"id": "f", "prompt": "Say hello.", "response": "Hello! How can I help you today?"},
]


def save_tiny_llama(folder: Path, tokenizer: Any) -> Path:
    """The suite's tiny model: a 2-layer, 64-wide llama with `tokenizer` (SmolLM2's), seeded, saved
    with its tokenizer as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- scored examples

#: The prompt tokens `make_example` puts before the response unless told otherwise.
PROMPT_TOKENS = ["<|start_header_id|>", "user", "<|end_header_id|>", "\n\n", "Add", " x", "\n"]
#: The top-k alternatives of a response token `tok` unless told otherwise, and their
#: probabilities.
TOP_TOKENS = [" the", "\n", "(", "x", "1"]
TOP_PROBS = [0.5, 0.2, 0.1, 0.05, 0.02, 0.01]


def token_id(text: str) -> int:
    """The tests' vocabulary: "t<N>" is token N, any other text a stable id from its bytes
    (10**6 and up), so a text always has one id and any examples made by `make_example` join
    into one `TokenScores`."""
    number = re.fullmatch(r"t(\d+)", text)
    if number:
        return int(number[1])
    return 10**6 + int.from_bytes(hashlib.blake2b(text.encode(), digest_size=3).digest(), "big")


def make_example(
    ex_id: str = "ex-1",
    ppl: Sequence[float] = (),
    tokens: Sequence[str] | None = None,
    *,
    logprob: Sequence[float] | None = None,
    prompt_tokens: Sequence[str] = PROMPT_TOKENS,
    top_tokens: Sequence[Sequence[str]] | None = None,
    top_probs: Sequence[Sequence[float]] | None = None,
    **fields: Any,
) -> ScoredExample:
    """One scored example: `prompt_tokens`, then the response `tokens` (default "t0", "t1", ...)
    with token perplexities `ppl` (or log-probs `logprob`). Ranks cycle 1, 2, 3; each token's
    top-6 alternatives are itself and `TOP_TOKENS` with `TOP_PROBS` unless `top_tokens` /
    `top_probs` say otherwise. Token ids are `token_id` of the texts. Any other `ScoredExample`
    field (prompt, response, truncated, source, meta, ...) is a keyword; the prompt and response
    texts default to the joined tokens."""
    logprob = [-math.log(p) for p in ppl] if logprob is None else [float(v) for v in logprob]
    n = len(logprob)
    tokens = [f"t{i}" for i in range(n)] if tokens is None else list(tokens)
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} tokens for {n} scores")
    if top_tokens is None:
        top_tokens = [[tok, *TOP_TOKENS] for tok in tokens]
    if top_probs is None:
        top_probs = [TOP_PROBS[: len(row)] for row in top_tokens]
    texts = [*prompt_tokens, *tokens]
    values: dict[str, Any] = {
        "id": ex_id,
        "prompt": "".join(prompt_tokens),
        "response": "".join(tokens),
        "convention": "prompt",
        "token_ids": [token_id(t) for t in texts],
        "tokens": texts,
        "response_start": len(prompt_tokens),
        "logprob": logprob,
        "rank": [1 + i % 3 for i in range(n)],
        "top_ids": [[token_id(t) for t in row] for row in top_tokens],
        "top_tokens": [list(row) for row in top_tokens],
        "top_logprobs": [[math.log(p) for p in row] for row in top_probs],
    }
    return ScoredExample(**{**values, **fields})


def scores_of(examples: Sequence[ScoredExample]) -> TokenScores:
    """The columns of scored records (what every dataset-level function takes)."""
    return TokenScores.from_examples(list(examples))


def columns(groups: Mapping[str, Sequence[ScoredExample]]) -> dict[str, TokenScores]:
    """Groups of records (source -> examples) as groups of columns."""
    return {source: scores_of(examples) for source, examples in groups.items()}


#: Token texts of `synthetic` scores (token id = index).
SYNTHETIC_TEXTS = [
    "Ġdef",
    "Ġx",
    "(",
    "):",
    "Ċ",
    "Ġreturn",
    "Ġ42",
    "<|im_end|>",
    "Ġ",
    "3.14",
    "é",
    "==",
]


def synthetic(n: int = 12, k: int = 3, seed: int = 7) -> TokenScores:
    """Small columnar scores with the awkward cases: an example without response tokens (3), a
    truncated one (5), repeated perplexities, metas, and two data sources."""
    rng = np.random.default_rng(seed)
    n_resp = rng.integers(1, 30, n)
    n_resp[3] = 0
    n_prompt = rng.integers(2, 12, n)
    tok_off, off = _offsets(n_prompt + n_resp), _offsets(n_resp)
    r = int(off[-1])
    logprob = np.round(-rng.exponential(1.5, r), 1)  # rounded: ties between tokens
    vocab = dict(enumerate(SYNTHETIC_TEXTS))
    truncated = np.zeros(n, dtype=bool)
    truncated[5] = True
    return TokenScores(
        ids=tuple(f"ex-{i}" for i in range(n)),
        prompts=tuple(f"Solve this.\n\nProblem {i}: add {i} and 1." for i in range(n)),
        responses=tuple(f"def f():\n    return {i + 1}\n" for i in range(n)),
        conventions=("prompt",) * n,
        token_ids=rng.integers(0, len(SYNTHETIC_TEXTS), int(tok_off[-1])).astype(np.int32),
        token_offsets=tok_off,
        response_start=n_prompt.astype(np.int32),
        logprob=logprob,
        offsets=off,
        rank=rng.integers(0, 9, r).astype(np.int32),
        top_ids=rng.integers(0, len(SYNTHETIC_TEXTS), (r, k)).astype(np.int32),
        top_logprobs=np.sort(-rng.exponential(2.0, (r, k)).astype(np.float32), axis=1),
        truncated=truncated,
        vocab=vocab,
        sources=("ground_truth",) * (n - 2) + ("self_output",) * 2,
        metas=tuple({"answer": str(i)} if i % 2 else {} for i in range(n)),
    )
