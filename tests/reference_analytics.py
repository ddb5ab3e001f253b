"""The list-based dataset statistics as they were before the columnar score store (one Python
list per token, example by example): the tests check that the columnar paths give the same
numbers, and `bench/bench_score_store.py` times them as the baseline. Not product code; torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from core.data.records import ScoredExample
from core.scoring.analytics import _TABLE_COLUMNS, _format_mean_var

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
