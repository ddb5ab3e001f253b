"""The model as the rest of `core/` sees it: `LanguageModel`, a small typed interface.

Scoring, evaluation and data generation need from a model only its tokenizer (chat template
included), a few facts for cache keys (name, fingerprint, device, dtype, context length) and
three operations on token ids:

- `score_pairs`: per response token of encoded (prompt, response) pairs (`EncodedPair`), its
  log-probability, rank and the top-k alternatives (one forward pass over a batch);
- `continuation_logprobs`: the summed log-probability of each pair's response and whether every
  token of it is the model's top choice (multiple choice, lm-evaluation-harness's loglikelihood);
- `generate`: responses to chat-templated prompts, greedy or sampled.

`core.model.loading.LoadedModel` (a Hugging Face causal LM on a device) implements it;
`tests/fake_model.py` is a torch-free stand-in for plumbing tests. This module imports neither
torch nor transformers: code that takes a `LanguageModel` can be imported and run without them.
What only a Hugging Face model offers (full-vocabulary logits for drift, PEFT adapters, lm-eval's
`HFLM`) stays on `LoadedModel`, and code that needs it asks for one (`require_loaded`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from core.errors import LensError
from core.model.encoding import EncodedPair

ProgressFn = Callable[[int, int], None]

# Padded tokens per forward pass. Bucketing by length keeps padding small; this budget keeps the
# float32 logits of a batch (tokens x vocab) at a few hundred MB for a 50k vocabulary.
DEFAULT_TOKEN_BUDGET = 2048


class PairScores(NamedTuple):
    """One pair's response tokens under a model: per token its log-probability, its rank (1 =
    the model's top choice) and the top-k token ids and log-probabilities."""

    logprob: list[float]
    rank: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; `do_sample=False` is greedy (used for evaluation)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    num_return_sequences: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LensError("max_new_tokens must be at least 1.")
        if self.num_return_sequences < 1:
            raise LensError("num_return_sequences must be at least 1.")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise LensError("Sampling needs temperature > 0 and 0 < top_p <= 1.")
        if not self.do_sample and self.num_return_sequences > 1:
            raise LensError("Greedy decoding returns one sequence; enable sampling for several.")

    def to_dict(self) -> dict[str, object]:
        """Plain dict (for provenance records)."""
        return asdict(self)


@dataclass
class Generation:
    """One generated response and its token count (end-of-turn excluded)."""

    text: str
    n_tokens: int
    finished: bool  # False when it stopped at max_new_tokens
    #: the generated ids, the stop token included when it `finished` (drift teacher-forces them)
    token_ids: list[int] = field(default_factory=list)


class Tokenizer(Protocol):
    """What `core/` calls on a tokenizer (a Hugging Face `PreTrainedTokenizer` has all of it)."""

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template `apply_chat_template` renders."""

    @property
    def pad_token_id(self) -> int | None:
        """The padding id (None when the tokenizer has none)."""

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence id."""

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id (None when the tokenizer has none)."""

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special tokens (the end-of-turn token among them)."""

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> Mapping[str, Any]:
        """`{"input_ids": [...]}` of `text`."""

    def __len__(self) -> int:
        """The vocabulary size, added tokens included."""

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> Any:
        """The conversation rendered by the chat template (text when `tokenize` is False)."""

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids."""

    def batch_decode(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        """Text of each sequence."""

    def get_vocab(self) -> dict[str, int]:
        """Token text to id."""


class Device(Protocol):
    """Where a model runs (a `torch.device`): its `type` is "cpu", "cuda" or "mps"."""

    @property
    def type(self) -> str:
        """The device kind."""


@runtime_checkable
class LanguageModel(Protocol):
    """A causal language model with its tokenizer: what scoring, evaluation and data
    generation use (see the module docstring). `isinstance(x, LanguageModel)` checks that the
    members exist, not their signatures."""

    @property
    def name(self) -> str:
        """The name it was loaded by ("default", an HF id, a folder, a .gguf file)."""

    @property
    def display_name(self) -> str:
        """Human name for the UI."""

    @property
    def tokenizer(self) -> Tokenizer:
        """Its tokenizer, chat template included (`core.model.encoding` renders with it)."""

    @property
    def device(self) -> Device:
        """Where it runs."""

    @property
    def dtype(self) -> object:
        """Its weights' dtype (a `torch.dtype`; `str()` of it names it)."""

    @property
    def fingerprint(self) -> str:
        """Which weights these are (part of every cache key)."""

    @property
    def max_length(self) -> int:
        """Its context length in tokens."""

    @property
    def template_is_fallback(self) -> bool:
        """True when the model shipped no chat template and a plain one is used."""

    @property
    def cache_key(self) -> str:
        """Model + dtype: scores differ across dtypes, so both belong in cache keys."""

    @property
    def template_fingerprint(self) -> str:
        """Hash of the chat template in use, part of every scoring cache key."""

    @property
    def vocab_size(self) -> int:
        """Rows of its output projection: the token ids a top-k can name."""

    def token_texts(self, ids: list[int]) -> list[str]:
        """Readable text of each token id."""

    def eval_mode(self) -> AbstractContextManager[None]:
        """The block with the model in inference (eval) mode, its previous mode restored."""

    def score_pairs(self, encs: Sequence[EncodedPair], top_k: int) -> list[PairScores]:
        """Per pair of one batch, its response tokens' log-probabilities, ranks and top-`k`."""

    def continuation_logprobs(
        self,
        encs: Sequence[EncodedPair],
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_batch: int = 64,
        share_context: bool = True,
    ) -> list[tuple[float, bool]]:
        """Per pair, (summed log-probability of its response tokens, whether each of them is the
        model's top choice), batched by the model (pairs sharing a context may share its pass;
        `share_context=False` scores each pair whole)."""

    def generate(
        self,
        prompts: Sequence[str],
        config: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        system: str | None = None,
        progress: ProgressFn | None = None,
    ) -> list[list[Generation]]:
        """`config.num_return_sequences` responses to each chat-templated prompt, in input
        order; `progress(done, total)` counts prompts."""


def length_buckets(lengths: Sequence[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Group indices into batches of similar length (longest first) under a padded-token budget
    and at most `max_batch` members."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > token_budget or len(current) >= max_batch:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
