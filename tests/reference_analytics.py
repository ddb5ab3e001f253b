"""The list-based dataset statistics and export rows as they were before the columnar score
store (one Python list per token, example by example, on `ScoredExample` records): the tests
check that the product code, which takes `TokenScores` only, gives the same numbers, tables and
rows, and `bench/bench_score_store.py` times them as the baseline. Not product code; torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.data.records import ScoredExample
from core.masking.rules import MaskResult, labels_for
from core.scoring.analytics import (
    _TABLE_COLUMNS,
    _format_mean_var,
    shared_prefix_length,
    token_category,
)

Groups = Mapping[str, Sequence[ScoredExample]]


def _example_ppl(example: ScoredExample) -> np.ndarray:
    return example.ppl_array()


def sequence_ppl_table_reference(
    groups: Groups, *, ddof: int = 0, decimals: int = 2
) -> pd.DataFrame:
    """Per-source summary of sequence perplexity, like the paper's Table 1.

    Columns: source, n_examples, n_scored (examples with at least one response token),
    n_tokens (response tokens), n_truncated, seq_ppl_mean, seq_ppl_var, seq_ppl_median,
    seq_ppl_min, seq_ppl_max and "mean (var)" (formatted with `decimals`). Examples without
    response tokens have no sequence perplexity and are left out of the statistics.
    """
    rows = []
    for source, examples in groups.items():
        seq = np.array([ex.seq_ppl for ex in examples if ex.n_response > 0], dtype=np.float64)
        n_tokens = int(sum(ex.n_response for ex in examples))
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
                "n_truncated": int(sum(bool(ex.truncated) for ex in examples)),
                "seq_ppl_mean": mean,
                "seq_ppl_var": var,
                "seq_ppl_median": median,
                "seq_ppl_min": lo,
                "seq_ppl_max": hi,
                "mean (var)": _format_mean_var(mean, var, decimals),
            }
        )
    return pd.DataFrame(rows, columns=_TABLE_COLUMNS)


def share_above_tau_reference(groups: Groups, tau: float) -> pd.DataFrame:
    """Share of response tokens with ppl > tau, per source.

    Columns: source, tau, n_examples, n_tokens, n_above, share (pooled: n_above / n_tokens),
    mean_example_share (mean over examples with response tokens of their own share),
    n_all_above (examples whose every response token is above tau: fully masked by STM, so
    they carry no loss) and n_none_above.
    """
    rows = []
    for source, examples in groups.items():
        n_tokens = n_above = n_all = n_none = 0
        per_example: list[float] = []
        for ex in examples:
            ppl = _example_ppl(ex)
            if ppl.size == 0:
                continue
            above = int(np.count_nonzero(ppl > tau))
            n_tokens += ppl.size
            n_above += above
            per_example.append(above / ppl.size)
            n_all += above == ppl.size
            n_none += above == 0
        rows.append(
            {
                "source": source,
                "tau": float(tau),
                "n_examples": len(examples),
                "n_tokens": n_tokens,
                "n_above": n_above,
                "share": n_above / n_tokens if n_tokens else float("nan"),
                "mean_example_share": float(np.mean(per_example)) if per_example else float("nan"),
                "n_all_above": n_all,
                "n_none_above": n_none,
            }
        )
    return pd.DataFrame(rows)


def share_vs_tau_reference(groups: Groups, taus: Iterable[float]) -> pd.DataFrame:
    """Pooled and mean per-example share above tau for each tau: the "% masked vs tau" curve.

    Columns: source, tau, share, mean_example_share, n_tokens, n_above. One sort per example,
    then a binary search per tau, so long tau grids stay cheap.
    """
    taus = np.asarray(sorted(float(t) for t in taus), dtype=np.float64)
    rows = []
    for source, examples in groups.items():
        sorted_ppl = [np.sort(_example_ppl(ex)) for ex in examples if ex.n_response > 0]
        pooled = np.sort(np.concatenate(sorted_ppl)) if sorted_ppl else np.zeros(0)
        n_tokens = pooled.size
        n_above = n_tokens - np.searchsorted(pooled, taus, side="right")
        if sorted_ppl:
            per_ex = np.stack(
                [1.0 - np.searchsorted(p, taus, side="right") / p.size for p in sorted_ppl]
            )
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


def token_ppl_frame_reference(groups: Groups, *, with_category: bool = False) -> pd.DataFrame:
    """Long-form frame with one row per response token, for histograms and CDFs.

    Columns: source, example_id, position (0-based index within the response), token, ppl,
    logprob, rank; plus category if `with_category`.
    """
    sources: list[str] = []
    ids: list[str] = []
    positions: list[np.ndarray] = []
    tokens: list[str] = []
    logprobs: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    for source, examples in groups.items():
        for ex in examples:
            n = ex.n_response
            sources.extend([source] * n)
            ids.extend([ex.id] * n)
            positions.append(np.arange(n, dtype=np.int64))
            tokens.extend(ex.response_tokens)
            logprobs.append(np.asarray(ex.logprob, dtype=np.float64)[:n])
            rank = np.full(n, -1, dtype=np.int64)
            rank[: min(n, len(ex.rank))] = ex.rank[:n]
            ranks.append(rank)
    logprob = np.concatenate(logprobs) if logprobs else np.zeros(0)
    frame = pd.DataFrame(
        {
            "source": pd.Series(sources, dtype=object),
            "example_id": pd.Series(ids, dtype=object),
            "position": np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64),
            "token": pd.Series(tokens, dtype=object),
            "ppl": np.exp(-logprob),
            "logprob": logprob,
            "rank": np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64),
        }
    )
    if with_category:
        frame["category"] = [token_category(t) for t in tokens]
    return frame


def category_shares_reference(groups: Groups, tau: float) -> pd.DataFrame:
    """Token-category mix of all response tokens vs of high-perplexity (ppl > tau) ones, one
    token at a time."""
    categories = ("number", "symbol", "word", "whitespace")
    rows = []
    for source, examples in groups.items():
        n_all = dict.fromkeys(categories, 0)
        n_high = dict.fromkeys(categories, 0)
        for ex in examples:
            for token, value in zip(ex.response_tokens, _example_ppl(ex), strict=False):
                category = token_category(token)
                n_all[category] += 1
                if value > tau:
                    n_high[category] += 1
        total_all, total_high = sum(n_all.values()), sum(n_high.values())
        for category in categories:
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


def example_table_reference(examples: Sequence[ScoredExample], tau: float) -> pd.DataFrame:
    """One row per example: id, prompt preview (after the prefix all prompts share), sequence
    ppl, length, share > τ, max token ppl, truncated."""
    prompts = [ex.prompt for ex in examples]
    skip = shared_prefix_length(prompts) if len(prompts) > 1 else 0
    rows = []
    for ex in examples:
        ppl = _example_ppl(ex)
        text = ex.prompt[skip:]
        first_line = next((line for line in text.splitlines() if line.strip()), "")
        rows.append(
            {
                "id": ex.id,
                "prompt": ("…" if skip else "") + first_line.strip()[:160],
                "seq ppl": ex.seq_ppl,
                "tokens": ex.n_response,
                "share > τ": float((ppl > tau).mean()) if ppl.size else float("nan"),
                "max token ppl": float(ppl.max()) if ppl.size else float("nan"),
                "truncated": ex.truncated,
            }
        )
    return pd.DataFrame(rows)


def seq_ppl_points_reference(examples: Sequence[ScoredExample]) -> tuple[list[float], list[str]]:
    """The sequence perplexity and id of every example with response tokens (one box plot)."""
    scored = [ex for ex in examples if ex.n_response > 0]
    return [ex.seq_ppl for ex in scored], [ex.id for ex in scored]


def masked_rows_reference(
    examples: Sequence[ScoredExample], result: MaskResult
) -> list[dict[str, Any]]:
    """The export rows, example by example, each example's labels from `labels_for`."""
    assert [ex.id for ex in examples] == list(result.ids)
    rows = []
    for ex, mask in zip(examples, result.masks, strict=True):
        rows.append(
            {
                "id": ex.id,
                "messages": [
                    {"role": "user", "content": ex.prompt},
                    {"role": "assistant", "content": ex.response},
                ],
                "input_ids": [int(t) for t in ex.token_ids],
                "labels": labels_for(ex, mask),
                "response_start": int(ex.response_start),
                "n_response": int(ex.n_response),
                "n_masked": int(mask.sum()),
            }
        )
    return rows
