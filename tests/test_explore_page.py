"""Smoke tests of the Explore page (AppTest, tiny model, 3-example user file).

What a user sees is checked against scores computed here, independently of the page: the
example table, the heatmap's token spans, the Table 1 row, generated answers side by side (and
after a reload / server restart), generated datasets in the analytics, and the error messages.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from components.session import background_runner
from core import fmt
from core.data.records import Example
from core.data.sources import load_source
from core.datagen.store import GenerationStore, file_data_key, write_generated_set
from core.model.generation import Generation, GenerationConfig
from core.scoring.analytics import sequence_ppl_table, share_above_tau
from core.scoring.score import score_examples
from core.scoring.tokens import TokenScores

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
    assert "ex-3" in html and "ppl &gt; τ = 5:" in html
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


def test_first_examples_show_while_the_rest_are_scored(page, expected, monkeypatch):
    """A large selection shows its first examples (and the one in the URL) at once; the page
    completes itself when the rest are scored."""
    import components.session as session
    import core.scoring.score

    release = threading.Event()
    real = core.scoring.score.score_examples

    def gated(lm, examples, **kwargs):
        if len(examples) == 3:  # the whole selection: held back until the test lets it go
            assert release.wait(60)
        return real(lm, examples, **kwargs)

    monkeypatch.setattr(session, "FIRST_LOOK", 1)
    monkeypatch.setattr(core.scoring.score, "score_examples", gated)
    at = run_until(page(ex="ex-3"), lambda at: heatmaps(at))
    assert at.dataframe[0].value["id"].tolist() == ["ex-1", "ex-3"]
    [html] = heatmaps(at)
    assert token_spans(html) == expected["ex-3"].n_response
    assert any("Showing the first 2 of 3 examples" in i.value for i in at.info)
    assert at.query_params["ex"] == "ex-3"

    release.set()
    at = run_until(at, lambda at: len(at.dataframe[0].value) == 3)
    assert at.dataframe[0].value["id"].tolist() == ["ex-1", "ex-2", "ex-3"]
    assert not any("Showing the first" in i.value for i in at.info)
    [html] = heatmaps(at)
    assert token_spans(html) == expected["ex-3"].n_response


def test_an_example_not_yet_scored_waits_and_keeps_the_url(page, expected, monkeypatch):
    """Scoring started elsewhere (here: Explore without ?ex=) scored other examples first; a
    link to ex-3 waits for the whole selection instead of replacing ?ex=."""
    import components.session as session
    import core.scoring.score

    release = threading.Event()
    real = core.scoring.score.score_examples

    def gated(lm, examples, **kwargs):
        if len(examples) == 3:
            assert release.wait(60)
        return real(lm, examples, **kwargs)

    monkeypatch.setattr(session, "FIRST_LOOK", 1)
    monkeypatch.setattr(core.scoring.score, "score_examples", gated)
    run_until(page(), lambda at: heatmaps(at))  # ex-1 alone, scored first
    at = page(ex="ex-3")
    at.run()
    assert not at.exception and not at.error and not heatmaps(at)
    assert at.query_params["ex"] == "ex-3"
    release.set()
    at = run_until(at, lambda at: heatmaps(at))
    [html] = heatmaps(at)
    assert token_spans(html) == expected["ex-3"].n_response
    assert at.query_params["ex"] == "ex-3"


SAMPLED = "sample-6-0.7-0.95-1"
SAMPLED_CONFIG = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, seed=1)


def test_generate_shows_both_heatmaps_and_survives_a_restart(page, expected, tiny_lm):
    at = run_until(page(view="GT vs generated", ex="ex-2", gen=SAMPLED), lambda at: heatmaps(at))
    assert any("No answer generated yet" in i.value for i in at.info)
    assert len(heatmaps(at)) == 1
    fields = {n.label: n for n in at.number_input}  # sampled: every setting counts
    assert not any(fields[name].disabled for name in ("temperature", "top_p", "seed"))
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
    # greedy decoding ignores the sampling settings: they are greyed out, the length is not
    fields = {n.label: n for n in at.number_input}
    assert all(fields[name].disabled for name in ("temperature", "top_p", "seed"))
    assert not fields["max_new_tokens"].disabled
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
    store, config = GenerationStore(), GenerationConfig()  # the page's default: greedy, 256
    answers = {"ex-1": ("x * x", True), "ex-2": ("It is 56.", True), "ex-3": ("Paris is", False)}
    for ex in examples:
        text, finished = answers[ex.id]
        store.save(tiny_lm.cache_key, ex, config, Generation(text, 3, finished))
    write_generated_set(
        "sample-self-output",
        "self_output",
        [Example(id=ex.id, prompt=ex.prompt, response="It is.") for ex in examples],
        data_key=file_data_key(DATA),
        model=str(tiny_lm.name),
        model_fingerprint=tiny_lm.fingerprint,
    )
    own = score_examples(
        tiny_lm, [store.find(tiny_lm.cache_key, ex, config).as_example(ex) for ex in examples]
    ).examples

    def table_with_three_sources(at: AppTest) -> bool:
        frames = [d.value for d in at.dataframe if "data source" in d.value.columns]
        return bool(frames) and len(frames[0]) == 3

    def table_1(at: AppTest):
        return next(d.value for d in at.dataframe if "seq ppl mean (var)" in d.value.columns)

    def mean_var(examples) -> str:
        row = sequence_ppl_table({"any": TokenScores.from_examples(list(examples))}).iloc[0]
        return f"{fmt.num(row['seq_ppl_mean'])} ({fmt.num(row['seq_ppl_var'])})"

    at = run_until(page(view="Dataset analytics"), table_with_three_sources, timeout=180)
    table = table_1(at)
    assert table["data source"].tolist() == ["Ground truth", "Generated", "Self-Output"]
    # The cut-off answer (ex-3) is left out, and sources are paired on ex-1 and ex-2.
    assert table["examples"].tolist() == ["2", "2", "2"]
    assert table["seq ppl mean (var)"].tolist()[:2] == [
        mean_var([expected["ex-1"], expected["ex-2"]]),
        mean_var(own[:2]),
    ]
    assert any("3 of 3 examples have one" in m.value for m in at.markdown)
    assert len(at.get("plotly_chart")) == 5  # box, histogram, CDF, share vs tau, categories

    [cut, paired] = at.toggle
    assert cut.label == "Leave out 1 answer cut at max_new_tokens"
    # 2 of 3 examples are shared (more than half): paired by default, and the tables say so
    assert paired.label == "Compare on shared examples only (2 of 3)" and paired.value
    assert "n = 2 of 3 examples, shared by all 3 sources." in [c.value for c in at.caption]
    cut.set_value(False).run()
    assert table_1(at)["examples"].tolist() == ["3", "3", "3"]
    at.toggle[1].set_value(False).run()
    table = table_1(at)
    assert table["seq ppl mean (var)"].tolist()[:2] == [
        mean_var(expected.values()),
        mean_var(own),
    ]


def test_a_tau_above_the_slider_range_from_the_masking_studio_is_kept(page):
    """τ = 50 set on Masking used to become 20 after a visit to Explore (clamped to its slider)."""
    at = run_until(page(tau="50"), lambda at: heatmaps(at))
    assert at.query_params["tau"] == "50"
    assert at.slider(key="tau_slider").value == 50.0


def test_one_generated_answer_does_not_shrink_the_analytics_to_one_example(page, expected, tiny_lm):
    """With the model's own answer to one of 3 examples, the tables stay on all 3 ground-truth
    examples and say how many each source has; the share-vs-τ markers print the table's
    shares."""
    examples = load_source(data=str(DATA), id_col="id", limit=3).examples
    config = GenerationConfig()
    GenerationStore().save(tiny_lm.cache_key, examples[0], config, Generation("x * x", 3, True))

    def two_sources(at: AppTest) -> bool:
        return any("data source" in d.value.columns and len(d.value) == 2 for d in at.dataframe)

    at = run_until(page(view="Dataset analytics", tau="2.5"), two_sources, timeout=180)
    (paired,) = at.toggle
    assert paired.label == "Compare on shared examples only (1 of 3)" and not paired.value
    table = next(d.value for d in at.dataframe if "seq ppl mean (var)" in d.value.columns)
    assert table["examples"].tolist() == ["3", "1"]
    captions = [c.value for c in at.caption]
    assert (
        "n of 3 examples per source (each on the examples it has, so they are not paired): "
        "Ground truth 3 · Generated 1." in captions
    )

    # the pooled share above τ: the same text in both tables and beside the curve's marker
    gt = TokenScores.from_examples(list(expected.values()))
    gt_share = share_above_tau({"ground_truth": gt}, 2.5)["share"].iloc[0]
    above = next(d.value for d in at.dataframe if "share (pooled)" in d.value.columns)
    assert above["share (pooled)"].iloc[0] == fmt.share(gt_share)
    assert table["tokens > τ = 2.5"].iloc[0] == fmt.share(gt_share)
    spec = next(
        json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
        if "masked vs τ" in json.loads(c.proto.spec)["layout"]["title"]["text"]
    )
    markers = {
        t["meta"]["source"]: t["text"][0]
        for t in spec["data"]
        if (t.get("meta") or {}).get("current_tau")
    }
    assert markers == dict(zip(["ground_truth", "generated"], above["share (pooled)"], strict=True))

    paired.set_value(True).run()
    table = next(d.value for d in at.dataframe if "seq ppl mean (var)" in d.value.columns)
    assert table["examples"].tolist() == ["1", "1"]
    assert "n = 1 of 3 examples, shared by all 2 sources." in [c.value for c in at.caption]
