"""The Masking studio's "Token losses" section (issue #21 part 3) through streamlit.testing on
the tiny model: closed, it computes nothing; opened (`?token_losses=true`), it shows one weight
panel per loss for the example on screen, the scatter and the selection's effective shares,
starting one top-20 pass of the example (the scores keep the top-5) and then EAFT from it; the
selection's EAFT share is labelled approximate until the top-20 of every example is computed."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from components.loss_weights import SECTION_KEY, SECTION_LABEL
from components.session import background_runner
from core import fmt
from core.data.sources import load_source
from core.masking import weights as W
from core.masking.rules import MaskConfig, compute_masks
from core.scoring.cache import ScoreCache
from core.scoring.score import score_examples
from core.training.config import LOSSES

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4


@pytest.fixture(autouse=True)
def _fresh_background_tasks(monkeypatch):
    monkeypatch.chdir(ROOT)
    background_runner.clear()
    yield
    background_runner.clear()


def _page(tiny_model_dir: Path, **params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / "masking.py"), default_timeout=60)
    at.query_params.update(
        {
            "model": str(tiny_model_dir),
            "device": "cpu",
            "dtype": "float32",
            "kind": "task",
            "task": "mbpp",
            "split": "train",
            "limit": str(LIMIT),
            "tau": "2.5",
            **params,
        }
    )
    return at


def _run_until(at: AppTest, done, what: str, seconds: float = 180) -> AppTest:
    """Rerun as the browser's polling fragment would, until `done(at)`."""
    deadline = time.monotonic() + seconds
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        if done(at):
            return at
        assert time.monotonic() < deadline, f"{what} did not finish in {seconds:g} s"
        time.sleep(0.3)


def _weights_html(at: AppTest) -> str | None:
    return next((h.value for h in at.html if "lw-panel" in h.value), None)


def _shares(at: AppTest):
    return next(
        (d.value for d in at.dataframe if "per-token weight" in d.value.columns),
        None,
    )


def _scored(tiny_lm):
    dataset = load_source(task="mbpp", split="train", limit=LIMIT)
    return score_examples(tiny_lm, dataset.examples, cache=ScoreCache()).scores


def test_closed_section_computes_nothing(tiny_model_dir):
    at = _run_until(_page(tiny_model_dir), lambda a: bool(a.metric), "scoring")
    assert any(e.label == SECTION_LABEL for e in at.expander)
    assert _weights_html(at) is None and _shares(at) is None
    assert not [key for key in background_runner()._tasks if key.startswith("lw-topk")]


def test_section_shows_every_losss_weights_and_the_selections_shares(tiny_model_dir, tiny_lm):
    scores = _scored(tiny_lm)  # what the page reads from the score cache: the top-5
    assert scores.top_ids.shape[1] == 5
    at = _page(tiny_model_dir, **{SECTION_KEY: "true"})
    # the example's top-20 pass runs in the background; then EAFT is no longer approximate
    at = _run_until(
        at,
        lambda a: (
            (h := _weights_html(a)) is not None
            and "lw-warn" not in h.split('data-loss="eaft"')[1].split("lw-text")[0]
        ),
        "the top-20 pass of the example on screen",
    )
    body = _weights_html(at)
    assert re.findall(r'<div class="lw-panel" data-loss="(\w+)"', body) == list(LOSSES)
    assert body.count("at step 0 (base)") == 3
    assert any("one top-20 pass of this example" in c.value for c in at.caption)
    assert any("this example's tokens" in c.proto.spec for c in at.get("plotly_chart"))

    # the selection's shares: stored top-5 for EAFT, said so; the others exact
    table = _shares(at)
    mask = compute_masks(scores, MaskConfig(tau=2.5))
    base = W.BaseTokens.from_scores(scores.logprob, scores.top_logprobs, 20)
    expected = W.loss_weights(base, W.WeightParams())
    assert list(table["Σw/N, every token"]) == [fmt.share(w.share()) for w in expected.values()]
    column = next(c for c in table.columns if c.startswith("Σw/N, mask A"))
    assert list(table[column]) == [fmt.share(w.share(mask.flat)) for w in expected.values()]
    assert table[column][0] == fmt.share(1 - mask.flat.mean())  # nll: the kept share
    assert table["note"][3] == "approximate"
    assert any("EAFT over the selection is approximate" in c.value for c in at.caption)

    # the top-20 of every example: the selection's EAFT share becomes exact
    at.button(key="lw_all").click()
    at = _run_until(
        at,
        lambda a: not any("approximate" in c.value for c in a.caption),
        "the top-20 pass of every example",
    )
    examples = load_source(task="mbpp", split="train", limit=LIMIT).examples
    top20 = score_examples(tiny_lm, examples, top_k=20, cache=ScoreCache()).scores  # cached
    eaft = W.step0_weights(
        "eaft", W.BaseTokens.from_scores(scores.logprob, top20.top_logprobs, 20), W.WeightParams()
    )
    table = _shares(at)
    assert table["Σw/N, every token"][3] == fmt.share(eaft.share()) and eaft.exact
    assert any("top-20 entropy of every example" in c.value for c in at.caption)

    # parameters and the mask toggle follow the widgets
    at.number_input(key="lw_temperature").set_value(2.0).run()
    soft = W.step0_weights("soft_stm", base, W.WeightParams(temperature=2.0))
    assert _shares(at)["Σw/N, every token"][1] == fmt.share(soft.share())
    at.toggle(key="lw_mask").set_value(False).run()
    assert 'class="pl-m pl-t' in body and 'class="pl-m pl-t' not in _weights_html(at)
    at.segmented_control(key="lw_scatter").set_value("eaft").run()
    assert not at.exception
    assert np.isfinite(eaft.weights).all()
