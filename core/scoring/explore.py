"""The Explore page's data, without Streamlit: the example table's filter, sort and search, the
ground truth's summary line, and the analytics tab's sources (answers cut at max_new_tokens left
out, the examples every source shares), their per-token perplexities and the tables as shown.

A source is columnar `TokenScores`, as in `core.scoring.analytics`, through every filter. Numbers are written by `core.fmt`, sources named by
`source_label`. The page caches what these compute and keeps the widgets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from core import fmt
from core.data.records import Example
from core.scoring.analytics import (
    Groups,
    category_shares,
    sequence_ppl_table,
    share_above_tau,
    source_label,
)
from core.scoring.tokens import TokenScores

#: The example table's orders: name -> (column, ascending), None for the dataset's own order.
SORTS: dict[str, tuple[str, bool] | None] = {
    "dataset order": None,
    "sequence ppl, high → low": ("seq ppl", False),
    "sequence ppl, low → high": ("seq ppl", True),
    "share > τ, high → low": ("share > τ", False),
    "length, long → short": ("tokens", False),
}


# ------------------------------------------------------------------------------ example table


def search_texts(scores: TokenScores) -> pd.Series:
    """Lower-cased prompt + response text per example, for the text search."""
    pairs = zip(scores.prompts, scores.responses, strict=True)
    return pd.Series([(prompt + "\n" + response).lower() for prompt, response in pairs])


def filter_examples(
    table: pd.DataFrame,
    lo: float,
    hi: float,
    *,
    texts: pd.Series | None = None,
    query: str = "",
    sort: str = "dataset order",
) -> pd.DataFrame:
    """The rows of an example table (`core.scoring.analytics.example_table`) whose sequence
    perplexity lies in [lo, hi] (an example without response tokens has none: never in range)
    and, for a non-blank `query`, whose text (`search_texts`, one per row) holds it
    (case-insensitive, not a pattern), in the order `sort` names (`SORTS`; stable), numbered
    from 0."""
    keep = (table["seq ppl"] >= lo) & (table["seq ppl"] <= hi)
    if query.strip() and texts is not None:
        keep &= texts.str.contains(query.strip().lower(), regex=False)
    view = table[keep.to_numpy()]
    if SORTS[sort] is not None:
        column, ascending = SORTS[sort]
        view = view.sort_values(column, ascending=ascending, kind="stable")
    return view.reset_index(drop=True)


def page_holding(ids: Sequence[str], current: str, page_size: int) -> int:
    """The page (from 1) of a table of `ids` shown `page_size` rows a page that holds `current`
    (page 1 when it is not there)."""
    hits = np.flatnonzero(np.asarray(ids, dtype=object) == current)
    return int(hits[0]) // page_size + 1 if hits.size else 1


def summary_line(gt: TokenScores, tau: float) -> str:
    """Dataset summary of the ground truth in one line of Markdown (from the columns)."""
    seq = np.array(gt.seq_ppl()[gt.n_response > 0], dtype=np.float64)
    n_tokens = gt.n_tokens
    above = int(np.count_nonzero(gt.ppl() > tau))
    share = above / n_tokens if n_tokens else float("nan")
    return (
        f"**{fmt.count(len(gt))}** examples · **{fmt.count(n_tokens)}** ground-truth response "
        f"tokens · sequence ppl **{fmt.num(seq.mean())}** (var {fmt.num(seq.var())}) · "
        f"**{fmt.share(share)}** of tokens have ppl > τ = {fmt.tau(tau)}"
    )


def seq_ppl_caption(truth: float, answers: Sequence[tuple[str, float]]) -> str:
    """The sequence perplexity of the ground truth (`truth`) and of each (title, seq ppl)
    answer beside it, as a multiple of the ground truth's."""
    parts = [f"{title} {ppl:.2f} ({ppl / truth:.2f}× GT)" for title, ppl in answers]
    return f"Sequence perplexity: ground truth {truth:.2f} · " + " · ".join(parts)


# ------------------------------------------------------------------------------ sources


def source_examples(scores: TokenScores) -> list[Example]:
    """The unscored examples behind the scores (texts and meta, no tokens): what the
    generation store and generated sets are matched on."""
    return [
        Example(id=ex_id, prompt=prompt, response=response, meta=dict(meta))
        for ex_id, prompt, response, meta in zip(
            scores.ids, scores.prompts, scores.responses, scores.metas, strict=True
        )
    ]


def keep_examples(group: TokenScores, keep: Sequence[bool]) -> TokenScores:
    """The examples of `group` where `keep` is True."""
    return group.take(np.flatnonzero(np.asarray(keep, dtype=bool)))


def count_cut(groups: Groups) -> int:
    """How many answers of all sources were cut at max_new_tokens (meta "finished" False)."""
    return sum(m.get("finished") is False for group in groups.values() for m in group.metas)


def drop_cut(groups: Groups) -> dict[str, TokenScores]:
    """Every source without its answers cut at max_new_tokens (`count_cut`): such an answer ends
    with an end-of-turn token the chat template added, not the model, which inflates its
    sequence perplexity."""
    return {
        k: keep_examples(group, [m.get("finished") is not False for m in group.metas])
        for k, group in groups.items()
    }


