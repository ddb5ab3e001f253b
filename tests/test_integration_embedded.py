"""Integration: the real embedded SmolLM2-135M-Instruct scoring real MBPP problems."""

import json

import numpy as np
import pytest

from core.cli import main
from core.data.tasks import load_task
from core.scoring.score import score_examples
from tests.reference import score_one_reference

pytestmark = pytest.mark.integration


def test_embedded_model_scores_mbpp_plausibly(real_lm):
    exs = load_task("mbpp", split="train", limit=6).examples
    run = score_examples(real_lm, exs)
    assert run.n_scored == 6
    ppl = np.concatenate([r.ppl_array() for r in run.examples])
    share = float((ppl > 2.5).mean())
    # A misaligned score (off by one token) pushes this share far above 60%; a real instruct model
    # on reference code sits around a third (OFFLINE.md: ~32% on MBPP at tau 2.5).
    assert 0.1 < share < 0.6, share
    assert all(1.0 < r.seq_ppl < 50 for r in run.examples)
    ref = score_one_reference(real_lm, exs[0])
    np.testing.assert_allclose(run.examples[0].logprob, ref, atol=1e-4)


def test_cli_scores_task_with_default_model(tmp_path, embedded_dir):
    out = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "score",
                "--model",
                "default",
                "--task",
                "mbpp",
                "--split",
                "train",
                "--limit",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["id"].startswith("mbpp/")
    assert rows[0]["tokens"][-1] == "<|im_end|>"
