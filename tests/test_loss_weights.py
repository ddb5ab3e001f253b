"""The Masking studio's token-loss weights (issue #21 part 3): the studio computes each loss's
weights with the functions the trainer calls, and at step 0 they equal the weights the trainer
uses on the same tokens (a fresh LoRA adapter on the tiny model fitted so weights spread); the
effective-token share is the trainer's `weight_share`; the figures build."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from core import fmt
from core.data.records import Example, ScoredExample
from core.errors import LensError
from core.masking import weights as W
from core.masking.rules import MaskConfig, compute_masks
from core.model.loading import load_model
from core.scoring.score import score_examples
from core.scoring.tokens import TokenScores
from core.training import losses as L
from core.training import trainer as trainer_module
from core.training.config import LOSSES, TrainConfig
from core.viz.loss_weights import render_weight_heatmaps, weight_color, weight_scatter
from tests.factories import TRAIN_ROWS, loss_trainer, write_train_rows

K = 20
TOL = 1e-4  # float32 forward passes of the same weights


# --------------------------------------------------------------------------- one source of truth


def test_the_studio_and_training_share_the_formulas_and_defaults():
    assert W.LOSS_NAMES == LOSSES
    for name in (
        "soft_stm_weights",
        "dft_weights",
        "topk_entropy",
        "eaft_weights_from_entropy",
        "eaft_weights",
        "kl_k3",
    ):
        assert getattr(L, name) is getattr(W, name), name  # the trainer's are these
    for name in ("soft_stm_weights", "dft_weights", "eaft_weights_from_entropy", "kl_k3"):
        assert getattr(trainer_module, name) is getattr(W, name), name
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    params = W.WeightParams()
    assert params.temperature == defaults["loss_temperature"]
    assert params.eaft_alpha == defaults["eaft_alpha"]
    assert params.eaft_k == defaults["eaft_k"]


def _random_tokens(n: int = 40, width: int = K, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label log-probs and a (n, width) top-k of log-probabilities (sorted, from logits)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 500, generator=gen) * 3
    log_p = torch.log_softmax(logits, -1)
    top = log_p.topk(width, -1).values
    label = torch.randint(0, 500, (n,), generator=gen)
    return log_p.gather(-1, label[:, None]).squeeze(-1).double().numpy(), top.numpy()


def test_step0_weights_are_the_formulas():
    logprob, top = _random_tokens()
    base = W.BaseTokens.from_scores(logprob, top, K)
    assert base.k == K
    q = torch.softmax(torch.from_numpy(top).double(), -1)
    naive_h = -(q * q.log()).sum(-1).numpy()
    assert np.allclose(base.entropy, naive_h, atol=1e-5)
    params = W.WeightParams(temperature=2.0, eaft_alpha=1.5, eaft_k=K)
    got = W.loss_weights(base, params)
    p = np.exp(logprob)
    assert list(got) == list(LOSSES)
    assert np.allclose(got["soft_stm"].weights, p**0.5, rtol=1e-6)
    # sg(p_θ), θ = base. torch's and numpy's exp may differ in the last bit by CPU (SIMD paths)
    assert np.allclose(got["dft"].weights, p, rtol=1e-13, atol=0)
    assert np.array_equal(got["asft"].weights, got["dft"].weights)
    assert np.allclose(got["eaft"].weights, (naive_h / math.log(K)) ** 1.5, atol=1e-5)
    assert np.array_equal(got["nll"].weights, np.ones_like(p))
    assert np.array_equal(got["kl"].weights, np.ones_like(p))
    assert all(w.exact for w in got.values())
    assert got["dft"].online and got["eaft"].online and not got["soft_stm"].online
    assert "KL(base ‖ θ), 0 at step 0" in got["kl"].note and got["asft"].has_kl


def test_top_k_entropy_of_log_probs_is_the_top_k_entropy_of_the_logits():
    """Why the stored top-k log-probs give EAFT's entropy: the softmax ignores the shift."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 300, generator=gen) * 4
    log_p = torch.log_softmax(logits, -1)
    assert torch.allclose(W.topk_entropy(logits, K), W.topk_entropy(log_p, K), atol=1e-6)
    top = log_p.topk(K, -1).values  # what a top-20 scoring pass keeps
    assert torch.allclose(W.topk_entropy(top, K), W.topk_entropy(logits, K), atol=1e-6)