def shared_ids(groups: Groups) -> set[str]:
    """The ids of the examples every source has."""
    return set.intersection(*(set(group.ids) for group in groups.values()))


def keep_shared(groups: Groups, shared: set[str]) -> dict[str, TokenScores]:
    """Every source on the `shared` examples only, so the sources compare the same prompts."""
    return {
        k: keep_examples(group, [ex_id in shared for ex_id in group.ids])
        for k, group in groups.items()
    }


def shared_by_default(n_shared: int, n_total: int) -> bool:
    """Whether "Compare on shared examples only" starts on: when at least half of the selection
    (and at least 2 examples) is shared by every source, so one generated answer never shrinks
    every table to one example."""
    return n_shared >= max(2, math.ceil(n_total / 2))


# ------------------------------------------------------------------------------ analytics


def dataset_stats(groups: Groups, tau: float) -> dict[str, pd.DataFrame]:
    """Table 1 ("table"), the share above τ ("above") and the token categories ("categories")
    of the sources."""
    return {
        "table": sequence_ppl_table(groups),
        "above": share_above_tau(groups, tau),
        "categories": category_shares(groups, tau),
    }


def token_frame(groups: Groups) -> pd.DataFrame:
    """Source and perplexity of every response token (what the histogram and CDF read; the
    `ppl` column of `token_ppl_frame`, without a text per token)."""
    sources, ppls = [], []
    for source, group in groups.items():
        ppl = np.array(group.ppl())
        sources.append(np.full(ppl.size, source, dtype=object))
        ppls.append(ppl)
    return pd.DataFrame(
        {
            "source": pd.Series(np.concatenate(sources) if sources else [], dtype=object),
            "ppl": np.concatenate(ppls) if ppls else np.zeros(0),
        }
    )


def _plural(n: int, word: str) -> str:
    return f"{fmt.count(n)} {word}" + ("" if n == 1 else "s")


def cut_label(n_cut: int) -> str:
    """The label of the toggle that leaves out the `n_cut` answers cut at max_new_tokens."""
    return f"Leave out {_plural(n_cut, 'answer')} cut at max_new_tokens"


def coverage_text(groups: Mapping[str, Any], n_total: int, shared_only: bool) -> str:
    """How many of the selection's examples each analytics table stands on: "n = 2 of 50
    examples, shared by all 3 sources", or each source's own n when they are not paired."""
    if shared_only:
        n = max((len(group) for group in groups.values()), default=0)
        return (
            f"n = {fmt.count(n)} of {fmt.count(n_total)} examples, shared by all "
            f"{len(groups)} sources."
        )
    parts = [f"{source_label(source)} {fmt.count(len(group))}" for source, group in groups.items()]
    if len(groups) == 1:
        return (
            f"n = {fmt.count(len(next(iter(groups.values()))))} of {fmt.count(n_total)} examples."
        )
    return (
        f"n of {fmt.count(n_total)} examples per source (each on the examples it has, so they "
        "are not paired): " + " · ".join(parts) + "."
    )


def truncated_note(table: pd.DataFrame) -> str:
    """Which sources of a `sequence_ppl_table` have examples truncated to the context length,
    and how many ("" when none)."""
    truncated = [
        f"{source_label(src)} {n}"
        for src, n in zip(table["source"], table["n_truncated"], strict=True)
        if n
    ]
    return "Truncated to the context length: " + ", ".join(truncated) + "." if truncated else ""


def sequence_table_display(table: pd.DataFrame, above: pd.DataFrame, tau: float) -> pd.DataFrame:
    """The paper's Table 1 as shown: every number written by `core.fmt` (mean and population
    variance of per-example sequence perplexity, median, the pooled share above τ)."""
    share = above.set_index("source")["share"]
    return pd.DataFrame(
        {
            "data source": [source_label(s) for s in table["source"]],
            "examples": [fmt.count(n) for n in table["n_scored"]],
            "response tokens": [fmt.count(n) for n in table["n_tokens"]],
            "seq ppl mean (var)": [
                f"{fmt.num(m)} ({fmt.num(v)})"
                for m, v in zip(table["seq_ppl_mean"], table["seq_ppl_var"], strict=True)
            ],
            "median": [fmt.num(v) for v in table["seq_ppl_median"]],
            f"tokens > τ = {fmt.tau(tau)}": [fmt.share(share.loc[s]) for s in table["source"]],
        }
    )


def above_table_display(above: pd.DataFrame) -> pd.DataFrame:
    """Tokens above τ per source as shown (shares and counts written by `core.fmt`)."""
    return pd.DataFrame(
        {
            "data source": [source_label(s) for s in above["source"]],
            "tokens > τ": [fmt.count(n) for n in above["n_above"]],
            "share (pooled)": [fmt.share(v) for v in above["share"]],
            "mean per example": [fmt.share(v) for v in above["mean_example_share"]],
            "examples fully > τ": [fmt.count(n) for n in above["n_all_above"]],
        }
    )
