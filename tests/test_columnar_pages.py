"""The pages' column code (issue #16; since issue #22 the only code path) gives the same numbers
and files as the per-example record code it replaced, kept in `tests/reference_analytics.py`:
the Explore example table, token frame, categories and box plot, and the masked-set export
(rows, JSONL bytes, source fingerprint, the `datasets` folder)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.errors import LensError
from core.masking.export import (
    export_masked_dataset,
    masked_jsonl_bytes,
    masked_rows,
    scores_fingerprint,
)
from core.masking.rules import MaskConfig, compute_masks
from core.scoring import analytics
from core.scoring.tokens import TokenScores
from core.viz.charts import seq_ppl_box
from tests.factories import synthetic
from tests.reference_analytics import (
    category_shares_reference,
    example_table_reference,
    masked_rows_reference,
    seq_ppl_points_reference,
    token_ppl_frame_reference,
)


@pytest.fixture
def scores() -> TokenScores:
    return synthetic()


@pytest.mark.parametrize("tau", [0.5, 2.5, 4.0, 1000.0])
def test_example_table_from_columns_equals_the_record_table(scores, tau):
    records = scores.to_examples()
    pd.testing.assert_frame_equal(
        analytics.example_table(scores, tau), example_table_reference(records, tau)
    )


def test_token_frame_categories_and_box_from_columns_equal_the_records(scores):
    records = scores.to_examples()
    for with_category in (False, True):
        pd.testing.assert_frame_equal(
            analytics.token_ppl_frame(
                {"gt": scores, "b": scores.take(np.arange(4))}, with_category=with_category
            ),
            token_ppl_frame_reference(
                {"gt": records, "b": records[:4]}, with_category=with_category
            ),
        )
    nothing = analytics.token_ppl_frame({}, with_category=True)
    assert nothing.empty
    assert list(nothing.columns) == list(token_ppl_frame_reference({}, with_category=True).columns)
    for tau in (1.5, 2.5):
        pd.testing.assert_frame_equal(
            analytics.category_shares({"gt": scores, "b": scores.take([3, 0])}, tau),
            category_shares_reference({"gt": records, "b": [records[3], records[0]]}, tau),
        )
    box = seq_ppl_box({"gt": scores})
    assert (list(box.data[0].y), list(box.data[0].text)) == seq_ppl_points_reference(records)
    empty = TokenScores.empty(3)
    assert analytics.example_table(empty, 2.5).empty
    assert analytics.category_shares({"gt": empty}, 2.5)["n_all"].sum() == 0


@pytest.mark.parametrize(
    "config",
    [
        MaskConfig(tau=2.5),
        MaskConfig(mode="low", tau=1.5),
        MaskConfig(mode="random", tau=2.0, seed=3),
        MaskConfig(mode="percentile", percentile_rule="top", k_percent=30.0),
        MaskConfig(tau=None, target_share=0.25),
    ],
)
def test_export_rows_jsonl_and_fingerprint_from_columns_equal_the_records(scores, config):
    records = scores.to_examples()
    result = compute_masks(scores, config)
    rows = masked_rows_reference(records, result)
    assert masked_rows(scores, result) == rows
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    assert masked_jsonl_bytes(scores, result) == expected
    # records read back from a file give the same fingerprint as the store's columns
    assert scores_fingerprint(scores) == scores_fingerprint(TokenScores.from_examples(records))
    for i in range(len(scores)):
        assert np.array_equal(result.mask_at(i), result.masks[i])


def test_export_folder_from_columns_equals_the_record_export(scores, tmp_path):
    """The `datasets` table built from the arrays is the one `Dataset.from_list` makes of the
    records' rows (column types included), and the JSONL holds those rows."""
    import datasets

    result = compute_masks(scores, MaskConfig(tau=2.5))
    out = export_masked_dataset(scores, result, tmp_path / "columns", {"note": "x"})
    rows = masked_rows_reference(scores.to_examples(), result)
    lines = (out / "masked.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["note"] == "x" and manifest["n_examples"] == len(scores)
    got = datasets.load_from_disk(str(out / "hf_dataset"))
    want = datasets.Dataset.from_list(rows)
    assert got.features == want.features
    assert got.to_list() == want.to_list()


def test_columnar_export_refuses_masks_of_other_scores(scores):
    other = synthetic(seed=8)
    with pytest.raises(LensError, match="different scores|mask length"):
        masked_rows(scores, compute_masks(other, MaskConfig(tau=2.5)))
    with pytest.raises(LensError, match="examples but masks"):
        masked_rows(scores.take([0, 1]), compute_masks(scores, MaskConfig(tau=2.5)))