def test_eaft_over_a_narrower_stored_top_k_is_marked_approximate():
    logprob, top = _random_tokens(width=5)
    base = W.BaseTokens.from_scores(logprob, top, K)
    assert base.k == 5
    eaft = W.step0_weights("eaft", base, W.WeightParams())
    assert not eaft.exact and eaft.approx == "K = 5 (the stored top-5), not 20"
    assert np.allclose(eaft.weights, L.eaft_weights(torch.from_numpy(top), 5, 1.0).numpy())
    none = W.BaseTokens.from_scores(logprob, np.zeros((len(logprob), 0)), K)
    eaft = W.step0_weights("eaft", none, W.WeightParams())
    assert none.k == 0 and np.isnan(eaft.weights).all() and "keep none" in eaft.approx
    assert fmt.share(eaft.share()) == fmt.MISSING


def test_effective_share_is_the_trainers_weight_share():
    w = np.array([1.0, 0.5, 0.05, 1.0, 0.2, 0.7])
    masked = np.array([False, False, True, False, True, False])
    assert W.effective_share(w) == pytest.approx(3.45 / 6)
    assert W.effective_share(w, masked) == pytest.approx(3.2 / 6)  # masked tokens count 0
    assert W.effective_share(np.array([1.5, -0.5])) == pytest.approx(0.5)  # clamped as logged
    assert math.isnan(W.effective_share(np.zeros(0)))
    log = L.WeightLog()  # what the trainer logs: the kept tokens' weights, N response tokens
    log.add(torch.tensor(w[~masked]), n_response=torch.tensor(len(w)))
    assert log.take()["weight_share"] == pytest.approx(W.effective_share(w, masked))
    with pytest.raises(ValueError, match="mask of 2 tokens"):
        W.effective_share(w, masked[:2])


def test_share_table_writes_each_number_with_fmt():
    logprob, top = _random_tokens()
    got = W.loss_weights(W.BaseTokens.from_scores(logprob, top, K), W.WeightParams())
    masked = np.arange(len(logprob)) % 3 == 0
    table = W.share_table(got, masked, "mask A (stm τ=2.5)")
    assert list(table["loss"]) == [
        "nll",
        "soft_stm T=1",
        "dft · step 0",
        "eaft α=1 K=20 · step 0",
        "kl",
        "asft · step 0",
    ]
    assert list(table["per-token weight"]) == [W.WEIGHT_FORMULAS[n] for n in LOSSES]
    assert table["Σw/N, every token"][0] == "100.0%"
    assert table["Σw/N, mask A (stm τ=2.5)"][0] == fmt.share(1 - masked.mean())
    assert table["Σw/N, every token"][2] == fmt.share(float(np.exp(logprob).mean()))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"temperature": 0.0}, "T must be > 0"),
        ({"eaft_alpha": -1.0}, "α must be >= 0"),
        ({"eaft_k": 1}, "K must be a whole number >= 2"),
    ],
)
def test_bad_parameters_are_one_line(kwargs, words):
    with pytest.raises(LensError, match=re.escape(words)):
        W.WeightParams(**kwargs)


# --------------------------------------------------------------------------- against the trainer


@pytest.fixture
def data_file(tmp_path):
    return write_train_rows(tmp_path / "train.jsonl")


