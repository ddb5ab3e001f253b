"""Post-training diagnostics: LoRA weight-change statistics and token perplexity change."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from core.data.records import Example, ScoredExample
from core.errors import LensError
from core.study.diagnostics import (
    effective_rank,
    lora_weight_stats,
    token_ppl_change,
)
from core.viz.heatmap import delta_color, render_delta_heatmap
from tests.factories import make_adapter_run


def ppl_change_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per source: mean Δ ln ppl on tokens the base model found easy vs hard, and the share of
    tokens that became harder."""
    if frame.empty:
        return pd.DataFrame(
            columns=["source", "tokens", "mean Δ", "mean Δ easy", "mean Δ hard", "% harder"]
        )
    out = []
    for source, group in frame.groupby("source", sort=False):
        easy, hard = group[group["base_easy"]], group[~group["base_easy"]]
        out.append(
            {
                "source": source,
                "tokens": len(group),
                "mean Δ": float(group["delta"].mean()),
                "mean Δ easy": float(easy["delta"].mean()) if len(easy) else float("nan"),
                "mean Δ hard": float(hard["delta"].mean()) if len(hard) else float("nan"),
                "% harder": 100.0 * float((group["delta"] > 0).mean()),
            }
        )
    return pd.DataFrame(out)


def _rec(ex_id, logprob, ids=None, source="ground_truth"):
    n = len(logprob)
    ids = ids or list(range(3 + n))
    return ScoredExample(
        id=ex_id,
        prompt="p",
        response="r",
        convention="prompt",
        token_ids=ids,
        tokens=[f"t{i}" for i in ids],
        response_start=3,
        logprob=list(logprob),
        rank=[1] * n,
        top_ids=[[0]] * n,
        top_tokens=[["x"]] * n,
        top_logprobs=[[-0.1]] * n,
        source=source,
    )


