"""Benchmark: how long a tau change takes (masks + stats + recolour) on a realistic-size dataset.

Builds 500 synthetic scored examples with ~300 response tokens each (token NLL log-normal, so
perplexities are mostly near 1 with a heavy tail, about a fifth above tau = 2.5; code-like token
texts with top-5 alternatives, as the scorer stores them), then times, as the median over
repeats, each interactive operation of `core.masking.rules` against a naive per-example pure-Python
loop doing the same high-mode work in the same run. The "page" rows time what the Masking studio
recomputes on a tau change: masks + stats, the heatmap HTML of the selected example with its
mask (the recolour), and, in the last page row, also the share-vs-tau curve with its plotly
figure, which the page builds on the first visit of a tau and caches (Streamlit's own rerun and
transport to the browser are excluded; the page's dict-built histogram adds a few ms).
Prints a markdown table. Run: ``.venv/bin/python bench/bench_masking.py [--examples 500]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name  # noqa: E402
from core.data.records import ScoredExample  # noqa: E402
from core.masking.rules import (
    MaskConfig,
    PplIndex,
    compute_masks,
    labels_for,
    share_vs_tau_curve,
    solve_tau_for_share,
)
from core.scoring.tokens import TokenScores  # noqa: E402
from core.viz.charts import share_vs_tau_chart  # noqa: E402
from core.viz.heatmap import render_token_heatmap  # noqa: E402

# Token texts for the synthetic responses: code-ish pieces, whitespace and newlines, so the
# heatmap renderer does the same escaping and whitespace work as on real MBPP responses.
TOKEN_TEXTS = (
    "def",
    " ",
    "    ",
    "\n",
    "\n    ",
    "return",
    " x",
    " +",
    "(",
    ")",
    ":",
    " for",
    " i",
    " in",
    " range",
    "len",
    "_",
    "list",
    "[",
    "]",
    " =",
    " if",
    " ==",
    " 0",
    "1",
    ",",
    " None",
    "print",
    "'",
    "a",
    "<",
    ">",
    "&",
    "\t",
    " sum",
)


def make_examples(n_examples: int, mean_len: int, seed: int = 0) -> list[ScoredExample]:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n_examples):
        n = int(rng.integers(int(mean_len * 0.8), int(mean_len * 1.2) + 1))
        prompt_len = int(rng.integers(20, 120))
        nll = rng.lognormal(mean=-1.3, sigma=1.4, size=n)
        ids = rng.integers(0, len(TOKEN_TEXTS), size=prompt_len + n).tolist()
        texts = [TOKEN_TEXTS[j] for j in ids]  # a token id has one text, as in a vocabulary
        top = rng.integers(0, len(TOKEN_TEXTS), size=(n, 5))
        top_lp = np.sort(np.log(rng.dirichlet(np.ones(6), size=n)[:, :5]), axis=1)[:, ::-1]
        examples.append(
            ScoredExample(
                id=f"ex{i:05d}",
                prompt="p",
                response="r",
                convention="prompt",
                token_ids=ids,
                tokens=texts,
                response_start=prompt_len,
                logprob=(-nll).tolist(),
                rank=rng.integers(0, 20, size=n).tolist(),
                top_ids=top.tolist(),
                top_tokens=[[TOKEN_TEXTS[j] for j in row] for row in top],
                top_logprobs=top_lp.tolist(),
            )
        )
    return examples


def naive_high(ids: list[str], ppl_lists: list[list[float]], tau: float) -> dict:
    """Pure-Python per-example loop: masks, per-example shares, pooled share, fully masked."""
    masks, shares, fully = [], [], []
    total = masked = 0
    for ex_id, ppl in zip(ids, ppl_lists, strict=True):
        mask = [p > tau for p in ppl]
        k = sum(mask)
        masks.append(mask)
        shares.append(k / len(ppl) if ppl else float("nan"))
        if k == len(ppl):
            fully.append(ex_id)
        total += len(ppl)
        masked += k
    return {"masks": masks, "shares": shares, "pooled": masked / total, "fully": fully}


def timeit(fn: Callable[[int], object], repeats: int) -> float:
    """Median wall time in ms of fn(i) over repeats (i lets each call use a different tau).

    One untimed warm-up call first, so first-touch costs are not counted as a tau change.
    """
    fn(repeats)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=300, help="mean response tokens")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    examples = make_examples(args.examples, args.tokens)
    taus = np.geomspace(1.2, 20.0, 97).tolist()

    scores = TokenScores.from_examples(examples)  # the dataset as the app holds it
    t0 = time.perf_counter()
    index = PplIndex.from_scores(scores)
    build_ms = (time.perf_counter() - t0) * 1000.0
    t0 = time.perf_counter()
    index.rank_random(0)
    rank_random_ms = (time.perf_counter() - t0) * 1000.0
    t0 = time.perf_counter()
    index.rank_top()
    rank_top_ms = (time.perf_counter() - t0) * 1000.0
    index.sorted_ppl()
    index.unique_counts()

    ids = [ex.id for ex in examples]
    ppl_lists = [ex.ppl for ex in examples]

    # sanity: vectorised and naive agree
    check = compute_masks(index, MaskConfig(tau=2.5))
    ref = naive_high(ids, ppl_lists, 2.5)
    assert [m.tolist() for m in check.masks] == ref["masks"]
    assert math.isclose(check.stats().pooled_share, ref["pooled"])
    share_at_default = check.stats().pooled_share

    def tau_of(i: int) -> float:
        return taus[i % len(taus)]

    def high(i: int) -> None:
        compute_masks(index, MaskConfig(mode="high", tau=tau_of(i))).stats()

    def random_mode(i: int) -> None:
        compute_masks(index, MaskConfig(mode="random", tau=tau_of(i))).stats()

    def percentile(i: int) -> None:
        compute_masks(index, MaskConfig(mode="percentile", k_percent=5 + i % 40)).stats()

    def by_share(i: int) -> None:
        compute_masks(index, MaskConfig(tau=None, target_share=(i % 50) / 50)).stats()

    def solve(i: int) -> None:
        solve_tau_for_share(index, (i % 50) / 50)

    def curve(_i: int) -> None:
        share_vs_tau_curve(index, taus * 2 + taus[:6])  # 200 taus

    def labels(i: int) -> None:
        res = compute_masks(index, MaskConfig(tau=tau_of(i)))
        for ex, m in zip(examples, res.masks, strict=True):
            labels_for(ex, m)

    def naive(i: int) -> None:
        naive_high(ids, ppl_lists, tau_of(i))

    shown = len(examples) // 2  # the example on screen

    def page_recolour(i: int) -> None:
        res = compute_masks(index, MaskConfig(mode="high", tau=tau_of(i)))
        res.stats()
        render_token_heatmap(examples[shown], tau=res.tau, masked=res.masks[shown])

    def naive_recolour(i: int) -> None:
        out = naive_high(ids, ppl_lists, tau_of(i))
        render_token_heatmap(examples[shown], tau=tau_of(i), masked=out["masks"][shown])

    curve_taus = np.geomspace(1.0, 1000.0, 240)

    def page_full(i: int) -> None:
        res = compute_masks(index, MaskConfig(mode="high", tau=tau_of(i)))
        stats = res.stats()
        render_token_heatmap(examples[shown], tau=res.tau, masked=res.masks[shown])
        curve = share_vs_tau_curve(index, curve_taus)
        curve.insert(0, "source", "ground_truth")
        share_vs_tau_chart(curve, res.tau, title="Share of response tokens masked vs τ")
        np.histogram(stats.per_example_share, bins=np.linspace(0.0, 1.0, 21))

    r = args.repeats
    rows = [
        ("tau change, mode high: masks + stats", timeit(high, r)),
        ("tau change, mode random: masks + stats", timeit(random_mode, r)),
        ("k change, mode percentile top: masks + stats", timeit(percentile, r)),
        ("share change: solve tau + masks + stats", timeit(by_share, r)),
        ("solve_tau_for_share only", timeit(solve, r)),
        ("share_vs_tau_curve, 200 taus", timeit(curve, r)),
        ("masks + labels_for all examples (export path)", timeit(labels, max(5, r // 5))),
        ("**naive pure-Python loop, mode high: masks + stats**", timeit(naive, max(5, r // 5))),
    ]
    naive_ms = rows[-1][1]
    page_rows = [
        (
            "page: tau change -> masks + stats + heatmap HTML of one example",
            timeit(page_recolour, r),
        ),
        (
            "page: the above + share-vs-tau curve and its plotly figure (first visit of a tau)",
            timeit(page_full, r),
        ),
        (
            "**naive loop: masks + stats + the same heatmap HTML**",
            timeit(naive_recolour, max(5, r // 5)),
        ),
    ]
    naive_page_ms = page_rows[-1][1]

    n_tok = index.n_tokens
    print(f"## bench_masking: {len(examples)} examples, {n_tok} response tokens")
    print()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable), "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"{dt.date.today().isoformat()}; median of {r} repeats "
        f"(labels and naive rows: {max(5, r // 5)}); share masked at tau 2.5: "
        f"{share_at_default:.1%}"
    )
    print()
    print("| operation | median ms | naive / this |")
    print("|---|---:|---:|")
    for name, ms in rows:
        ratio = "-" if "labels_for" in name else f"{naive_ms / ms:.0f}x"
        print(f"| {name} | {ms:.2f} | {ratio} |")
    print()
    n_shown = examples[shown].n_response
    print(f"Recolour on a tau change (heatmap of one {n_shown}-token example; 100 ms target):")
    print()
    print("| operation | median ms | naive / this |")
    print("|---|---:|---:|")
    for name, ms in page_rows:
        print(f"| {name} | {ms:.2f} | {naive_page_ms / ms:.1f}x |")
    print()
    print("One-off per dataset / per seed (cached on the PplIndex):")
    print()
    print("| operation | ms |")
    print("|---|---:|")
    print(f"| PplIndex.from_scores (incl. exp of log-probs) | {build_ms:.1f} |")
    print(f"| random ranks for a new seed | {rank_random_ms:.1f} |")
    print(f"| percentile ranks (top) | {rank_top_ms:.1f} |")


if __name__ == "__main__":
    main()
