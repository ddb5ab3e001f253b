"""The Masking studio page, driven through streamlit.testing (AppTest) on the tiny model.

The page scores in the background through the score cache. A random tiny model gives every token
a perplexity of tens of thousands, so moving tau over its 1-1000 range would change nothing;
the fixture therefore scores the data with the tiny model once (real token ids, templates and
cache keys) and replaces the cached log-probs with a known spread (one example entirely above
tau = 2.5). The page then reads those scores from the cache, and every counter it shows can be
checked against `core.masking` on the same records.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from components.session import background_runner
from core import fmt
from core.cli import build_parser
from core.data.records import ScoredExample
from core.data.sources import load_source
from core.masking.config import MaskCommandConfig, MaskConfig
from core.masking.export import load_masked_dataset, scores_fingerprint
from core.masking.rules import compute_masks, solve_tau_for_share
from core.scoring.cache import ScoreCache
from core.scoring.config import ScoreConfig
from core.scoring.score import score_examples, score_setting
from tests.factories import scores_of

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 8
FULLY_HIGH = 1  # this example's tokens all get ppl in [3, 50]


@pytest.fixture
def seeded_scores(tiny_lm) -> list[ScoredExample]:
    """Score MBPP train[:8] with the tiny model, give the tokens a known ppl spread, cache it."""
    dataset = load_source(task="mbpp", split="train", limit=LIMIT)
    run = score_examples(tiny_lm, dataset.examples)  # no cache: the altered scores go there
    assert len(run.examples) == LIMIT
    rng = np.random.default_rng(0)
    for i, rec in enumerate(run.examples):
        if i == FULLY_HIGH:
            nll = rng.uniform(math.log(3.0), math.log(50.0), rec.n_response)
        else:
            nll = rng.exponential(1.3, rec.n_response)  # ppl mostly 1-10, tail to ~1000
        rec.logprob = (-nll).tolist()
    # the setting the page scores under
    ScoreCache().put(score_setting(tiny_lm), scores_of(run.examples))
    return run.examples


@pytest.fixture(autouse=True)
def _fresh_background_tasks(monkeypatch):
    """Run from the repo root, and let no background task leak between tests."""
    monkeypatch.chdir(ROOT)
    background_runner.clear()
    yield
    background_runner.clear()


def _open_page(tiny_model_dir: Path) -> AppTest:
    # The page file itself is the script: through app.py, AppTest re-enters Streamlit's legacy
    # pages/ mode on every run and the page's switch back to st.navigation reruns, dropping clicks.
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
        }
    )
    deadline = time.monotonic() + 120
    while True:  # background scoring: poll the page as the browser's fragment would
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if _metrics(at):
            return at
        assert not at.error, [e.value for e in at.error]
        assert time.monotonic() < deadline, "scoring did not finish in 120 s"
        time.sleep(0.3)


def _metrics(at: AppTest) -> list[dict[str, str]]:
    """Metric tiles per setting, in page order: [{label: value}, ...] (the run must be clean)."""
    assert not at.exception, [e.value for e in at.exception]
    groups: list[dict[str, str]] = []
    for m in at.metric:
        if m.label == "Masked share":
            groups.append({})
        if groups:
            groups[-1][m.label] = m.value
    return groups


def _expected_tiles(examples: list[ScoredExample], config: MaskConfig) -> dict[str, str]:
    result = compute_masks(scores_of(examples), config)
    stats = result.stats()
    return {
        "Masked share": fmt.share(stats.pooled_share),
        "Tokens masked": fmt.count(stats.n_masked),
        "Tokens kept": fmt.count(stats.n_kept),
        "Fully masked": f"{stats.n_fully_masked} / {stats.n_examples}",
        "τ": fmt.tau(result.tau),
    }


def _curve_markers(at: AppTest) -> list[str]:
    """The text beside the current-τ marker(s) of the share-vs-τ chart, as the reader sees it."""
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return [t["text"][0] for t in spec["data"] if (t.get("meta") or {}).get("current_tau")]


def _assert_card_matches_marker(at: AppTest) -> None:
    """Setting A's "Masked share" card and the curve's marker print the same text."""
    card = _metrics(at)[0]["Masked share"]
    assert _curve_markers(at) == [card]


def _rule_captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption if "rule of thumb" in c.value]


def _curve_tau_lines(at: AppTest) -> list[float]:
    """x of the vertical τ lines on the share-vs-τ chart (the first plotly chart)."""
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "masked vs τ" in spec["layout"]["title"]["text"]
    return [
        shape["x0"]
        for shape in spec["layout"].get("shapes", [])
        if shape.get("type") == "line" and shape.get("xref") == "x" and shape["x0"] == shape["x1"]
    ]


def _heatmap_masked_indices(at: AppTest, which: int = 0) -> list[int]:
    body = at.html[which].value
    spans = re.findall(r'<span class="([^"]*\bpl-t\b[^"]*)" data-i="(\d+)"', body)
    return [int(i) for classes, i in spans if "pl-m" in classes.split()]


def test_page_counters_heatmap_and_compare_follow_core_masking(tiny_model_dir, seeded_scores):
    examples = seeded_scores
    at = _open_page(tiny_model_dir)
    assert at.title[0].value == "Masking studio"

    # default: STM at tau = 2.5 (from the URL), one example left with no trainable token
    tiles = _metrics(at)
    assert tiles == [_expected_tiles(examples, MaskConfig(tau=2.5))]
    assert tiles[0]["Fully masked"] == f"1 / {LIMIT}"
    assert any("1 examples with no trainable token" in e.label for e in at.expander)
    _assert_card_matches_marker(at)

    # at τ = 1 nearly every token is above τ: the marker reads the card's share, not a point
    # interpolated on the curve (which read 94.0% beside a 99.9% card)
    at.select_slider(key="tau_A").set_value(1.0).run()
    assert _metrics(at) == [_expected_tiles(examples, MaskConfig(tau=1.0))]
    _assert_card_matches_marker(at)
    at.select_slider(key="tau_A").set_value(2.5).run()

    # the heatmap strikes out exactly the masked tokens of the chosen example
    at.selectbox(key="example").set_value(examples[3].id).run()
    assert at.query_params["ex"] == examples[3].id
    mask = compute_masks(scores_of(examples), MaskConfig(tau=2.5)).masks[3]
    assert _heatmap_masked_indices(at) == np.flatnonzero(mask).tolist()
    assert 0 < mask.sum() < mask.size

    # moving tau recomputes everything; the fully masked example gets tokens back
    at.select_slider(key="tau_A").set_value(10.0).run()
    tiles = _metrics(at)
    assert tiles == [_expected_tiles(examples, MaskConfig(tau=10.0))]
    assert tiles[0]["Fully masked"] == f"0 / {LIMIT}"
    assert at.query_params["tau"] == "10"
    assert _curve_tau_lines(at) == [10.0]
    _assert_card_matches_marker(at)
    mask10 = compute_masks(scores_of(examples), MaskConfig(tau=10.0)).masks[3]
    assert _heatmap_masked_indices(at) == np.flatnonzero(mask10).tolist()
    assert mask10.sum() < mask.sum()

    # a target share: tau is solved from it, and the shown tau is the solved one
    at.radio(key="kind").set_value("share").run()
    at.slider(key="share_A").set_value(30.0).run()
    cfg = MaskConfig(tau=None, target_share=0.30)
    assert _metrics(at) == [_expected_tiles(examples, cfg)]
    n_tokens = sum(ex.n_response for ex in examples)
    solved = compute_masks(scores_of(examples), cfg)
    assert solved.tau == solve_tau_for_share([ex.ppl_array() for ex in examples], 0.30)
    assert abs(solved.stats().n_masked - 0.30 * n_tokens) <= 1
    _assert_card_matches_marker(at)  # at the solved τ, which is no point of the curve's grid
    assert _metrics(at)[0]["τ"] == fmt.tau(solved.tau)

    # random control: as many tokens as STM at the same tau, elsewhere
    at.segmented_control(key="mask_mode").set_value("random").run()
    random_tiles = _metrics(at)[0]
    assert random_tiles == _expected_tiles(examples, MaskConfig(mode="random", **_share(0.30)))
    assert random_tiles["Tokens masked"] == _expected_tiles(examples, cfg)["Tokens masked"]
    _assert_card_matches_marker(at)
    assert not any(":green[" in c for c in _rule_captions(at))  # a control gets no verdict

    # low: the share is solved for ppl < tau instead
    at.segmented_control(key="mask_mode").set_value("low").run()
    low = MaskConfig(mode="low", **_share(0.30))
    assert _metrics(at) == [_expected_tiles(examples, low)]
    assert compute_masks(scores_of(examples), low).tau < solved.tau
    _assert_card_matches_marker(at)
    # low ppl is a control: inside the 20-25% band it still gets no green "within"
    at.slider(key="share_A").set_value(22.5).run()
    assert _metrics(at)[0]["Masked share"] == "22.5%"
    _assert_card_matches_marker(at)
    (note,) = _rule_captions(at)
    assert "control" in note and ":green[" not in note and "within" not in note

    # percentile: k% per example, no tau
    at.segmented_control(key="mask_mode").set_value("percentile").run()
    at.radio(key="percentile_rule").set_value("bottom").run()
    at.slider(key="k_A").set_value(40.0).run()
    expected = _expected_tiles(
        examples, MaskConfig(mode="percentile", percentile_rule="bottom", k_percent=40.0)
    )
    assert _metrics(at) == [expected]
    assert expected["τ"] == fmt.MISSING

    # compare two taus side by side: two sets of counters and two heatmaps
    at.segmented_control(key="mask_mode").set_value("high").run()
    at.radio(key="kind").set_value("tau").run()
    at.toggle(key="compare").set_value(True).run()
    at.select_slider(key="tau_A").set_value(2.5).run()
    at.select_slider(key="tau_B").set_value(1.5).run()
    a, b = _metrics(at)
    assert a == _expected_tiles(examples, MaskConfig(tau=2.5))
    assert b == _expected_tiles(examples, MaskConfig(tau=1.5))
    assert len(at.html) == 2
    assert _curve_tau_lines(at) == [2.5, 1.5]
    mask_b = compute_masks(scores_of(examples), MaskConfig(tau=1.5)).masks[3]
    assert _heatmap_masked_indices(at, 0) == np.flatnonzero(mask).tolist()
    assert _heatmap_masked_indices(at, 1) == np.flatnonzero(mask_b).tolist()
    share_a = compute_masks(scores_of(examples), MaskConfig(tau=2.5)).stats().pooled_share
    share_b = compute_masks(scores_of(examples), MaskConfig(tau=1.5)).stats().pooled_share
    b_delta = next(m for m in at.metric[5:] if m.label == "Masked share").delta
    assert b_delta == f"{100 * share_b - 100 * share_a:+.1f} pts"
    assert not at.exception


def _share(share: float) -> dict:
    return {"tau": None, "target_share": share}


def test_page_export_writes_folder_with_manifest(tiny_model_dir, tiny_lm, seeded_scores, tmp_path):
    examples = seeded_scores
    at = _open_page(tiny_model_dir)
    at.select_slider(key="tau_A").set_value(3.0).run()
    name_box = next(t for t in at.text_input if t.label == "Output folder")
    assert name_box.value == f"mbpp-train-{LIMIT}-high-tau3"

    # a relative name that climbs out of the export folder is refused before anything runs
    name_box.set_value("../elsewhere").run()
    assert any("may not contain '..'" in e.value for e in at.error)
    assert at.button(key="export").disabled

    target = tmp_path / "exported"
    next(t for t in at.text_input if t.label == "Output folder").set_value(str(target)).run()
    at.button(key="export").click().run()
    assert not at.error, [e.value for e in at.error]
    assert any(str(target) in s.value for s in at.success)
    rows, manifest = load_masked_dataset(target)
    result = compute_masks(scores_of(examples), MaskConfig(tau=3.0))
    assert manifest["mode"] == "high" and manifest["tau"] == 3.0
    assert manifest["pooled_share"] == pytest.approx(result.stats().pooled_share)
    assert manifest["model"] == tiny_lm.cache_key
    assert manifest["source_fingerprint"] == scores_fingerprint(scores_of(examples))
    assert manifest["data_label"] == f"mbpp / train (first {LIMIT})"
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    for row, ex, m in zip(rows, examples, result.masks, strict=True):
        assert row["labels"][: ex.response_start] == [-100] * ex.response_start
        response = np.asarray(row["labels"][ex.response_start :])
        assert ((response == -100) == m).all()
    # the equivalent CLI command is shown and names the same settings
    command = at.code[0].value
    assert "--tau 3.0" in command and f"--out {target}" in command and "--limit 8" in command
    # ... from the same configs as the command line's: each line parses back to the page's
    score_line, mask_line = (shlex.split(line)[3:] for line in command.splitlines())
    score = ScoreConfig.from_args(build_parser().parse_args(score_line))
    assert (score.task, score.split, score.limit, score.out) == (
        "mbpp",
        "train",
        LIMIT,
        "scores.jsonl",
    )
    mask = MaskCommandConfig.from_args(build_parser().parse_args(mask_line))
    assert mask.mask_config() == MaskConfig(tau=3.0) and mask.scores == score.out

    # a second export to the same folder without "replace" fails and keeps the first one
    before = (target / "manifest.json").read_text()
    at.select_slider(key="tau_A").set_value(5.0).run()
    next(t for t in at.text_input if t.label == "Output folder").set_value(str(target)).run()
    at.button(key="export").click().run()
    assert any("not empty" in e.value for e in at.error)
    assert (target / "manifest.json").read_text() == before
    at.checkbox(key="export_overwrite").check().run()
    at.button(key="export").click().run()
    assert json.loads((target / "manifest.json").read_text())["tau"] == 5.0
