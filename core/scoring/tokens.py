"""Columnar per-token scores of many examples: flat numpy arrays plus per-example offsets.

`TokenScores` is what the score store reads and what dataset-wide statistics (masking, shares,
sequence perplexity) compute on, without one Python list per token. `example(i)` /
`to_examples()` rebuild `ScoredExample` records for code that works example by example.

Layout, for n examples with R response tokens in all and top-k width k:

- `token_ids` (int32) holds every example's full sequence (prompt, template and response),
  example after example; example i is `token_ids[token_offsets[i]:token_offsets[i + 1]]`, and
  its response starts at `response_start[i]` within that slice.
- `logprob` (float64), `rank` (int32) hold the response tokens only; example i is
  `[offsets[i]:offsets[i + 1]]`. `top_ids` (int32) and `top_logprobs` (float32) are (R, k).
- `vocab` maps every token id that occurs (in `token_ids` or `top_ids`) to its text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.data.records import ScoredExample


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _matrix(rows: list, n: int, width: int, dtype: Any) -> np.ndarray:
    if not width or not rows:
        return np.zeros((n, width), dtype=dtype)
    return np.asarray(rows, dtype=dtype).reshape(n, width)


def gather_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the segments `rows` (in that order) of a ragged array with `offsets`,
    and the new offsets: `flat[index]` is the ragged array of those rows."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = offsets[:-1][rows]
    lengths = offsets[1:][rows] - starts
    new = _offsets(lengths)
    index = np.arange(int(new[-1]), dtype=np.int64)
    index += np.repeat(starts - new[:-1], lengths)
    return index, new


@dataclass(frozen=True, eq=False)
class TokenScores:
    """Per-token scores of n examples, column by column (see the module docstring)."""

    ids: tuple[str, ...]
    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    conventions: tuple[str, ...]
    token_ids: np.ndarray
    token_offsets: np.ndarray
    response_start: np.ndarray
    logprob: np.ndarray
    offsets: np.ndarray
    rank: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    truncated: np.ndarray
    vocab: Mapping[int, str]
    sources: tuple[str, ...] = ()
    metas: tuple[dict[str, Any], ...] = ()
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not self.sources:
            object.__setattr__(self, "sources", ("ground_truth",) * n)
        if not self.metas:
            object.__setattr__(self, "metas", tuple({} for _ in range(n)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError unless every column has the shape the offsets say."""
        n = len(self.ids)
        for name in ("prompts", "responses", "conventions", "sources", "metas"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: {len(getattr(self, name))} entries for {n} examples")
        for name in ("token_offsets", "offsets"):
            off = getattr(self, name)
            if off.shape != (n + 1,) or off[0] != 0 or np.any(np.diff(off) < 0):
                raise ValueError(f"{name} are not the offsets of {n} examples")
        if self.response_start.shape != (n,) or self.truncated.shape != (n,):
            raise ValueError("response_start / truncated need one entry per example")
        n_tokens = np.diff(self.token_offsets)
        if np.any(self.response_start < 0) or np.any(self.response_start > n_tokens):
            raise ValueError("a response start lies outside its example's tokens")
        if not np.array_equal(n_tokens - self.response_start, np.diff(self.offsets)):
            raise ValueError("response lengths disagree with the scored tokens")
        if self.token_ids.shape != (int(self.token_offsets[-1]),):
            raise ValueError("token_ids do not match token_offsets")
        r = int(self.offsets[-1])
        if self.logprob.shape != (r,) or self.rank.shape != (r,):
            raise ValueError("logprob / rank do not match the response offsets")
        if self.top_ids.ndim != 2 or self.top_ids.shape[0] != r:
            raise ValueError("top_ids must be (response tokens, k)")
        if self.top_logprobs.shape != self.top_ids.shape:
            raise ValueError("top_logprobs and top_ids differ in shape")

    # ----------------------------------------------------------------- building

    @classmethod
    def empty(cls, top_k: int = 0) -> TokenScores:
        """No examples."""
        return cls.from_examples([], top_k=top_k)

    @classmethod
    def from_examples(
        cls, examples: Sequence[ScoredExample], *, top_k: int | None = None
    ) -> TokenScores:
        """Columns of scored records (in order). Every token needs k alternatives for one k
        (`top_k`, else the first token's); a token id must have one text throughout."""
        n = len(examples)
        lengths = np.fromiter((len(ex.token_ids) for ex in examples), np.int64, count=n)
        starts = np.fromiter((ex.response_start for ex in examples), np.int64, count=n)
        n_resp = np.fromiter((len(ex.logprob) for ex in examples), np.int64, count=n)
        if top_k is None:
            top_k = next((len(ex.top_ids[0]) for ex in examples if ex.top_ids), 0)
        vocab: dict[int, str] = {}
        for ex in examples:
            if len(ex.tokens) != len(ex.token_ids):
                raise ValueError(
                    f"example {ex.id!r}: {len(ex.tokens)} texts for {len(ex.token_ids)} ids"
                )
            if not (len(ex.rank) == len(ex.top_ids) == len(ex.top_logprobs) == len(ex.logprob)):
                raise ValueError(f"example {ex.id!r}: per-token lists differ in length")
            if any(len(row) != top_k for row in ex.top_ids) or any(
                len(row) != top_k for row in ex.top_logprobs
            ):
                raise ValueError(f"example {ex.id!r}: top-k rows are not {top_k} wide")
            pairs = zip(ex.token_ids, ex.tokens, strict=True)
            top_pairs = (
                pair
                for ids, texts in zip(ex.top_ids, ex.top_tokens, strict=True)
                for pair in zip(ids, texts, strict=True)
            )
            for pairs_of in (pairs, top_pairs):
                for tid, text in pairs_of:
                    known = vocab.setdefault(int(tid), text)
                    if known != text:
                        raise ValueError(f"token id {tid} has two texts: {known!r} and {text!r}")

        def flat(values: list, dtype: Any) -> np.ndarray:
            return np.asarray(values, dtype=dtype).reshape(-1)

        rows = [row for ex in examples for row in ex.top_ids]
        lps = [row for ex in examples for row in ex.top_logprobs]
        return cls(
            ids=tuple(str(ex.id) for ex in examples),
            prompts=tuple(ex.prompt for ex in examples),
            responses=tuple(ex.response for ex in examples),
            conventions=tuple(ex.convention for ex in examples),
            token_ids=flat([t for ex in examples for t in ex.token_ids], np.int32),
            token_offsets=_offsets(lengths),
            response_start=starts.astype(np.int32),
            logprob=flat([v for ex in examples for v in ex.logprob], np.float64),
            offsets=_offsets(n_resp),
            rank=flat([v for ex in examples for v in ex.rank], np.int32),
            top_ids=_matrix(rows, int(n_resp.sum()), top_k, np.int32),
            top_logprobs=_matrix(lps, int(n_resp.sum()), top_k, np.float32),
            truncated=np.fromiter((bool(ex.truncated) for ex in examples), bool, count=n),
            vocab=vocab,
            sources=tuple(ex.source for ex in examples),
            metas=tuple(dict(ex.meta) for ex in examples),
        )

    @staticmethod
    def concat(parts: Sequence[TokenScores]) -> TokenScores:
        """The examples of `parts`, one part after the other (all parts of one top-k width)."""
        parts = list(parts)
        if not parts:
            return TokenScores.empty()
        if len(parts) == 1:
            return parts[0]
        widths = {p.top_ids.shape[1] for p in parts if len(p)}
        if len(widths) > 1:
            raise ValueError(f"cannot join scores of top-k widths {sorted(widths)}")
        width = widths.pop() if widths else parts[0].top_ids.shape[1]
        vocabs = list({id(p.vocab): p.vocab for p in parts}.values())
        if len(vocabs) == 1:
            vocab: Mapping[int, str] = vocabs[0]  # one store read: share its vocabulary
        else:
            vocab = {}
            for v in sorted(vocabs, key=len):
                vocab.update(v)  # type: ignore[attr-defined]

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        def cat_offsets(name: str) -> np.ndarray:
            return _offsets(np.concatenate([np.diff(getattr(p, name)) for p in parts]))

        def tup(name: str) -> tuple:
            return tuple(v for p in parts for v in getattr(p, name))

        return TokenScores(
            ids=tup("ids"),
            prompts=tup("prompts"),
            responses=tup("responses"),
            conventions=tup("conventions"),
            token_ids=cat("token_ids"),
            token_offsets=cat_offsets("token_offsets"),
            response_start=cat("response_start"),
            logprob=cat("logprob"),
            offsets=cat_offsets("offsets"),
            rank=cat("rank"),
            top_ids=np.concatenate([p.top_ids.reshape(-1, width) for p in parts]),
            top_logprobs=np.concatenate([p.top_logprobs.reshape(-1, width) for p in parts]),
            truncated=cat("truncated"),
            vocab=vocab,
            sources=tup("sources"),
            metas=tup("metas"),
        )

    def take(
        self,
        rows: Sequence[int] | np.ndarray,
        *,
        sources: Sequence[str] | None = None,
        metas: Sequence[dict[str, Any]] | None = None,
    ) -> TokenScores:
        """The examples `rows` (in that order, repeats allowed), optionally with new sources and
        metas."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        tok_index, tok_offsets = gather_index(self.token_offsets, rows)
        resp_index, resp_offsets = gather_index(self.offsets, rows)
        pick = rows.tolist()
        return TokenScores(
            ids=tuple(self.ids[i] for i in pick),
            prompts=tuple(self.prompts[i] for i in pick),
            responses=tuple(self.responses[i] for i in pick),
            conventions=tuple(self.conventions[i] for i in pick),
            token_ids=self.token_ids[tok_index],
            token_offsets=tok_offsets,
            response_start=self.response_start[rows],
            logprob=self.logprob[resp_index],
            offsets=resp_offsets,
            rank=self.rank[resp_index],
            top_ids=self.top_ids[resp_index],
            top_logprobs=self.top_logprobs[resp_index],
            truncated=self.truncated[rows],
            vocab=self.vocab,
            sources=tuple(sources) if sources is not None else tuple(self.sources[i] for i in pick),
            metas=tuple(metas) if metas is not None else tuple(self.metas[i] for i in pick),
        )

    def with_labels(self, sources: Sequence[str], metas: Sequence[dict[str, Any]]) -> TokenScores:
        """The same scores with other per-example sources and metas (arrays shared)."""
        return replace(self, sources=tuple(sources), metas=tuple(metas), _cache={})

    # ----------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def top_k(self) -> int:
        """Width of the top-k alternatives."""
        return int(self.top_ids.shape[1])

    @property
    def n_response(self) -> np.ndarray:
        """Response tokens per example (int64)."""
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        """Response tokens pooled over all examples."""
        return int(self.offsets[-1])

    def ppl(self) -> np.ndarray:
        """Token perplexities exp(-logprob) of all response tokens (float64; cached, read-only)."""
        cached = self._cache.get("ppl")
        if cached is None:
            cached = np.exp(-self.logprob)
            cached.flags.writeable = False
            self._cache["ppl"] = cached
        return cached

    def ppl_of(self, i: int) -> np.ndarray:
        """Response-token perplexities of example `i`."""
        return self.ppl()[self.offsets[i] : self.offsets[i + 1]]

    def seq_ppl(self) -> np.ndarray:
        """Sequence perplexity exp(mean NLL) per example (NaN without response tokens), computed
        exactly as `ScoredExample.seq_ppl` does (cached)."""
        cached = self._cache.get("seq_ppl")
        if cached is None:
            lp, off = self.logprob, self.offsets
            cached = np.full(len(self), np.nan)
            for i in np.flatnonzero(np.diff(off) > 0).tolist():
                cached[i] = math.exp(-float(np.mean(lp[off[i] : off[i + 1]])))
            cached.flags.writeable = False
            self._cache["seq_ppl"] = cached
        return cached

    def response_token_ids(self) -> np.ndarray:
        """Token ids of all response tokens, example after example (aligned with `logprob`)."""
        cached = self._cache.get("response_token_ids")
        if cached is None:
            n = self.n_response
            starts = self.token_offsets[:-1] + self.response_start
            index = np.arange(self.n_tokens, dtype=np.int64)
            index += np.repeat(starts - self.offsets[:-1], n)
            cached = self.token_ids[index]
            cached.flags.writeable = False
            self._cache["response_token_ids"] = cached
        return cached

    def per_example_max_ppl(self) -> np.ndarray:
        """Largest token perplexity per example (NaN without response tokens)."""
        out = np.full(len(self), np.nan)
        nonempty = np.flatnonzero(self.n_response > 0)
        if nonempty.size:
            out[nonempty] = np.maximum.reduceat(self.ppl(), self.offsets[:-1][nonempty])
        return out

    def per_example_count(self, flags: np.ndarray) -> np.ndarray:
        """Per-example count of True in a boolean array aligned with `logprob` (int64)."""
        out = np.zeros(len(self), dtype=np.int64)
        nonempty = np.flatnonzero(self.n_response > 0)
        if nonempty.size:
            out[nonempty] = np.add.reduceat(
                np.asarray(flags, dtype=bool).view(np.uint8),
                self.offsets[:-1][nonempty],
                dtype=np.int64,
            )
        return out

    def texts(self, ids: np.ndarray) -> list[str]:
        """Token texts of `ids` (from `vocab`; a store's vocabulary looks them up at once)."""
        vocab = self.vocab
        many = getattr(vocab, "texts_of", None)
        if many is not None:
            return many(np.asarray(ids).reshape(-1))
        return [vocab[i] for i in ids.reshape(-1).tolist()]

    def example(self, i: int) -> ScoredExample:
        """Example `i` as a `ScoredExample` record."""
        tok = self.token_ids[self.token_offsets[i] : self.token_offsets[i + 1]]
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        top_ids = self.top_ids[lo:hi]
        k = self.top_k
        top_texts = self.texts(top_ids)
        return ScoredExample(
            id=self.ids[i],
            prompt=self.prompts[i],
            response=self.responses[i],
            convention=self.conventions[i],
            token_ids=tok.tolist(),
            tokens=self.texts(tok),
            response_start=int(self.response_start[i]),
            logprob=self.logprob[lo:hi].tolist(),
            rank=self.rank[lo:hi].tolist(),
            top_ids=top_ids.tolist(),
            top_tokens=[top_texts[j : j + k] for j in range(0, len(top_texts), k)]
            if k
            else [[] for _ in range(hi - lo)],
            top_logprobs=self.top_logprobs[lo:hi].tolist(),
            truncated=bool(self.truncated[i]),
            source=self.sources[i],
            meta=dict(self.metas[i]),
        )

    def to_examples(self) -> list[ScoredExample]:
        """Every example as a `ScoredExample` record, in order."""
        return [self.example(i) for i in range(len(self))]
