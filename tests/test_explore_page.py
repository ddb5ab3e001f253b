"""Smoke tests of the Explore page (AppTest, tiny model, 3-example user file).

What a user sees is checked against scores computed here, independently of the page: the
example table, the heatmap's token spans, the Table 1 row, generated answers side by side (and
after a reload / server restart), generated datasets in the analytics, and the error messages.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from components.session import background_runner
from core.analytics import sequence_ppl_table
from core.generated import (
    GenerationStore,
    file_data_key,
    generate_and_store,
    write_generated_set,
)
from core.generation import GenerationConfig
from core.scoring import score_examples
from core.sources import load_source

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "sample.jsonl"


@pytest.fixture
def page(tiny_model_dir, monkeypatch):
    """A factory of AppTests on the Explore page with the tiny model and sample.jsonl."""
    monkeypatch.chdir(ROOT)
    background_runner.clear()  # tasks from other tests must not leak into this one

    def open_page(**params: str) -> AppTest:
        # The page file itself is the script: run through app.py, AppTest re-enters Streamlit's
        # legacy pages/ mode on every run and the page's switch back reruns, which drops clicks.
        at = AppTest.from_file(str(ROOT / "pages" / "explore.py"), default_timeout=60)
        at.query_params.update(
            model=str(tiny_model_dir),
            device="cpu",
            dtype="float32",
            kind="file",
            data=str(DATA),
            limit="3",
            **params,
        )
        return at

    yield open_page
    background_runner.clear()


def run_until(at: AppTest, done, timeout: float = 120) -> AppTest:
    """Rerun the page (as its polling fragment would) until `done(at)` or the timeout."""
    deadline = time.time() + timeout
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if done(at):
            return at
        assert time.time() < deadline, "page did not finish: " + str(
            [m.value for m in at.markdown] + [e.value for e in at.error]
        )
        time.sleep(0.3)


def heatmaps(at: AppTest) -> list[str]:
    return [h.proto.body for h in at.html if "pl-root" in h.proto.body]


def token_spans(html: str) -> int:
    return len(re.findall(r'<span class="pl-t[^"]*" data-i="\d+"', html))


@pytest.fixture
def expected(tiny_lm):
    """The examples the page shows, scored here with the same model."""
    examples = load_source(data=str(DATA), id_col="id", limit=3).examples
    return {ex.id: ex for ex in score_examples(tiny_lm, examples).examples}


def test_examples_tab_shows_the_scored_table_and_a_heatmap(page, expected):
    at = run_until(page(), lambda at: heatmaps(at))
    table = at.dataframe[0].value
    assert table["id"].tolist() == ["ex-1", "ex-2", "ex-3"]
    for ex_id, seq in zip(table["id"], table["seq ppl"], strict=True):
        assert seq == pytest.approx(expected[ex_id].seq_ppl, rel=1e-4)
    assert table["tokens"].tolist() == [expected[i].n_response for i in ("ex-1", "ex-2", "ex-3")]
    [html] = heatmaps(at)
    assert token_spans(html) == expected["ex-1"].n_response
    assert '<details class="pl-prompt"' in html  # the prompt is shown (dimmed) above the response
    assert "**3** examples" in at.markdown[0].value
    assert at.query_params["ex"] == "ex-1" and at.query_params["tau"] == "2.5"


def test_url_picks_example_and_tau_and_search_filters_the_table(page, expected):
    at = run_until(page(ex="ex-3", tau="5"), lambda at: heatmaps(at))
    [html] = heatmaps(at)
    assert token_spans(html) == expected["ex-3"].n_response
    assert "ex-3" in html and "ppl &gt; 5:" in html
    at.text_input(key="explore_search").input("PARIS").run()
    assert at.dataframe[0].value["id"].tolist() == ["ex-3"]
    at.text_input(key="explore_search").input("no such text anywhere").run()
    assert any("No example matches" in i.value for i in at.info)


def test_unknown_example_id_gives_an_error_not_a_traceback(page, expected):
    at = run_until(page(ex="does-not-exist"), lambda at: heatmaps(at))
    assert any("No example with id 'does-not-exist'" in e.value for e in at.error)
    [html] = heatmaps(at)
    assert token_spans(html) == expected["ex-1"].n_response  # falls back to the first example
    assert at.query_params["ex"] == "ex-1"


SAMPLED = "sample-6-0.7-0.95-1"
SAMPLED_CONFIG = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, seed=1)


def test_generate_shows_both_heatmaps_and_survives_a_restart(page, expected, tiny_lm):
    at = run_until(page(view="GT vs generated", ex="ex-2", gen=SAMPLED), lambda at: heatmaps(at))
    assert any("No answer generated yet" in i.value for i in at.info)
    assert len(heatmaps(at)) == 1
    [submit] = [b for b in at.button if b.label == "Generate"]
    submit.click()
    at = run_until(at, lambda at: len(heatmaps(at)) == 2)

    store = GenerationStore()
    source = load_source(data=str(DATA), id_col="id", limit=3).examples[1]
    stored = store.find(tiny_lm.cache_key, source, SAMPLED_CONFIG)
    assert stored is not None and stored.n_tokens == 6 and len(store) == 1
    [scored] = score_examples(tiny_lm, [stored.as_example(source)]).examples
    gt_html, gen_html = heatmaps(at)
    assert token_spans(gt_html) == expected["ex-2"].n_response
    assert token_spans(gen_html) == scored.n_response
    assert '<details class="pl-prompt"' not in gen_html  # the prompt is shown once, above both
    summary = next(c.value for c in at.caption if c.value.startswith("Sequence perplexity"))
    assert f"ground truth {expected['ex-2'].seq_ppl:.2f}" in summary
    assert f"Model's own answer {scored.seq_ppl:.2f}" in summary
    assert any("stopped at max_new_tokens" in m.value for m in at.markdown)
    assert at.get("plotly_chart"), "the spike plot is missing"

    background_runner.clear()  # a server restart: only the stores on disk remain
    again = run_until(
        page(view="GT vs generated", ex="ex-2", gen=SAMPLED), lambda at: len(heatmaps(at)) == 2
    )
    assert token_spans(heatmaps(again)[1]) == scored.n_response
    assert len(store) == 1  # shown from the store, not generated again


def test_a_whitespace_answer_is_explained(page):
    # The tiny random model's greedy answer is six newlines: nothing to score.
    at = run_until(page(view="GT vs generated", gen="greedy-6"), lambda at: heatmaps(at))
    [submit] = [b for b in at.button if b.label == "Generate"]
    submit.click()
    at = run_until(at, lambda at: at.warning)
    assert "is empty or only whitespace" in at.warning[0].value
    assert len(heatmaps(at)) == 1


def test_invalid_generation_settings_in_the_url_warn(page):
    at = run_until(page(view="GT vs generated", gen="fast-please"), lambda at: heatmaps(at))
    assert any("Generation settings 'fast-please'" in w.value for w in at.warning)


def test_analytics_table_includes_generated_answers_and_generated_sets(page, expected, tiny_lm):
    examples = load_source(data=str(DATA), id_col="id", limit=3).examples
    config = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, seed=1)
    generate_and_store(tiny_lm, examples[:2], config)
    write_generated_set(
        "sample-self-output",
        "self_output",
        [examples[0].__class__(id=ex.id, prompt=ex.prompt, response="It is.") for ex in examples],
        data_key=file_data_key(DATA),
        model=str(tiny_lm.name),
        model_fingerprint=tiny_lm.fingerprint,
    )

    def table_with_three_sources(at: AppTest) -> bool:
        frames = [d.value for d in at.dataframe if "data source" in d.value.columns]
        return bool(frames) and len(frames[0]) == 3

    at = run_until(
        page(view="Dataset analytics", gen="sample-5-0.7-0.95-1"),
        table_with_three_sources,
        timeout=180,
    )
    table = next(d.value for d in at.dataframe if "seq ppl mean (var)" in d.value.columns)
    assert table["data source"].tolist() == ["Ground truth", "Generated", "Self-Output"]
    assert table["examples"].tolist() == [2, 2, 2]  # paired: the 2 examples every source has
    paired_gt = {"ground_truth": [expected["ex-1"], expected["ex-2"]]}
    want = sequence_ppl_table(paired_gt)["mean (var)"].iloc[0]
    assert table["seq ppl mean (var)"].iloc[0] == want
    assert any("2 of 3 examples have one" in m.value for m in at.markdown)
    assert len(at.get("plotly_chart")) == 5  # box, histogram, CDF, share vs tau, categories

    at.toggle[0].set_value(False).run()
    table = next(d.value for d in at.dataframe if "seq ppl mean (var)" in d.value.columns)
    assert table["examples"].tolist() == [3, 2, 3]
    want = sequence_ppl_table({"ground_truth": list(expected.values())})["mean (var)"].iloc[0]
    assert table["seq ppl mean (var)"].iloc[0] == want
