"""A deterministic, torch-free `core.model.interface.LanguageModel` for plumbing tests.

`FakeTokenizer` is byte-level (ids 0-255 are bytes) with four special tokens and a small chat
template; `FakeModel` is an n-gram model whose next-token distribution is a pseudo-random
vector seeded by a hash of the last `CONTEXT` ids, so scores and answers are the same on every
run and machine. It imports neither torch nor transformers, so code run on it shows what an
evaluation needs without a real model. `plumbing_suite` is what it can be evaluated on.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.errors import LensError
from core.eval.suites import DRIFT, MC_LOGLIK, EvalSuite, EvalTaskSpec, get_suite
from core.model.encoding import EncodedPair, encode_prompt
from core.model.interface import (
    DEFAULT_TOKEN_BUDGET,
    Generation,
    GenerationConfig,
    PairScores,
)

PAD, USER, ASSISTANT, END = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIALS = (PAD, USER, ASSISTANT, END)
SPECIAL_IDS = {text: 256 + k for k, text in enumerate(SPECIALS)}
VOCAB = 256 + len(SPECIALS)
#: How many previous ids the fake's next-token distribution depends on.
CONTEXT = 6
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")


class FakeTokenizer:
    """Bytes as ids 0-255, the special tokens after them; template: `<|user|>` prompt newline,
    `<|assistant|>` answer `<|end|>` newline (the generation prompt ends at `<|assistant|>`)."""

    chat_template = "fake: <|user|>{prompt}\\n<|assistant|>{answer}<|end|>\\n"
    pad_token_id: int | None = SPECIAL_IDS[PAD]
    eos_token_id: int | None = SPECIAL_IDS[END]
    bos_token_id: int | None = None
    all_special_ids = list(SPECIAL_IDS.values())

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> Mapping[str, Any]:
        ids: list[int] = []
        for part in _SPLIT.split(text):
            if part in SPECIAL_IDS:
                ids.append(SPECIAL_IDS[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return {"input_ids": ids}

    def __len__(self) -> int:
        return VOCAB

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> Any:
        text = ""
        for message in conversation:
            if message["role"] == "user":
                text += f"{USER}{message['content']}\n"
            elif message["role"] == "assistant":
                text += f"{ASSISTANT}{message['content']}{END}\n"
            else:
                text += f"{message['content']}\n"
        if add_generation_prompt:
            text += ASSISTANT
        return self(text)["input_ids"] if tokenize else text

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        out, run = [], bytearray()
        for i in token_ids:
            if i < 256:
                run.append(int(i))
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(SPECIALS[int(i) - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(s) for s in sequences]

    def get_vocab(self) -> dict[str, int]:
        vocab = {bytes([i]).decode("latin-1"): i for i in range(256)}
        return {**vocab, **SPECIAL_IDS}


@dataclass(frozen=True)
class FakeDevice:
    """Stands in for `torch.device("cpu")`."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


@dataclass
class FakeModel:
    """A `LanguageModel` whose log-probabilities come from a hash of the last `CONTEXT` ids.

    `calls` counts each operation (`score_pairs` batches, `continuation_logprobs`, `generate`);
    `training` is the mode `eval_mode` switches off for its block and restores."""

    name: str = "fake"
    seed: int = 0
    max_length: int = 2048
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    device: FakeDevice = field(default_factory=FakeDevice)
    dtype: str = "float32"
    template_is_fallback: bool = False
    training: bool = False
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return f"{self.name} (fake model for tests)"

    @property
    def fingerprint(self) -> str:
        return f"fake:{self.name}@{self.seed}"

    @property
    def cache_key(self) -> str:
        return f"{self.fingerprint}|{self.dtype}"

    @property
    def template_fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.chat_template.encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        was_training, self.training = self.training, False
        try:
            yield
        finally:
            self.training = was_training

    # ---------------------------------------------------------------------------------------
    # The model: a deterministic next-token distribution per context

    def logprobs(self, context: Sequence[int]) -> np.ndarray:
        """Log-probabilities (float64, one per id) of the token after `context`."""
        tail = [int(i) for i in context[-CONTEXT:]]
        digest = hashlib.blake2b(repr((self.seed, tail)).encode(), digest_size=8).digest()
        logits = np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(VOCAB)
        logits *= 3.0
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum())

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def score_pairs(self, encs: Sequence[EncodedPair], top_k: int) -> list[PairScores]:
        self._count("score_pairs")
        out = []
        for enc in encs:
            ids = enc.input_ids
            logprob, rank, top_ids, top_lps = [], [], [], []
            for p in range(enc.response_start, len(ids)):
                lps = self.logprobs(ids[:p])
                target = float(lps[ids[p]])
                logprob.append(target)
                rank.append(int((lps > target).sum()) + 1)
                best = np.argsort(-lps, kind="stable")[:top_k]
                top_ids.append([int(i) for i in best])
                top_lps.append([float(lps[i]) for i in best])
            out.append(PairScores(logprob, rank, top_ids, top_lps))
        return out

    def continuation_logprobs(
        self,
        encs: Sequence[EncodedPair],
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_batch: int = 64,
        share_context: bool = True,
    ) -> list[tuple[float, bool]]:
        self._count("continuation_logprobs")
        out = []
        for scores in self.score_pairs(encs, 1):
            out.append((float(sum(scores.logprob)), all(r == 1 for r in scores.rank)))
        return out

    def generate(
        self,
        prompts: Sequence[str],
        config: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        system: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[list[Generation]]:
        self._count("generate")
        config = config or GenerationConfig()
        stop = self.tokenizer.eos_token_id
        results = []
        for k, prompt in enumerate(prompts):
            ids = encode_prompt(self.tokenizer, prompt, system)
            if len(ids) > self.max_length - config.max_new_tokens:
                raise LensError(f"Prompt #{k} leaves no room for {config.max_new_tokens} tokens.")
            rng = np.random.default_rng(config.seed + k)
            gens = []
            for _ in range(config.num_return_sequences):
                new: list[int] = []
                while len(new) < config.max_new_tokens:
                    lps = self.logprobs(ids + new)
                    if config.do_sample:
                        p = np.exp(lps / config.temperature)
                        token = int(rng.choice(VOCAB, p=p / p.sum()))
                    else:
                        token = int(lps.argmax())
                    new.append(token)
                    if token == stop:
                        break
                finished = bool(new) and new[-1] == stop
                tokens = new[:-1] if finished else new
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                gens.append(Generation(text, len(tokens), finished, token_ids=new))
            results.append(gens)
            if progress:
                progress(k + 1, len(prompts))
        return results


def plumbing_suite() -> EvalSuite:
    """The `tiny` suite without drift (which needs full-vocabulary logits), plus ARC in the
    `plain` format (lm-eval's requests, through `continuation_logprobs`)."""
    tiny = get_suite("tiny")
    plain = EvalTaskSpec("arc_plain", "arc_easy", MC_LOGLIK, n=2, mc_format="plain")
    return replace(
        tiny,
        name="plumbing",
        target=tuple(s for s in tiny.target if s.scorer != DRIFT),
        ood=(*(s for s in tiny.ood if s.scorer != DRIFT), plain),
    )