def _studio_in_batch_order(scores: TokenScores, batch, params, mask=None):
    """The studio's weights (and mask) of each row of `batch`, rows in the batch's order."""
    base = W.BaseTokens.from_scores(scores.logprob, scores.top_logprobs, params.eaft_k)
    weights = W.loss_weights(base, params)
    rows = []
    for ids, att in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        seq = ids[att.bool()].tolist()
        rows.append(
            next(
                i
                for i in range(len(scores))
                if scores.token_ids[scores.token_offsets[i] : scores.token_offsets[i + 1]].tolist()
                == seq
            )
        )
    spans = [slice(int(scores.offsets[r]), int(scores.offsets[r + 1])) for r in rows]
    out = {name: np.concatenate([w.weights[s] for s in spans]) for name, w in weights.items()}
    flat = None if mask is None else np.concatenate([mask.flat[s] for s in spans])
    return out, flat


@pytest.mark.parametrize(
    "loss, overrides",
    [
        ("soft_stm", {"loss_temperature": 2.0}),
        ("eaft", {"eaft_alpha": 1.5, "eaft_k": K}),
        ("asft", {"asft_alpha": 0.5}),
        ("dft", {}),
        ("kl", {"method": "stm", "tau": None, "target_share": 0.3}),
        ("soft_stm", {"method": "stm", "tau": None, "target_share": 0.3}),
    ],
)
def test_studio_weights_equal_the_trainers_at_step_0(
    loss,
    overrides,
    tmp_path,
    fitted_model_dir,
    data_file,
):
    """A fresh adapter is the base: the trainer's first-step weights of each token (and the
    share it logs) are what the studio shows from a top-20 scoring pass of the same rows."""
    trainer, batch = loss_trainer(
        tmp_path, fitted_model_dir, data_file, perturb=False, loss=loss, **overrides
    )
    lm = load_model(str(fitted_model_dir), device="cpu", dtype="float32")
    examples = [Example(id=r["id"], prompt=r["prompt"], response=r["response"]) for r in TRAIN_ROWS]
    scores = score_examples(lm, examples, top_k=K, max_length=64).scores
    spec = trainer.token_loss
    params = W.WeightParams(spec.temperature, spec.eaft_alpha, spec.eaft_k)
    mask = None
    if overrides.get("method") == "stm":
        mask = compute_masks(scores, MaskConfig(tau=None, target_share=0.3))
    studio, masked = _studio_in_batch_order(scores, batch, params, mask)
    assert int(batch["n_response"]) == len(studio[loss])  # N: every response token
    if masked is not None:  # the studio's mask is the one the training data carries
        assert 0 < masked.sum() < masked.size
    if spec.in_trl:
        trainer.compute_loss(trainer.model, dict(batch))
    else:
        terms = trainer.token_terms(trainer.model, dict(batch))
        trained = terms.weights[terms.mask].double().numpy()
        kept = studio[loss] if masked is None else studio[loss][~masked]
        assert trained.shape == kept.shape
        # two float32 forward passes (the trainer's padded batch, scoring's length buckets):
        # their log-softmax over 49k logits differs by ~1e-5 (tests/test_losses.py)
        assert np.abs(trained - kept).max() < TOL, loss
        if loss != "kl":  # the fitted model spreads the weights (kl's are all 1)
            assert 0.05 < kept.mean() < 0.95
        trainer.compute_loss(trainer.model, dict(batch))
    logged = trainer.weight_log.take()
    assert logged["weight_share"] == pytest.approx(W.effective_share(studio[loss], masked), abs=TOL)


# --------------------------------------------------------------------------- figures