def test_effective_rank_of_known_spectra():
    assert effective_rank(np.ones(4)) == pytest.approx(4.0)
    assert effective_rank(np.array([5.0, 0, 0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(np.array([3.0, 1.0])) < 2.0


def test_lora_stats_match_manual_delta(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    peft_model.save_pretrained(tmp_path)
    stats = lora_weight_stats(tmp_path)
    assert len(stats) == 4  # 2 layers x (q, v)
    assert set(stats["kind"]) == {"q_proj", "v_proj"} and set(stats["layer"]) == {0, 1}
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = 2.0 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    row = stats[(stats["layer"] == 0) & (stats["kind"] == "q_proj")].iloc[0]
    assert row["fro_norm"] == pytest.approx(float(delta.norm()), rel=1e-4)
    assert 1.0 <= row["effective_rank"] <= 4.0 and row["rank"] == 4
    with pytest.raises(LensError, match="not a LoRA adapter"):
        lora_weight_stats(tmp_path / "nope")


def test_token_ppl_change_lines_up_and_summarises():
    base = [_rec("a", [-0.1, -2.0, -0.5])]
    tuned = [_rec("a", [-0.05, -0.5, -1.5])]
    frame = token_ppl_change(base, tuned, tau=2.5)
    assert list(frame["delta"].round(6)) == [-0.05, -1.5, 1.0]
    assert list(frame["base_easy"]) == [True, False, True]
    summary = ppl_change_summary(frame).iloc[0]
    assert summary["mean Δ easy"] == pytest.approx((-0.05 + 1.0) / 2)
    assert summary["% harder"] == pytest.approx(100 / 3)
    with pytest.raises(LensError, match="tokenise differently"):
        token_ppl_change(base, [_rec("a", [-1, -1, -1], ids=[9, 9, 9, 1, 2, 3])])
    assert ppl_change_summary(pd.DataFrame()).empty


def test_delta_heatmap_colours_by_direction():
    html = render_delta_heatmap(_rec("a", [-0.1, -2.0, -0.5]), _rec("a", [-0.1, -0.5, -1.5]))
    assert html.count("data-delta=") == 3
    assert "harder" in html and "1 of 3 tokens harder" in html
    assert delta_color(0.0) == "#ffffff"
    easier, harder = delta_color(-2.0), delta_color(2.0)
    assert int(easier[5:7], 16) > int(easier[1:3], 16)  # blue dominates
    assert int(harder[1:3], 16) > int(harder[5:7], 16)  # red dominates
    assert math.isclose(int(delta_color(-10)[1:3], 16), 33)


# ------------------------------------------------------------------------------------------
# Token perplexity change of a run: computed once, saved in the run folder
# ------------------------------------------------------------------------------------------


def test_ppl_change_of_a_run_is_computed_once_and_saved(tiny_model_dir, tiny_lm, tmp_path):
    from core.scoring.score import score_examples
    from core.study.diagnostics import (
        compute_ppl_change,
        final_model_dir,
        load_ppl_change,
        ppl_change_key,
        ppl_change_path,
        saved_ppl_changes,
        training_examples,
    )

    run_dir = make_adapter_run(tmp_path, "run1", tiny_model_dir)
    examples = training_examples(json.loads((run_dir / "config.json").read_text()), 3)
    assert [ex.id for ex in examples] == ["ex-1", "ex-2", "ex-3"]
    messages = []
    change = compute_ppl_change(
        run_dir,
        examples,
        label="3 training examples",
        device="cpu",
        dtype="float32",
        status=messages.append,
    )
    assert any("original model" in m for m in messages)
    assert any("fine-tuned model" in m for m in messages)
    # the base side is exactly what the original model scores; the adapter changed the scores
    expected = score_examples(tiny_lm, examples).examples
    for got, want in zip(change.base, expected, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    assert [b.token_ids for b in change.base] == [t.token_ids for t in change.tuned]
    frame = change.frame()
    assert len(frame) == sum(ex.n_response for ex in expected)
    assert frame["delta"].abs().max() > 1e-3
    summary = change.summary()
    assert summary["mean_delta"] == pytest.approx(frame["delta"].mean())
    assert summary["pct_harder"] == pytest.approx(100 * (frame["delta"] > 0).mean())
    # saved in the run folder under its key; read back without a model
    key = ppl_change_key(run_dir, examples, "float32")
    assert change.path == ppl_change_path(run_dir, key) and change.path.is_file()
    again = load_ppl_change(change.path)
    assert again.label == "3 training examples" and again.summary() == pytest.approx(
        summary, nan_ok=True
    )
    assert [c.path for c in saved_ppl_changes(run_dir)] == [change.path]
    # other examples or other weights give another key
    assert ppl_change_key(run_dir, examples[:2], "float32") != key
    other = make_adapter_run(tmp_path, "run2", tiny_model_dir, seed=2)
    assert ppl_change_key(other, examples, "float32") != key
    assert final_model_dir(tmp_path / "nope") is None


def test_ppl_change_needs_a_finished_run(tmp_path):
    from core.study.diagnostics import compute_ppl_change, ppl_change_key

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model": "default"}')
    example = Example("a", "p", "r")
    with pytest.raises(LensError, match="no saved final model"):
        ppl_change_key(tmp_path / "run", [example])
    with pytest.raises(LensError, match="no saved final model"):
        compute_ppl_change(tmp_path / "run", [example], label="x")


def test_ppl_change_histogram_splits_easy_and_hard():
    from core.viz.run_charts import ppl_change_histogram

    frame = token_ppl_change([_rec("a", [-0.1, -2.0, -0.5])], [_rec("a", [-0.05, -0.5, -1.5])])
    fig = ppl_change_histogram(frame, tau=2.5)
    by_group = {t.meta["group"]: list(t.x) for t in fig.data}
    assert by_group["easy"] == pytest.approx([-0.05, 1.0])
    assert by_group["hard"] == pytest.approx([-1.5])
    assert "2 tokens" in fig.data[0].name


def test_low_rank_singular_values_match_the_full_svd():
    from core.study.diagnostics import low_rank_singular_values

    torch.manual_seed(0)
    b, a = torch.randn(96, 6), torch.randn(6, 40)
    full = torch.linalg.svdvals(1.5 * (b @ a)).numpy()[:6]
    assert low_rank_singular_values(b, a, 1.5) == pytest.approx(full, rel=1e-4)
