"""The pages' columnar paths (issue #16) give the same numbers and files as the per-example
record paths they replace: the Explore example table, token frame, categories and box plot,
and the masked-set export (rows, JSONL bytes, source fingerprint, the `datasets` folder)."""

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
from core.scoring.tokens import TokenScores, _offsets
from core.viz.charts import seq_ppl_box

TEXTS = ["Ġdef", "Ġx", "(", "):", "Ċ", "Ġreturn", "Ġ42", "<|im_end|>", "Ġ", "3.14", "é", "=="]


def synthetic(n: int = 12, k: int = 3, seed: int = 7) -> TokenScores:
    """Small columnar scores with the awkward cases: an example without response tokens, a
    truncated one, repeated perplexities, metas, and two data sources."""
    rng = np.random.default_rng(seed)
    n_resp = rng.integers(1, 30, n)
    n_resp[3] = 0
    n_prompt = rng.integers(2, 12, n)
    tok_off, off = _offsets(n_prompt + n_resp), _offsets(n_resp)
    r = int(off[-1])
    logprob = np.round(-rng.exponential(1.5, r), 1)  # rounded: ties between tokens
    vocab = dict(enumerate(TEXTS))
    truncated = np.zeros(n, dtype=bool)
    truncated[5] = True
    return TokenScores(
        ids=tuple(f"ex-{i}" for i in range(n)),
        prompts=tuple(f"Solve this.\n\nProblem {i}: add {i} and 1." for i in range(n)),
        responses=tuple(f"def f():\n    return {i + 1}\n" for i in range(n)),
        conventions=("prompt",) * n,
        token_ids=rng.integers(0, len(TEXTS), int(tok_off[-1])).astype(np.int32),
        token_offsets=tok_off,
        response_start=n_prompt.astype(np.int32),
        logprob=logprob,
        offsets=off,
        rank=rng.integers(0, 9, r).astype(np.int32),
        top_ids=rng.integers(0, len(TEXTS), (r, k)).astype(np.int32),
        top_logprobs=np.sort(-rng.exponential(2.0, (r, k)).astype(np.float32), axis=1),
        truncated=truncated,
        vocab=vocab,
        sources=("ground_truth",) * (n - 2) + ("self_output",) * 2,
        metas=tuple({"answer": str(i)} if i % 2 else {} for i in range(n)),
    )


@pytest.fixture
def scores() -> TokenScores:
    return synthetic()


@pytest.mark.parametrize("tau", [0.5, 2.5, 4.0, 1000.0])
def test_example_table_from_columns_equals_the_record_table(scores, tau):
    records = scores.to_examples()
    pd.testing.assert_frame_equal(
        analytics.example_table(scores, tau), analytics.example_table(records, tau)
    )


def test_token_frame_categories_and_box_from_columns_equal_the_records(scores):
    records = scores.to_examples()
    for with_category in (False, True):
        pd.testing.assert_frame_equal(
            analytics.token_ppl_frame(
                {"gt": scores, "b": records[:4]}, with_category=with_category
            ),
            analytics.token_ppl_frame(
                {"gt": records, "b": records[:4]}, with_category=with_category
            ),
        )
    for tau in (1.5, 2.5):
        pd.testing.assert_frame_equal(
            analytics.category_shares({"gt": scores}, tau),
            analytics.category_shares({"gt": records}, tau),
        )
    a, b = seq_ppl_box({"gt": scores}), seq_ppl_box({"gt": records})
    assert list(a.data[0].y) == list(b.data[0].y) and list(a.data[0].text) == list(b.data[0].text)
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
    assert masked_rows(scores, result) == masked_rows(records, result)
    assert masked_jsonl_bytes(scores, result) == masked_jsonl_bytes(records, result)
    assert scores_fingerprint(scores) == scores_fingerprint(records)
    for i in range(len(scores)):
        assert np.array_equal(result.mask_at(i), result.masks[i])


def test_export_folder_from_columns_equals_the_record_export(scores, tmp_path):
    import datasets

    result = compute_masks(scores, MaskConfig(tau=2.5))
    a = export_masked_dataset(scores, result, tmp_path / "columns", {"note": "x"})
    b = export_masked_dataset(scores.to_examples(), result, tmp_path / "records", {"note": "x"})
    assert (a / "masked.jsonl").read_bytes() == (b / "masked.jsonl").read_bytes()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    ma.pop("created_at"), mb.pop("created_at")
    assert ma == mb
    da, db = (datasets.load_from_disk(str(p / "hf_dataset")) for p in (a, b))
    assert da.features == db.features
    assert da.to_list() == db.to_list()


def test_columnar_export_refuses_masks_of_other_scores(scores):
    other = synthetic(seed=8)
    with pytest.raises(LensError, match="different scores|mask length"):
        masked_rows(scores, compute_masks(other, MaskConfig(tau=2.5)))
    with pytest.raises(LensError, match="examples but masks"):
        masked_rows(scores.take([0, 1]), compute_masks(scores, MaskConfig(tau=2.5)))