def _example_and_weights(width: int = K):
    logprob, top = _random_tokens(n=12, width=width, seed=5)
    tokens = [
        "def",
        " f",
        "(x",
        "):\n",
        "    ",
        "return",
        " x",
        " *",
        " 2",
        "\n",
        "<|im_end|>",
        "\n",
    ]
    ids = list(range(100, 112))
    example = ScoredExample(
        id="ex-1",
        prompt="p",
        response="r",
        convention="prompt",
        token_ids=[1, 2, *ids],
        tokens=["<s>", "user", *tokens],
        response_start=2,
        logprob=logprob.tolist(),
        rank=[1] * 12,
        top_ids=[[0] * width for _ in range(12)],
        top_tokens=[["a"] * width for _ in range(12)],
        top_logprobs=top.tolist(),
    )
    base = W.BaseTokens.from_scores(logprob, top, K)
    return example, base, W.loss_weights(base, W.WeightParams())


def test_weight_heatmaps_show_one_panel_per_loss_with_weight_and_base_on_hover():
    example, base, weights = _example_and_weights()
    masked = np.zeros(12, dtype=bool)
    masked[[1, 5]] = True
    body = render_weight_heatmaps(example, list(weights.values()), base, masked=masked)
    panels = re.findall(r'<div class="lw-panel" data-loss="(\w+)"', body)
    assert panels == list(LOSSES)
    assert body.count("at step 0 (base)") == 3  # dft, eaft, asft
    assert "approximate" not in body
    soft = body.split('data-loss="soft_stm"')[1].split('data-loss="dft"')[0]
    spans = re.findall(r'<span class="([^"]*)" data-i="(\d+)" data-w="([^"]+)"', soft)
    assert len(spans) == 12
    for classes, i, w in spans:
        i = int(i)
        expected = 0.0 if masked[i] else weights["soft_stm"].weights[i]
        assert float(w) == pytest.approx(expected, rel=1e-5)
        assert ("pl-m" in classes.split()) == masked[i]
    tip = re.search(r'data-i="0" data-w="[^"]+" style="[^"]*" data-tip="([^"]*)"', soft)[1]
    assert f"w = {fmt.num(weights['soft_stm'].weights[0])}" in tip
    assert f"p_base {fmt.num(math.exp(base.logprob[0]))}" in tip and "H_top20" in tip
    share = fmt.share(weights["soft_stm"].share(masked))
    assert f"Σw/N {share}" in soft
    # a narrower stored top-k: EAFT is marked approximate
    example5, base5, weights5 = _example_and_weights(width=5)
    assert "approximate" in render_weight_heatmaps(example5, list(weights5.values()), base5)
    with pytest.raises(ValueError, match="response tokens"):
        render_weight_heatmaps(example, list(weights.values()), base.slice(0, 3))


def test_weight_colour_runs_from_dark_at_zero_to_white_at_one():
    assert weight_color(1.0) == "#ffffff" and weight_color(2.0) == "#ffffff"
    assert weight_color(0.0) == "#3f007d" and weight_color(-1.0) == "#3f007d"
    lightness = [
        sum(int(weight_color(t / 10)[i : i + 2], 16) for i in (1, 3, 5)) for t in range(11)
    ]
    assert lightness == sorted(lightness)
    assert weight_color(math.nan) != weight_color(1.0)


def test_weight_scatter_colours_tokens_by_the_chosen_loss():
    example, base, weights = _example_and_weights()
    masked = np.zeros(12, dtype=bool)
    masked[3] = True
    fig = weight_scatter(base, weights["eaft"], example.response_tokens, masked=masked)
    tokens, out = fig.data
    assert tokens.meta["role"] == "tokens" and out.meta["role"] == "masked"
    assert np.allclose(tokens.marker.color, np.delete(weights["eaft"].weights, 3))
    assert np.allclose(tokens.x, np.delete(base.prob, 3))
    assert np.allclose(tokens.y, np.delete(base.entropy, 3))
    assert fig.layout.xaxis.type == "log"
    assert fig.layout.shapes[0].y0 == pytest.approx(math.log(K))
    assert "w = " in tokens.text[0] and "p_base" in tokens.text[0]
    json.loads(fig.to_json())  # it serialises
    plain = weight_scatter(base, weights["nll"], example.response_tokens)
    assert len(plain.data) == 1
