"""Post-training diagnostics: LoRA weight-change statistics and token perplexity change."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from components.heatmap import delta_color, render_delta_heatmap
from core.diagnostics import effective_rank, lora_weight_stats, ppl_change_summary, token_ppl_change
from core.errors import LensError
from core.records import ScoredExample


def _rec(ex_id, logprob, ids=None, source="ground_truth"):
    n = len(logprob)
    ids = ids or list(range(3 + n))
    return ScoredExample(
        id=ex_id, prompt="p", response="r", convention="prompt", token_ids=ids,
        tokens=[f"t{i}" for i in ids], response_start=3, logprob=list(logprob), rank=[1] * n,
        top_ids=[[0]] * n, top_tokens=[["x"]] * n, top_logprobs=[[-0.1]] * n, source=source,
    )  # fmt: skip


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
