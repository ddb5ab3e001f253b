"""The Explore page's data without Streamlit (`core.scoring.explore`): the example table's filter,
sort and paging, the summary line, the analytics tab's source filters (answers cut at
max_new_tokens, shared examples), the token frame and the tables as shown, on columns."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.scoring import analytics
from core.scoring.explore import (
    SORTS,
    above_table_display,
    count_cut,
    coverage_text,
    cut_label,
    dataset_stats,
    drop_cut,
    filter_examples,
    keep_shared,
    page_holding,
    search_texts,
    seq_ppl_caption,
    sequence_table_display,
    shared_by_default,
    shared_ids,
    source_examples,
    summary_line,
    token_frame,
    truncated_note,
)
from core.scoring.tokens import TokenScores
from tests.factories import synthetic


@pytest.fixture
def scores() -> TokenScores:
    return synthetic()


def _generated(scores: TokenScores, finished: list[bool]) -> TokenScores:
    """The first len(finished) examples as a generated source whose answers say whether they
    finished (meta "finished")."""
    part = scores.take(np.arange(len(finished)))
    return part.with_labels(part.sources, [{"finished": f} for f in finished])


def test_search_texts_are_the_lower_cased_prompt_and_response(scores):
    texts = search_texts(scores)
    assert len(texts) == len(scores)
    assert texts[2] == (scores.prompts[2] + "\n" + scores.responses[2]).lower()


def test_filter_keeps_the_range_and_the_query_and_sorts_the_whole_set(scores):
    table = analytics.example_table(scores, 2.5)
    seq = table["seq ppl"]
    # every example with a sequence perplexity; ex-3 has no response tokens (NaN): never in range
    scored = table[seq.notna()].reset_index(drop=True)
    assert "ex-3" not in set(scored["id"]) and len(scored) == len(table) - 1
    assert filter_examples(table, -math.inf, math.inf).equals(scored)
    lo, hi = float(seq.quantile(0.25)), float(seq.quantile(0.75))
    view = filter_examples(table, lo, hi)
    assert list(view["id"]) == [i for i, v in zip(table["id"], seq, strict=True) if lo <= v <= hi]
    # the query matches text, case-insensitively and literally ("(" is not a pattern)
    texts = search_texts(scores)
    found = filter_examples(table, -math.inf, math.inf, texts=texts, query=" PROBLEM 4:")
    assert list(found["id"]) == ["ex-4"]
    assert len(filter_examples(table, -math.inf, math.inf, texts=texts, query="f(")) == len(scored)
    blank = filter_examples(table, -math.inf, math.inf, texts=texts, query="   ")
    assert blank.equals(scored)
    for sort, order in SORTS.items():
        view = filter_examples(table, -math.inf, math.inf, sort=sort)
        assert list(view.index) == list(range(len(scored)))
        if order is None:
            assert list(view["id"]) == list(scored["id"])
        else:
            column, ascending = order
            expected = scored.sort_values(column, ascending=ascending, kind="stable")
            assert list(view["id"]) == list(expected["id"])


def test_page_holding_opens_on_the_page_of_the_example():
    ids = [f"ex-{i}" for i in range(120)]
    assert page_holding(ids, "ex-0", 50) == 1
    assert page_holding(ids, "ex-49", 50) == 1
    assert page_holding(ids, "ex-50", 50) == 2
    assert page_holding(ids, "ex-119", 50) == 3
    assert page_holding(ids, "missing", 50) == 1
    assert page_holding([], "ex-0", 50) == 1


def test_summary_line_counts_the_ground_truth(scores):
    line = summary_line(scores, 2.5)
    share = np.count_nonzero(scores.ppl() > 2.5) / scores.n_tokens
    assert line.startswith(f"**{len(scores)}** examples · **{scores.n_tokens:,}** ground-truth")
    assert f"**{100 * share:.1f}%** of tokens have ppl > τ = 2.5" in line


def test_seq_ppl_caption_compares_each_answer_with_the_ground_truth():
    assert seq_ppl_caption(4.0, [("Model's own answer", 2.0), ("Rephrase", 3.0)]) == (
        "Sequence perplexity: ground truth 4.00 · Model's own answer 2.00 (0.50× GT) · "
        "Rephrase 3.00 (0.75× GT)"
    )


def test_source_examples_carry_the_texts_and_metas(scores):
    examples = source_examples(scores)
    assert [ex.id for ex in examples] == list(scores.ids)
    assert examples[1].prompt == scores.prompts[1] and examples[1].response == scores.responses[1]
    assert examples[1].meta == scores.metas[1] and examples[1].meta is not scores.metas[1]


def test_cut_answers_are_counted_and_left_out(scores):
    gen = _generated(scores, [True, False, True, False])
    groups = {"ground_truth": scores, "generated": gen}
    assert count_cut(groups) == 2
    assert cut_label(2) == "Leave out 2 answers cut at max_new_tokens"
    assert cut_label(1) == "Leave out 1 answer cut at max_new_tokens"
    kept = drop_cut(groups)
    assert kept["ground_truth"] is not None and len(kept["ground_truth"]) == len(scores)
    assert list(kept["generated"].ids) == ["ex-0", "ex-2"]
    assert count_cut(kept) == 0


def test_shared_examples_are_those_every_source_has(scores):
    gen = _generated(scores, [True, True, True])
    groups = {"ground_truth": scores, "generated": gen}
    shared = shared_ids(groups)
    assert shared == {"ex-0", "ex-1", "ex-2"}
    kept = keep_shared(groups, shared)
    assert isinstance(kept["ground_truth"], TokenScores)
    assert list(kept["ground_truth"].ids) == ["ex-0", "ex-1", "ex-2"]
    assert len(kept["generated"]) == 3
    assert not shared_by_default(len(shared), len(scores))  # 3 of 12: off
    assert shared_by_default(6, 12) and shared_by_default(2, 3) and not shared_by_default(1, 1)


def test_coverage_text_says_what_each_table_stands_on(scores):
    gen = _generated(scores, [True, True])
    assert coverage_text({"ground_truth": scores}, 12, False) == "n = 12 of 12 examples."
    assert coverage_text({"ground_truth": gen, "self_output": gen}, 12, True) == (
        "n = 2 of 12 examples, shared by all 2 sources."
    )
    assert coverage_text({"ground_truth": scores, "self_output": gen}, 12, False) == (
        "n of 12 examples per source (each on the examples it has, so they are not paired): "
        "Ground truth 12 · Self-Output 2."
    )


def test_token_frame_equals_the_records_and_the_analytics_frame(scores):
    records = scores.to_examples()
    groups = {"gt": scores, "b": scores.take(np.arange(4))}
    a = token_frame(groups)
    assert list(a["source"]) == ["gt"] * scores.n_tokens + ["b"] * int(scores.offsets[4])
    expected = [ex.ppl_array() for ex in records] + [ex.ppl_array() for ex in records[:4]]
    np.testing.assert_array_equal(a["ppl"].to_numpy(), np.concatenate(expected))
    full = analytics.token_ppl_frame(groups)
    assert list(a["source"]) == list(full["source"])
    assert np.allclose(a["ppl"], full["ppl"])
    empty = token_frame({})
    assert list(empty.columns) == ["source", "ppl"] and empty.empty


def test_dataset_stats_and_the_tables_as_shown(scores):
    groups = {"ground_truth": scores, "self_output": scores.take(np.arange(3))}
    stats = dataset_stats(groups, 2.5)
    pd.testing.assert_frame_equal(stats["table"], analytics.sequence_ppl_table(groups))
    pd.testing.assert_frame_equal(stats["above"], analytics.share_above_tau(groups, 2.5))
    pd.testing.assert_frame_equal(stats["categories"], analytics.category_shares(groups, 2.5))
    shown = sequence_table_display(stats["table"], stats["above"], 2.5)
    columns = ["data source", "examples", "response tokens", "seq ppl mean (var)", "median"]
    assert list(shown.columns) == [*columns, "tokens > τ = 2.5"]
    assert list(shown["data source"]) == ["Ground truth", "Self-Output"]
    assert all(isinstance(v, str) for v in shown.to_numpy().ravel())
    above = above_table_display(stats["above"])
    assert list(above["data source"]) == ["Ground truth", "Self-Output"]
    assert above["share (pooled)"].iloc[0] == f"{100 * stats['above']['share'].iloc[0]:.1f}%"
    # one truncated example (ex-5) in the ground truth, none in the first three
    assert truncated_note(stats["table"]) == "Truncated to the context length: Ground truth 1."
    assert (
        truncated_note(analytics.sequence_ppl_table({"self_output": groups["self_output"]})) == ""
    )
