"""The "Where it forgot" page (AppTest): a run whose rounds hold a drift task scored with its own
adapter shows the largest-KL item's tokens coloured by KL, the top-5 once the background pass
ends, the aggregates and the cross-run scatter; the URL keeps the choice; bad or missing data is
a clear message, never a traceback."""

from __future__ import annotations

import json
import time

from streamlit.testing.v1 import AppTest

from core.jobs.runfiles import append_metric, eval_round_path
from core.study.drift import drift_items, drift_tasks, item_table, load_round
from core.study.drift_tokens import TUNED_SLOT
from tests import eval_runs
from tests.factories import drift_task_result, hand_details, make_drift_run, save_round

PAGE = "../pages/drift.py"


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120)


def htmls(at: AppTest) -> list[str]:
    return [e.proto.body for e in at.get("html")]


def chart_titles(at: AppTest) -> list[str]:
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]


def text_of(at: AppTest) -> str:
    parts = [*(c.value for c in at.caption), *(m.value for m in at.markdown)]
    parts += [
        *(e.value for e in at.error),
        *(w.value for w in at.warning),
        *(i.value for i in at.info),
    ]
    return " ".join(parts)


def until_top5(at: AppTest, timeout: float = 90.0) -> str:
    """Rerun the page until the token view's hovers carry the top-5 (the background pass)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception
        view = htmls(at)[0]
        if "base top-5" in view:
            return view
        time.sleep(0.5)
    raise AssertionError(f"no top-5 after {timeout}s: {text_of(at)}")


def test_without_drift_rounds_the_page_says_how_to_get_them(runs):  # noqa: F811
    eval_runs.make_eval_run(runs, "old", {0: eval_runs.BASE, 4: eval_runs.later(4)})
    at = page().run()
    assert not at.exception
    assert any("No run has drift rounds yet" in i.value for i in at.info)


def test_the_largest_kl_item_coloured_top5_aggregates_and_scatter(tiny_model_dir, runs):  # noqa: F811
    run = make_drift_run(runs, tiny_model_dir, step=3)
    # two synthetic runs with OOD drift for the cross-run scatter (the same data as the STM run)
    gt = eval_runs.make_eval_run(
        runs,
        "gt-run",
        {0: eval_runs.BASE_DRIFT, 4: eval_runs.later_drift(4)},
        method="gt",
        tasks=eval_runs.DRIFT_TASKS,
    )
    append_metric(
        gt,
        {
            "kind": "data",
            "time": 2.0,
            "method": "gt",
            "mask": "none",
            "source": "s",
            "n_examples": 5,
            "n_response_tokens": 50,
        },
    )
    stm = eval_runs.make_eval_run(
        runs,
        "stm-synth",
        {0: eval_runs.BASE_DRIFT, 4: eval_runs.later_drift(2)},
        tasks=eval_runs.DRIFT_TASKS,
    )
    append_metric(
        stm,
        {
            "kind": "data",
            "time": 2.0,
            "method": "stm",
            "tau": 2.5,
            "mask": "high, tau=2.5",
            "masked_share": 0.3,
            "source": "s",
            "n_examples": 5,
            "n_response_tokens": 50,
        },
    )
    TUNED_SLOT.clear()
    at = page()
    at.query_params["run"] = run.name
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="drift-run").value == run.name
    assert at.selectbox(key=f"drift-step-{run.name}").value == 3  # the last round by default
    [task] = drift_tasks(load_round(run, 3))
    items, _ = drift_items(task)
    top = item_table(items)["id"].iloc[0]
    item = at.selectbox(key=f"drift-item-{run.name}-3-drift:probe")
    assert item.value == top  # the largest KL first
    view = htmls(at)[0]
    assert view.count('data-kl="') == next(it.tokens for it in items if it.id == top)
    assert "token KL(base ‖ tuned), nats, log scale" in view
    # the table of items, sorted by KL, and the URL keeps the choice
    grid = at.dataframe[0].value
    assert grid["item"].iloc[0] == f"▶ {top}"
    assert list(grid.columns) == ["item", "domain", "KL", "top-1", "Δ NLL"]
    assert at.query_params["item"] in (top, [top]) and at.query_params["step"] in ("3", ["3"])
    # aggregates and the cross-run scatter, axes from 0
    titles = chart_titles(at)
    assert titles == [
        "By token category",
        "Share of the KL mass",
        "By position in the answer",
        "By domain",
        "High-ppl training tokens vs OOD drift",
    ]
    for chart in at.get("plotly_chart")[:4]:
        layout = json.loads(chart.proto.spec)["layout"]
        assert layout["yaxis"]["range"][0] == 0 and layout["yaxis"]["title"]["text"]
    words = text_of(at)
    assert "**18.0%** of the training data's response tokens" in words  # the STM's masked share
    assert "**0.0%** of the tokens trained on (loss)" in words
    assert "Not in the scatter" in words and "no 'ood_drift' in its last drift round" in words
    # the top-5 arrive from the background pass; the colours stay
    done = until_top5(at)
    assert "tuned top-5" in done and "p of this token: base" in done
    assert "Top-5 from the final adapter (step 3)" in text_of(at)
    # the Δ log-prob colouring, and another item picked from the list
    at.radio(key="drift-color").set_value("dlp").run()
    assert "Δ log-prob of the base&#x27;s token" in htmls(at)[0] or "lost" in htmls(at)[0]
    other = item_table(items)["id"].iloc[-1]
    at.selectbox(key=f"drift-item-{run.name}-3-drift:probe").set_value(other).run()
    assert not at.exception
    assert at.query_params["item"] in (other, [other]) and at.query_params["color"] in (
        "dlp",
        ["dlp"],
    )
    TUNED_SLOT.clear()


def test_a_round_without_kept_weights_says_so_and_keeps_the_colours(tiny_model_dir, runs):  # noqa: F811
    run = make_drift_run(runs, tiny_model_dir, step=3)
    save_round(run, 2, load_round(run, 3).tasks)  # a round whose checkpoint was not kept
    at = page()
    at.query_params.update({"run": run.name, "step": "2"})
    at.run()
    deadline = time.monotonic() + 60
    while "keeps no weights of step 2" not in text_of(at) and time.monotonic() < deadline:
        time.sleep(0.3)
        at.run()
    assert not at.exception
    assert "keeps no weights of step 2" in text_of(at)
    assert "top-5: not available" in htmls(at)[0] and 'data-kl="' in htmls(at)[0]


def test_bad_or_missing_data_is_a_message_not_a_traceback(runs):  # noqa: F811
    # per-item details saved before the per-token view: one line, no traceback
    old = runs / "old-details"
    (old / "eval").mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"method": "stm", "model": "default"}))
    bare = [
        {k: v for k, v in d.items() if k not in ("token_kl", "token_dlp")} for d in hand_details()
    ]
    gone = "file:" + str(runs / "gone.txt")  # a probe file that moved: the prompt lookup says so
    save_round(old, 0, [drift_task_result("ood_drift", gone, bare)])
    at = page().run()
    assert not at.exception
    assert any("saved before the per-token view" in e.value for e in at.error)
    # some items broken: they are left out with a warning, the rest is shown
    partly = runs / "partly"
    (partly / "eval").mkdir(parents=True)
    (partly / "config.json").write_text(json.dumps({"method": "stm", "model": "default"}))
    details = hand_details()
    details[0]["token_kl"] = details[0]["token_kl"][:2]
    save_round(partly, 0, [drift_task_result("ood_drift", gone, details)])
    at = page()
    at.query_params["run"] = "partly"
    at.run()
    assert not at.exception
    assert any("1 item(s) of 'ood_drift' left out" in w.value for w in at.warning)
    assert htmls(at) and 'data-kl="' in htmls(at)[0]
    # a model whose tokenizer cannot be loaded: ids instead of texts, a warning, no category
    # charts; the top-5 pass fails with its one line and a Retry button
    nomodel = runs / "no-model"
    (nomodel / "eval").mkdir(parents=True)
    (nomodel / "config.json").write_text(json.dumps({"method": "stm", "model": "/no/such/model"}))
    save_round(nomodel, 0, [drift_task_result("ood_drift", gone, hand_details())])
    at = page()
    at.query_params["run"] = "no-model"
    at.run()
    assert not at.exception
    assert any("Token texts unavailable" in w.value for w in at.warning)
    assert "⟨10⟩" in htmls(at)[0] or "⟨11⟩" in htmls(at)[0]
    assert "By token category" not in chart_titles(at)
    deadline = time.monotonic() + 30  # the prompt lookup fails: its one line and a Retry button
    while not at.error and time.monotonic() < deadline:
        time.sleep(0.3)
        at.run()
    assert any("gone.txt' does not exist" in e.value for e in at.error), text_of(at)
    assert any(b.label == "Retry" for b in at.button)
    # a corrupt round file next to a good one: the good one is still offered
    eval_round_path(nomodel, 5).write_text("{broken")
    at.run()
    assert not at.exception
