"""Dataset statistics: hand-computed values on tiny hand-made scored examples (records made by
`tests.factories.make_example`, turned into the columns the statistics take)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.scoring.analytics import (
    CATEGORIES,
    category_shares,
    sequence_ppl_table,
    share_above_tau,
    share_vs_tau,
    token_category,
    token_ppl_frame,
)
from tests.factories import columns, make_example


def row(frame: pd.DataFrame, source: str) -> pd.Series:
    return frame.set_index("source").loc[source]


def test_sequence_ppl_table_hand_computed():
    groups = {
        # seq ppl = exp(mean(ln 2, ln 8)) = 4 and exp(mean(0, 0)) = 1
        "ground_truth": [make_example("a", [2.0, 8.0]), make_example("b", [1.0, 1.0])],
        # 3 and 3 -> mean 3, var 0; one example without response tokens is not scored
        "self_output": [
            make_example("c", [3.0]),
            make_example("d", [9.0, 1.0]),
            make_example("e", [], truncated=True),
        ],
    }
    table = sequence_ppl_table(columns(groups))
    assert list(table["source"]) == ["ground_truth", "self_output"]
    gt, so = row(table, "ground_truth"), row(table, "self_output")
    assert gt["n_examples"] == 2 and gt["n_tokens"] == 4
    assert gt["seq_ppl_mean"] == pytest.approx(2.5)
    assert gt["seq_ppl_var"] == pytest.approx(2.25)  # population variance of (4, 1)
    assert gt["seq_ppl_median"] == pytest.approx(2.5)
    assert gt["mean (var)"] == "2.50 (2.25)"
    assert so["n_examples"] == 3 and so["n_scored"] == 2 and so["n_tokens"] == 3
    assert so["n_truncated"] == 1
    assert so["seq_ppl_mean"] == pytest.approx(3.0)
    assert so["seq_ppl_var"] == pytest.approx(0.0)
    assert so["mean (var)"] == "3.00 (0.00)"
    sample = sequence_ppl_table(columns(groups), ddof=1)
    assert row(sample, "ground_truth")["seq_ppl_var"] == pytest.approx(4.5)


def test_sequence_ppl_table_empty_source():
    table = sequence_ppl_table(columns({"rephrase": []}))
    assert table.loc[0, "n_examples"] == 0
    assert math.isnan(table.loc[0, "seq_ppl_mean"])
    assert table.loc[0, "mean (var)"] == "n/a"


def test_token_ppl_frame_long_form():
    groups = {
        "ground_truth": [make_example("a", [2.0, 8.0], [" x", " ="])],
        "rephrase": [make_example("b", [1.0], ["\n"]), make_example("c", [4.0, 1.5], ["1", "2"])],
    }
    frame = token_ppl_frame(columns(groups), with_category=True)
    assert len(frame) == 5
    assert list(frame["source"]) == ["ground_truth"] * 2 + ["rephrase"] * 3
    assert list(frame["example_id"]) == ["a", "a", "b", "c", "c"]
    assert list(frame["position"]) == [0, 1, 0, 0, 1]
    assert list(frame["token"]) == [" x", " =", "\n", "1", "2"]
    np.testing.assert_allclose(frame["ppl"], [2.0, 8.0, 1.0, 4.0, 1.5])
    assert list(frame["category"]) == ["word", "symbol", "whitespace", "number", "number"]
    assert token_ppl_frame({}).empty


def test_share_above_tau_pooled_vs_per_example():
    groups = {
        "ground_truth": [
            make_example("a", [1.0, 3.0, 3.0, 3.0]),  # 3 of 4 above
            make_example("b", [1.0] * 8),  # none above
            make_example("c", [10.0]),  # all above: fully masked by STM
        ],
        "self_output": [make_example("d", [1.0, 1.2])],
    }
    shares = share_above_tau(columns(groups), 2.5)
    gt = row(shares, "ground_truth")
    assert gt["n_tokens"] == 13 and gt["n_above"] == 4
    assert gt["share"] == pytest.approx(4 / 13)
    assert gt["mean_example_share"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert gt["n_all_above"] == 1 and gt["n_none_above"] == 1
    so = row(shares, "self_output")
    assert so["share"] == 0.0 and so["n_none_above"] == 1


def test_share_above_tau_is_strict():
    ex = make_example("a", [2.0, 3.0])
    tau = float(ex.ppl_array()[0])  # exactly the first token's perplexity
    assert share_above_tau(columns({"gt": [ex]}), tau).loc[0, "n_above"] == 1


def test_share_vs_tau_matches_share_above_tau():
    rng = np.random.default_rng(0)
    groups = columns(
        {
            "ground_truth": [
                make_example(str(i), list(1 + rng.lognormal(0, 1.5, 20))) for i in range(5)
            ],
            "rephrase": [make_example("r", list(1 + rng.lognormal(-1, 1, 7)))],
        }
    )
    taus = [1.5, 2.0, 2.5, 10.0, 100.0]
    curves = share_vs_tau(groups, taus)
    assert list(curves.columns[:3]) == ["source", "tau", "share"]
    for tau in taus:
        expected = share_above_tau(groups, tau).set_index("source")
        got = curves[curves["tau"] == tau].set_index("source")
        for source in groups:
            assert got.loc[source, "share"] == pytest.approx(expected.loc[source, "share"])
            assert got.loc[source, "mean_example_share"] == pytest.approx(
                expected.loc[source, "mean_example_share"]
            )


@pytest.mark.parametrize(
    ("token", "category"),
    [
        (" 42", "number"),
        ("42", "number"),
        ("3.14", "number"),
        ("-1", "number"),
        ("1,000", "number"),
        ("2)", "number"),
        ("1e-5", "number"),
        ("Ġ", "whitespace"),
        ("ĠĠĠ", "whitespace"),
        ("Ċ", "whitespace"),
        ("\n", "whitespace"),
        ("    ", "whitespace"),
        ("\t", "whitespace"),
        ("", "whitespace"),
        ("==", "symbol"),
        (" ==", "symbol"),
        ("):", "symbol"),
        ("_", "symbol"),
        ("<|eot_id|>", "symbol"),
        ("</s>", "symbol"),
        (" the", "word"),
        ("Ġthe", "word"),
        ("▁the", "word"),
        ("x2", "word"),
        ("__init__", "word"),
        (" é", "word"),
        ("的", "word"),
    ],
)
def test_token_category_rules(token, category):
    assert token_category(token) == category


def test_category_shares_all_vs_high():
    groups = {
        "ground_truth": [
            make_example("a", [1.0, 10.0, 1.0, 1.0], [" the", " 42", "==", "\n"]),
            make_example("b", [5.0, 1.0, 1.0, 1.0], ["(", " cat", " dog", "7"]),
        ],
        "self_output": [make_example("c", [1.0, 1.0], [" a", "1"])],
    }
    df = category_shares(columns(groups), tau=2.5)
    assert len(df) == 2 * len(CATEGORIES)
    gt = df[df["source"] == "ground_truth"].set_index("category")
    assert gt.loc["word", "share_all"] == pytest.approx(3 / 8)
    assert gt.loc["number", "share_all"] == pytest.approx(2 / 8)
    assert gt.loc["symbol", "share_all"] == pytest.approx(2 / 8)
    assert gt.loc["whitespace", "share_all"] == pytest.approx(1 / 8)
    assert gt["share_all"].sum() == pytest.approx(1.0)
    # high-ppl tokens: " 42" (number) and "(" (symbol)
    assert gt.loc["number", "share_high"] == pytest.approx(0.5)
    assert gt.loc["symbol", "share_high"] == pytest.approx(0.5)
    assert gt.loc["word", "share_high"] == 0.0 and gt.loc["word", "n_high"] == 0
    so = df[df["source"] == "self_output"].set_index("category")
    assert so["share_high"].isna().all()  # no token above tau: share undefined, not 0
    assert (so["n_high"] == 0).all()
