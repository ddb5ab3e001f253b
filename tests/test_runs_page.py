"""The Runs page's evaluation launcher (AppTest): pick the base model or a run's adapter and a
suite, see the equivalent command, start a queued job that writes results the page charts."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from core.jobs.registry import SUCCEEDED, JobRegistry

PAGE = "../pages/runs.py"


def code_blocks(at: AppTest) -> list[str]:
    return [c.value for c in at.code]


def test_evaluate_the_base_model_from_the_page(tiny_model_dir, runs):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("evaluate the base model above" in i.value for i in at.info)
    at.selectbox(key="eval-suite").set_value("tiny").run()
    at.number_input(key="eval-limit").set_value(1).run()
    at.text_input(key="eval-model").set_value(str(tiny_model_dir)).run()
    command = f"python -m core eval --model {tiny_model_dir} --suite tiny --limit 1"
    assert code_blocks(at) == [command]

    at.button(key="eval-start").click().run()
    assert not at.exception
    [job] = JobRegistry(runs).list(refresh=False)
    assert job.kind == "eval" and job.config["suite"] == "tiny" and job.config["limit"] == 1
    assert at.query_params["runs"] in (job.id, [job.id])
    done = JobRegistry(runs).wait(job.id, timeout=300)
    assert done.status == SUCCEEDED, done.error

    at.run()
    assert not at.exception
    status = at.dataframe[0].value
    assert status["run"].tolist() == [job.id] and status["status"].tolist() == [SUCCEEDED]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert "Training loss" not in titles  # an evaluation job has no loss curve: it says so
    assert any("Training loss**: none" in c.value for c in at.caption)
    # the base model alone: no change to chart yet, and the page says so (no NaN, no empty grid)
    assert titles == [
        "Target Δ vs step 0",
        "BWT: out-of-domain change",
        "OOD drift: KL from the base model",
        "Target drift: KL from the base model",
        "mbpp pass@1",
    ]
    # an evaluation job's run is what the loss panel calls "evaluation-only", and only that
    assert any(f"{job.id}: an evaluation-only run (no training)" in c.value for c in at.caption)
    captions = " ".join(c.value for c in at.caption)
    assert "only step 0 evaluated so far; a change needs a later round." in captions
    assert "only step 0 evaluated so far (the base model: no drift by definition)" in captions
    assert "Only step 0 (the base model) is evaluated so far" in captions
    assert "nan" not in captions.lower()
    # the raw scores: one picker over every recorded metric
    options = at.selectbox(key="runs-metric").options
    assert "mbpp · pass@1 (target)" in options and "arc_challenge · accuracy (OOD)" in options


def test_a_runs_adapter_is_offered_with_its_base_model(trained_run, runs):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    pick = at.selectbox(key="eval-target")
    assert pick.options[1].startswith("stm τ=2.5")
    pick.set_value(trained_run.name).run()
    assert any("Base model of this run" in c.value for c in at.caption)
    command = f"python -m core eval --model default --adapter {trained_run.name} --suite default"
    assert code_blocks(at) == [command]
    at.text_input(key="eval-lm-eval").set_value("hellaswag, piqa").run()
    assert code_blocks(at) == [f"{command} --lm-eval-task hellaswag --lm-eval-task piqa"]


def test_a_bad_limit_or_model_shows_one_line(runs):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.text_input(key="eval-model").set_value("").run()
    assert not at.exception
    # no job can be started without a model: the page says so instead of showing a command
    assert at.error and "model" in at.error[0].value.lower()
    assert code_blocks(at) == [] and not [b for b in at.button if b.key == "eval-start"]
    assert JobRegistry(runs).list(refresh=False) == []


def test_a_run_whose_folder_is_not_named_by_its_job_shows_the_jobs_status(trained_run, runs):  # noqa: F811
    """A protocol arm trains in `<protocol>-<arm>-s<seed>/` under a job id of its own: the
    status table finds its job by the folder (it used to say "–")."""
    registry = JobRegistry(runs)
    job = registry.submit(
        "train", {"method": "stm"}, device="cpu", run_dir=trained_run, start=False
    )
    assert job.id != trained_run.name
    registry.cancel(job.id)  # a queued job: cancelled at once, nothing runs
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.query_params["runs"] = trained_run.name
    at.run()
    assert not at.exception
    status = at.dataframe[0].value
    assert status["run"].tolist() == [trained_run.name]
    assert status["status"].tolist() == ["cancelled"]
