"""Token-perplexity scoring: log-probability, perplexity, rank and top-k alternatives of every
response token under a model, batched with length bucketing and cached on disk.

The forward passes are the model's (`LanguageModel.score_pairs`; for a Hugging Face model
`core.model.forward`): this module encodes, buckets, caches and builds the records, and imports
no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from core.data.records import PROMPT_CONDITIONED, Example, ScoredExample
from core.errors import LensError
from core.model.encoding import EncodedPair, encode_pair
from core.model.interface import DEFAULT_TOKEN_BUDGET, LanguageModel, length_buckets
from core.scoring.cache import ScoreCache, ScoreSetting, content_key
from core.scoring.tokens import TokenScores

ProgressFn = Callable[[int, int], None]

DEFAULT_TOP_K = 5
DEFAULT_MAX_BATCH = 16


@dataclass
class ScoreRun:
    """Result of scoring a list of examples.

    `scores` holds every scored example's tokens column by column (numpy arrays and offsets:
    what dataset-wide statistics read); `examples` the same examples as `ScoredExample`
    records, built from `scores` on first access (copies: changing one leaves `scores` as it
    is)."""

    scores: TokenScores
    n_cached: int = 0
    n_scored: int = 0
    n_truncated: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Set when this is an early look at the first few examples of a larger selection still being
    # scored: that selection's size.
    of_total: int | None = None
    # What went wrong without stopping the run (an unreadable score file moved aside and its
    # examples scored again), as sentences to show.
    warnings: list[str] = field(default_factory=list)

    @cached_property
    def examples(self) -> list[ScoredExample]:
        """The scored examples as records, in input order."""
        return self.scores.to_examples()

    def summary(self) -> str:
        """One line for the UI and CLI."""
        text = f"{len(self.scores)} scored ({self.n_cached} from cache, {self.n_scored} computed)"
        if self.n_truncated:
            text += f", {self.n_truncated} truncated to the context length"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        if self.warnings:
            text += f", {len(self.warnings)} warning{'s' if len(self.warnings) > 1 else ''}"
        return text


def score_setting(
    lm: LanguageModel,
    *,
    convention: str = PROMPT_CONDITIONED,
    top_k: int = DEFAULT_TOP_K,
    max_length: int | None = None,
) -> ScoreSetting:
    """The cache setting `score_examples` uses for these arguments."""
    limit = min(max_length or lm.max_length, lm.max_length)
    return ScoreSetting(lm.cache_key, lm.template_fingerprint, convention, limit, int(top_k))


def _build_record(
    lm: LanguageModel,
    ex: Example,
    enc: EncodedPair,
    convention: str,
    logprob: list[float],
    rank: list[int],
    top_ids: list[list[int]],
    top_logprobs: list[list[float]],
) -> ScoredExample:
    return ScoredExample(
        id=ex.id,
        prompt=ex.prompt,
        response=ex.response,
        convention=convention,
        token_ids=enc.input_ids,
        tokens=lm.token_texts(enc.input_ids),
        response_start=enc.response_start,
        logprob=logprob,
        rank=rank,
        top_ids=top_ids,
        top_tokens=[lm.token_texts(row) for row in top_ids],
        top_logprobs=top_logprobs,
        truncated=enc.truncated,
        meta=dict(ex.meta),
    )


def score_examples(
    lm: LanguageModel,
    examples: Sequence[Example],
    *,
    convention: str = PROMPT_CONDITIONED,
    top_k: int = DEFAULT_TOP_K,
    max_length: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch: int = DEFAULT_MAX_BATCH,
    cache: ScoreCache | None = None,
    progress: ProgressFn | None = None,
    source: str = "ground_truth",
) -> ScoreRun:
    """Score every response token of `examples` under `lm`, in input order.

    Cached examples are read from `cache`; the rest are encoded, bucketed by length, scored in
    batches under inference mode and written back. `progress(done, total)` is called as batches
    finish. Examples whose text cannot be scored are skipped and listed in `ScoreRun.skipped`.
    """
    vocab = lm.vocab_size
    if not 0 <= int(top_k) <= vocab:
        raise LensError(f"top_k must be from 0 to the vocabulary size ({vocab}), got {top_k}.")
    if max_length is not None and max_length < 2:
        raise LensError(f"max_length must be at least 2 tokens, got {max_length}.")
    setting = score_setting(lm, convention=convention, top_k=top_k, max_length=max_length)
    limit = setting.max_length
    keys = [content_key(ex) for ex in examples]
    hit = cache.lookup(setting, examples, keys) if cache is not None else None
    found = {key: i for i, key in enumerate(hit.keys)} if hit is not None else {}
    run = ScoreRun(scores=TokenScores.empty(int(top_k)), n_cached=len(found))
    if hit is not None:
        run.warnings = list(hit.warnings)
    todo = [i for i, k in enumerate(keys) if k not in found]
    encs: dict[int, EncodedPair] = {}  # first example of each content still to score
    first_of: dict[str, int] = {}
    for i in todo:
        ex = examples[i]
        if not ex.response.strip():
            run.skipped.append((ex.id, "empty response"))
            continue
        if keys[i] in first_of:
            continue  # the same content twice: scored once
        first_of[keys[i]] = i
        encs[i] = encode_pair(
            lm.tokenizer, ex.prompt, ex.response, convention=convention, max_length=limit
        )
    copies = Counter(keys)
    total, done = len(examples), sum(copies[k] for k in found)
    if progress:
        progress(done, total)
    index = list(encs)
    new_parts: list[TokenScores] = []
    new_keys: list[str] = []
    for batch in length_buckets([len(encs[i].input_ids) for i in index], token_budget, max_batch):
        members = [index[b] for b in batch]
        stats = lm.score_pairs([encs[i] for i in members], int(top_k))
        records = [
            _build_record(lm, examples[i], encs[i], convention, lp, rank, tids, tlp)
            for i, (lp, rank, tids, tlp) in zip(members, stats, strict=True)
        ]
        part = TokenScores.from_examples(records, top_k=int(top_k))
        new_parts.append(part)
        new_keys.extend(keys[i] for i in members)
        done += sum(copies[keys[i]] for i in members)
        if cache is not None:
            run.warnings += cache.put(setting, part)
        if progress:
            progress(done, total)
    parts = ([hit.scores] if hit is not None else []) + new_parts
    joined = TokenScores.concat(parts) if parts else TokenScores.empty(int(top_k))
    position = {key: j for j, key in enumerate((hit.keys if hit is not None else []) + new_keys)}
    order = [i for i, key in enumerate(keys) if key in position]
    rows = [position[keys[i]] for i in order]
    sources, metas = [source] * len(order), [dict(examples[i].meta) for i in order]
    if rows == list(range(len(joined))):  # e.g. all from one store read, in input order
        run.scores = joined.with_labels(sources, metas)
    else:
        run.scores = joined.take(rows, sources=sources, metas=metas)
    run.n_scored = len(new_keys)
    run.n_truncated = int(run.scores.truncated.sum())
    return run
