"""Dataset-level perplexity statistics behind the paper's tables and figures.

Every function takes `groups`: a mapping from a data-source label ("ground_truth",
"self_output", "rephrase", ...) to that source's scores as columnar `TokenScores` (what the
score store reads; records convert once with `TokenScores.from_examples`), and computes on their
flat arrays, never per token in Python. The mapping key is the label used in the output, so
callers can compare e.g. two scorers of the same source. Output rows follow the mapping's order.
`tests/reference_analytics.py` keeps the list-based code, example by example, that the tests
compare these numbers with.

Conventions (the paper leaves these open; see docs/METHOD.md, "Known ambiguities"):
- Token perplexity is exp(-logprob) of a response token; prompt tokens are never counted.
- "Above tau" is strict (`ppl > tau`), the same rule Selective Token Masking uses.
- Shares are reported two ways: pooled over all response tokens of a source, and as the mean
  of per-example shares (examples without response tokens are skipped for the latter).
- Variances are population variances (ddof=0) unless `ddof` says otherwise.

Plain numpy/pandas: no Streamlit, no plotting.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from core.scoring.tokens import TokenScores

Groups = Mapping[str, TokenScores]

#: Display labels of the data sources ("self_output" -> "Self-Output"); the tables, captions and
#: charts (`core.viz`) name a source by `source_label`.
SOURCE_LABELS: dict[str, str] = {
    "ground_truth": "Ground truth",
    "self_output": "Self-Output",
    "rephrase": "Rephrase",
    "generated": "Generated",
}

CATEGORIES = ("number", "symbol", "word", "whitespace")

# Byte-level BPE / SentencePiece markers that stand for whitespace when a token list holds raw
# vocabulary strings instead of decoded text ("Ġ" space, "Ċ" newline, "ĉ" tab, "▁" space).
_WHITESPACE_MARKERS = str.maketrans({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "})
# Chat-template control tokens such as "<|eot_id|>", "<|im_end|>", "</s>", "<end_of_turn>".
_CONTROL_TOKEN = re.compile(
    r"^(<\|[^|<>]*\|>|</?s>|<(eos|bos|pad|unk|end_of_turn|start_of_turn|eot)>)$"
)
_NUMBER_PUNCT = set(".,_+-eE%")


def source_label(source: str) -> str:
    """Display label of a data source ("self_output" -> "Self-Output"; others unchanged)."""
    return SOURCE_LABELS.get(source, source)


def is_control_token(token: str) -> bool:
    """True for chat-template control tokens such as "<|eot_id|>", "</s>", "<end_of_turn>"."""
    return bool(_CONTROL_TOKEN.match(token.strip()))


def token_category(token: str) -> str:
    """Classify a decoded token as "number", "symbol", "word" or "whitespace".

    Rules, applied to the token with surrounding whitespace (and BPE whitespace markers
    Ġ Ċ ĉ ▁) removed:
    - nothing left -> "whitespace" ("\\n", "    ", "Ġ");
    - chat-template control tokens ("<|eot_id|>", "</s>") -> "symbol" (they are not words);
    - any digit and no letters -> "number" (" 42", "3.14", "-1", "1,000", "2)": a number with
      attached punctuation still counts as a number);
    - any letter (any script) -> "word" (" the", "x2", "__init__", " é", "的");
    - otherwise -> "symbol" (punctuation and operators: "==", "):", "\\\\", "#").
    """
    core = token.translate(_WHITESPACE_MARKERS).strip()
    if not core:
        return "whitespace"
    if _CONTROL_TOKEN.match(core):
        return "symbol"
    has_letter = any(ch.isalpha() for ch in core)
    has_digit = any(ch.isdigit() for ch in core)
    if has_digit and not has_letter:
        return "number"
    if has_digit and all(ch.isdigit() or ch in _NUMBER_PUNCT for ch in core):
        return "number"  # scientific notation such as "1e-5"
    if has_letter:
        return "word"
    return "symbol"


def sequence_ppl_table(groups: Groups, *, ddof: int = 0, decimals: int = 2) -> pd.DataFrame:
    """Per-source summary of sequence perplexity, like the paper's Table 1.

    Columns: source, n_examples, n_scored (examples with at least one response token),
    n_tokens (response tokens), n_truncated, seq_ppl_mean, seq_ppl_var, seq_ppl_median,
    seq_ppl_min, seq_ppl_max and "mean (var)" (formatted with `decimals`). Examples without
    response tokens have no sequence perplexity and are left out of the statistics.
    """
    rows = []
    for source, examples in groups.items():
        sizes = examples.n_response
        seq = examples.seq_ppl()[sizes > 0]
        n_tokens = int(sizes.sum())
        if seq.size:
            mean = float(seq.mean())
            var = float(seq.var(ddof=ddof)) if seq.size > ddof else float("nan")
            median, lo, hi = float(np.median(seq)), float(seq.min()), float(seq.max())
        else:
            mean = var = median = lo = hi = float("nan")
        rows.append(
            {
                "source": source,
                "n_examples": len(examples),
                "n_scored": int(seq.size),
                "n_tokens": n_tokens,
                "n_truncated": int(examples.truncated.sum()),
                "seq_ppl_mean": mean,
                "seq_ppl_var": var,
                "seq_ppl_median": median,
                "seq_ppl_min": lo,
                "seq_ppl_max": hi,
                "mean (var)": _format_mean_var(mean, var, decimals),
            }
        )
    return pd.DataFrame(rows, columns=_TABLE_COLUMNS)


_TABLE_COLUMNS = [
    "source",
    "n_examples",
    "n_scored",
    "n_tokens",
    "n_truncated",
    "seq_ppl_mean",
    "seq_ppl_var",
    "seq_ppl_median",
    "seq_ppl_min",
    "seq_ppl_max",
    "mean (var)",
]


def _format_mean_var(mean: float, var: float, decimals: int) -> str:
    if np.isnan(mean):
        return "n/a"
    var_text = "n/a" if np.isnan(var) else f"{var:.{decimals}f}"
    return f"{mean:.{decimals}f} ({var_text})"


def token_ppl_frame(groups: Groups, *, with_category: bool = False) -> pd.DataFrame:
    """Long-form frame with one row per response token, for histograms and CDFs.

    Columns: source, example_id, position (0-based index within the response), token, ppl,
    logprob, rank; plus category if `with_category`.
    """
    parts = [
        _token_frame_of(source, examples, with_category) for source, examples in groups.items()
    ]
    if not parts:
        parts = [_token_frame_of("", TokenScores.empty(), with_category)]
    return pd.concat(parts, ignore_index=True)


def _token_texts(scores: TokenScores) -> tuple[np.ndarray, np.ndarray]:
    """Distinct response-token texts (object array) and each response token's index into it:
    one vocabulary lookup per distinct id, not per token."""
    unique, inverse = np.unique(scores.response_token_ids(), return_inverse=True)
    texts = np.empty(unique.size, dtype=object)
    texts[:] = scores.texts(unique) if unique.size else []
    return texts, inverse.reshape(-1)


def _token_frame_of(source: str, scores: TokenScores, with_category: bool) -> pd.DataFrame:
    """`token_ppl_frame` of one columnar group, built from its arrays."""
    n = scores.n_response
    texts, inverse = _token_texts(scores)
    example = np.repeat(np.arange(len(scores), dtype=np.int64), n)
    ids = np.empty(len(scores), dtype=object)
    ids[:] = list(scores.ids)
    frame = pd.DataFrame(
        {
            "source": pd.Series(np.full(scores.n_tokens, source, dtype=object), dtype=object),
            "example_id": pd.Series(ids[example], dtype=object),
            "position": np.arange(scores.n_tokens, dtype=np.int64) - scores.offsets[:-1][example],
            "token": pd.Series(texts[inverse], dtype=object),
            "ppl": np.array(scores.ppl()),
            "logprob": np.array(scores.logprob, dtype=np.float64),
            "rank": scores.rank.astype(np.int64),
        }
    )
    if with_category:
        codes = np.array([token_category(t) for t in texts], dtype=object)
        frame["category"] = codes[inverse] if inverse.size else np.zeros(0, dtype=object)
    return frame


def share_above_tau(groups: Groups, tau: float) -> pd.DataFrame:
    """Share of response tokens with ppl > tau, per source.

    Columns: source, tau, n_examples, n_tokens, n_above, share (pooled: n_above / n_tokens),
    mean_example_share (mean over examples with response tokens of their own share),
    n_all_above (examples whose every response token is above tau: fully masked by STM, so
    they carry no loss) and n_none_above.
    """
    rows = []
    for source, examples in groups.items():
        sizes = examples.n_response
        above = examples.per_example_count(examples.ppl() > tau)
        scored = sizes > 0
        sizes, above = sizes[scored], above[scored]
        n_tokens, n_above = int(sizes.sum()), int(above.sum())
        per_example = above / sizes
        rows.append(
            {
                "source": source,
                "tau": float(tau),
                "n_examples": len(examples),
                "n_tokens": n_tokens,
                "n_above": n_above,
                "share": n_above / n_tokens if n_tokens else float("nan"),
                "mean_example_share": float(np.mean(per_example))
                if per_example.size
                else float("nan"),
                "n_all_above": int(np.count_nonzero(above == sizes)),
                "n_none_above": int(np.count_nonzero(above == 0)),
            }
        )
    return pd.DataFrame(rows)


def share_vs_tau(groups: Groups, taus: Iterable[float]) -> pd.DataFrame:
    """Pooled and mean per-example share above tau for each tau: the "% masked vs tau" curve.

    Columns: source, tau, share, mean_example_share, n_tokens, n_above. One sort per example,
    then a binary search per tau, so long tau grids stay cheap.
    """
    taus = np.asarray(sorted(float(t) for t in taus), dtype=np.float64)
    rows = []
    for source, examples in groups.items():
        ppl, offsets = examples.ppl(), examples.offsets
        keep = np.flatnonzero(examples.n_response > 0)
        lengths = examples.n_response[keep]
        # Token t of example e is above tau_j exactly for j < bin(t), bin = #taus below its ppl;
        # per-example counts of each bin, summed from the right, give the count above each tau.
        bins = np.searchsorted(taus, ppl, side="left")
        example = np.repeat(np.arange(offsets.size - 1, dtype=np.int64), np.diff(offsets))
        rank = np.full(offsets.size - 1, -1, dtype=np.int64)
        rank[keep] = np.arange(keep.size)
        row_of = rank[example]
        kept = row_of >= 0
        width = taus.size + 1
        counts = np.bincount(
            row_of[kept] * width + bins[kept], minlength=keep.size * width
        ).reshape(keep.size, width)
        above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (examples, taus)
        n_tokens = int(lengths.sum())
        n_above = above.sum(axis=0) if keep.size else np.zeros(taus.size, dtype=np.int64)
        if keep.size:
            per_ex = np.ascontiguousarray(1.0 - (lengths[:, None] - above) / lengths[:, None])
            mean_share = per_ex.mean(axis=0)
        else:
            mean_share = np.full(taus.size, np.nan)
        for i, tau in enumerate(taus):
            rows.append(
                {
                    "source": source,
                    "tau": float(tau),
                    "share": n_above[i] / n_tokens if n_tokens else float("nan"),
                    "mean_example_share": float(mean_share[i]),
                    "n_tokens": int(n_tokens),
                    "n_above": int(n_above[i]),
                }
            )
    return pd.DataFrame(
        rows, columns=["source", "tau", "share", "mean_example_share", "n_tokens", "n_above"]
    )


def category_shares(groups: Groups, tau: float) -> pd.DataFrame:
    """Token-category mix of all response tokens vs of high-perplexity (ppl > tau) ones.

    One row per (source, category) for every category in CATEGORIES, zeros included. Columns:
    source, category, n_all, share_all (share among all response tokens of the source), n_high,
    share_high (share among the source's tokens with ppl > tau; NaN if there are none), tau.
    """
    rows = []
    for source, examples in groups.items():
        texts, inverse = _token_texts(examples)  # one category per distinct token id
        code = np.array([CATEGORIES.index(token_category(t)) for t in texts], np.int64)
        per_token = code[inverse] if inverse.size else np.zeros(0, np.int64)
        all_counts = np.bincount(per_token, minlength=len(CATEGORIES))
        high_counts = np.bincount(per_token[examples.ppl() > tau], minlength=len(CATEGORIES))
        n_all = {c: int(all_counts[j]) for j, c in enumerate(CATEGORIES)}
        n_high = {c: int(high_counts[j]) for j, c in enumerate(CATEGORIES)}
        total_all, total_high = sum(n_all.values()), sum(n_high.values())
        for category in CATEGORIES:
            rows.append(
                {
                    "source": source,
                    "category": category,
                    "n_all": n_all[category],
                    "share_all": n_all[category] / total_all if total_all else float("nan"),
                    "n_high": n_high[category],
                    "share_high": n_high[category] / total_high if total_high else float("nan"),
                    "tau": float(tau),
                }
            )
    return pd.DataFrame(rows)


def scores_signature(groups: Groups) -> str:
    """Short fingerprint of scored groups (ids, lengths, sequence ppl): a cache key for
    frames derived from them."""
    h = hashlib.sha256()
    for source, examples in groups.items():
        h.update(source.encode())
        rows = zip(
            examples.ids, examples.n_response.tolist(), examples.seq_ppl().tolist(), strict=True
        )
        for ex_id, n, seq in rows:
            h.update(f"{ex_id}\x00{n}\x00{seq!r}".encode())
    return h.hexdigest()[:16]


def shared_prefix_length(texts: Sequence[str], minimum: int = 20) -> int:
    """Length of the prefix all texts share (cut back to a word boundary), or 0 if shorter than
    `minimum`: task prompts often open with the same instruction, which hides the part that
    differs in a one-line preview."""
    if not texts:
        return 0
    first, last = min(texts), max(texts)
    n = next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first))
    if n >= len(first):
        return 0  # one prompt is a prefix of all the others: nothing would be left of it
    n = first.rfind(" ", 0, n + 1) + 1
    return n if n >= minimum else 0


def example_table(examples: TokenScores, tau: float) -> pd.DataFrame:
    """One row per example: id, prompt preview (after the prefix all prompts share), sequence
    ppl, length, share > τ, max token ppl, truncated: `example_columns` (once per selection)
    and `example_shares` (per τ)."""
    table = example_columns(examples)
    table.insert(4, "share > τ", example_shares(examples, tau))
    return table


def prompt_previews(prompts: Sequence[str]) -> list[str]:
    """The first non-blank line of each prompt after the prefix all prompts share (160
    characters at most; "…" marks a cut prefix): the example table's prompt column."""
    skip = shared_prefix_length(prompts) if len(prompts) > 1 else 0
    out = []
    for prompt in prompts:
        first_line = next((line for line in prompt[skip:].splitlines() if line.strip()), "")
        out.append(("…" if skip else "") + first_line.strip()[:160])
    return out


def example_columns(scores: TokenScores) -> pd.DataFrame:
    """The τ-independent columns of `example_table`: id, prompt, seq ppl, tokens, max token ppl,
    truncated."""
    return pd.DataFrame(
        {
            "id": list(scores.ids),
            "prompt": prompt_previews(scores.prompts),
            "seq ppl": np.array(scores.seq_ppl()),
            "tokens": scores.n_response.astype(np.int64),
            "max token ppl": scores.per_example_max_ppl(),
            "truncated": np.asarray(scores.truncated, dtype=bool),
        }
    )


def example_shares(scores: TokenScores, tau: float) -> np.ndarray:
    """Each example's share of response tokens with ppl > τ (NaN without response tokens)."""
    n = scores.n_response
    above = scores.per_example_count(scores.ppl() > tau)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, above / np.maximum(n, 1), np.nan)


def seq_ppl_ticks(values: np.ndarray) -> list[float]:
    """Log-spaced 1-2-2.5-5 stops covering the values, for the range filter."""
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 1.0
    hi = float(finite.max()) if finite.size else 10.0
    stops: list[float] = []
    for exponent in range(math.floor(math.log10(max(lo, 1e-3))), math.ceil(math.log10(hi)) + 1):
        for mantissa in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 7):
            stops.append(round(mantissa * 10.0**exponent, 6))
    below = [s for s in stops if s <= lo]
    above = [s for s in stops if s >= hi]
    start = stops.index(below[-1]) if below else 0
    end = stops.index(above[0]) if above else len(stops) - 1
    return stops[start : end + 1]
