"""Optional lm-evaluation-harness tasks: the CLI checks every task name before any work (and
refuses them when lm-eval is missing); a suite run where lm-eval is missing (for real, on this
machine) or its data cannot be fetched skips that task with one line and goes on; the glue
around `lm_eval.simple_evaluate` is checked against a stand-in module (see the labelled test)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from core.cli import main
from core.eval.compare import compare_results
from core.eval.config import EvalConfig, eval_job_config
from core.eval.runner import format_report, run_suite
from core.eval.suites import LM_EVAL, MC_LOGLIK, EvalSuite, EvalTaskSpec, build_suite

SUITE = EvalSuite(
    "lm-eval-test",
    "",
    target=(EvalTaskSpec("arc", "arc_easy", MC_LOGLIK, n=2),),
    ood=(EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=2, mc_format="letter"),),
).with_lm_eval_tasks(["hellaswag"], n=5)


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed here"
)
def test_a_missing_lm_eval_skips_that_task_with_one_line_and_the_suite_goes_on(tiny_lm):
    result = run_suite(tiny_lm, SUITE)
    assert [t.name for t in result.tasks] == ["arc", "mmlu", "lm_eval:hellaswag"]
    skipped = result.task("lm_eval:hellaswag")
    assert skipped.skipped == "lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')"
    assert skipped.metrics == {} and skipped.value is None
    assert result.task("mmlu").value is not None and not result.task("mmlu").skipped
    # no metrics.jsonl records for it, a note instead of a made-up BWT term
    assert all(r["task"] != "lm_eval:hellaswag" for r in result.records(step=0))
    comparison = compare_results(result, result, SUITE)
    assert "lm_eval:hellaswag" not in comparison.bwt_tasks
    assert any("lm_eval:hellaswag: not scored" in n for n in comparison.notes)
    report = {
        "model": "tiny",
        "suite": SUITE.settings(),
        "base_from_cache": False,
        "base": result.to_dict(),
        "adapter": None,
        "comparison": None,
    }
    assert "lm_eval:hellaswag    ood    skipped: lm-evaluation-harness is not installed" in (
        format_report(report)
    )


def test_lm_eval_tasks_reach_the_suite_the_job_and_the_command():
    suite = build_suite("tiny", limit=3, lm_eval_tasks=["arc_easy", " "])
    spec = suite.specs()[-1]
    assert (spec.name, spec.task, spec.scorer, spec.n) == (
        "lm_eval:arc_easy",
        "arc_easy",
        LM_EVAL,
        3,
    )
    assert suite.role("lm_eval:arc_easy") == "ood"
    assert (
        build_suite("tiny").fingerprint()
        != build_suite("tiny", lm_eval_tasks=["arc_easy"]).fingerprint()
    )
    config = eval_job_config("default", suite="tiny", lm_eval_tasks=["arc_easy", "piqa"])
    assert config["lm_eval_tasks"] == ["arc_easy", "piqa"]
    assert (
        EvalConfig.from_dict(config)
        .command()
        .endswith("--lm-eval-task arc_easy --lm-eval-task piqa")
    )


# ------------------------------------------------------------------------------------------
# Our glue code only: `lm_eval` below is a stand-in module written for this test (lm-eval is
# not installed here and the hub is unreachable). It checks what we pass to HFLM and
# simple_evaluate, and how we read lm-eval's result layout; it says nothing about lm-eval.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def stand_in_lm_eval(monkeypatch):
    calls: dict = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"] = {"pretrained": pretrained, "tokenizer": tokenizer, "bs": batch_size}

    def simple_evaluate(model, tasks, limit, **kwargs):
        calls["evaluate"] = {"model": model, "tasks": tasks, "limit": limit, **kwargs}
        if tasks == ["offline_task"]:
            raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)")
        return {
            "results": {
                tasks[0]: {
                    "alias": tasks[0],
                    "acc,none": 0.4,
                    "acc_stderr,none": 0.2,
                    "acc_norm,none": 0.6,
                    "exact_match,flexible-extract": 0.2,
                }
            },
            "n-samples": {tasks[0]: {"original": 100, "effective": limit}},
        }

    class TaskManager:  # the task index: names only, no data
        all_tasks = ["arc_easy", "hellaswag", "offline_task", "piqa", "mmlu"]

    root = types.ModuleType("lm_eval")
    root.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = TaskManager
    for name, module in [
        ("lm_eval", root),
        ("lm_eval.models", models),
        ("lm_eval.models.huggingface", huggingface),
        ("lm_eval.tasks", tasks),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_glue_passes_the_loaded_model_and_reads_lm_eval_results(tiny_lm, stand_in_lm_eval):
    suite = EvalSuite("glue", "", target=(), ood=(EvalTaskSpec("x", "piqa", LM_EVAL, n=7, seed=3),))
    result = run_suite(tiny_lm, suite)
    task = result.task("x")
    assert not task.skipped and task.n == 7
    assert task.metrics == {"acc": 0.4, "acc_norm": 0.6, "exact_match/flexible-extract": 0.2}
    assert task.primary == "acc" and task.value == 0.4
    hflm = stand_in_lm_eval["hflm"]
    assert hflm["pretrained"] is tiny_lm.model and hflm["tokenizer"] is tiny_lm.tokenizer
    call = stand_in_lm_eval["evaluate"]
    assert call["tasks"] == ["piqa"] and call["limit"] == 7 and call["random_seed"] == 3
    # a named metric wins; one the task does not report is a one-line skip
    named = run_suite(
        tiny_lm, EvalSuite("g", "", (), (EvalTaskSpec("x", "piqa", LM_EVAL, metric="acc_norm"),))
    )
    assert named.task("x").value == 0.6
    missing = run_suite(
        tiny_lm, EvalSuite("g", "", (), (EvalTaskSpec("x", "piqa", LM_EVAL, metric="f1"),))
    )
    assert missing.task("x").skipped.startswith("lm-eval task 'piqa' has no metric 'f1'")


def test_glue_turns_unreachable_data_into_a_one_line_skip(tiny_lm, stand_in_lm_eval):
    suite = EvalSuite(
        "glue",
        "",
        target=(EvalTaskSpec("arc", "arc_easy", MC_LOGLIK, n=2),),
        ood=(EvalTaskSpec("offline", "offline_task", LM_EVAL, n=3),),
    )
    result = run_suite(tiny_lm, suite)
    reason = result.task("offline").skipped
    assert reason.startswith("lm-eval task 'offline_task' could not run: ConnectionError: ")
    assert "\n" not in reason
    assert result.task("arc").value is not None


def test_cli_eval_refuses_lm_eval_tasks_when_lm_eval_is_missing_before_any_work(
    tiny_model_dir, capsys
):
    """No task name can be checked, and none can run: one line at once, not a skipped task
    after the whole suite has run."""
    from core.jobs.runfiles import runs_dir

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here")
    args = ["eval", "--model", str(tiny_model_dir), "--suite", "tiny", "--limit", "1"]
    assert main([*args, "--device", "cpu", "--lm-eval-task", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --lm-eval-task hellaswag: lm-evaluation-harness is not installed "
        "(pip install 'lm-eval[hf]'); or leave the flag out."
    ]
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


def test_cli_eval_checks_every_lm_eval_task_name_before_any_work(
    tiny_model_dir, stand_in_lm_eval, capsys
):
    from core.jobs.runfiles import runs_dir

    args = ["eval", "--model", str(tiny_model_dir), "--suite", "tiny", "--limit", "1"]
    args += ["--device", "cpu"]
    assert main([*args, "--lm-eval-task", "piqa", "--lm-eval-task", "hellaswagg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: Unknown lm-eval task 'hellaswagg' (did you mean hellaswag?); "
        "`lm-eval ls tasks` lists them."
    ]
    assert "evaluate" not in stand_in_lm_eval  # nothing ran
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
    # known names pass the check and run with the suite
    assert main([*args, "--lm-eval-task", "piqa"]) == 0
    out = capsys.readouterr().out
    assert "lm_eval:piqa" in out and "arc_challenge" in out
    assert stand_in_lm_eval["evaluate"]["tasks"] == ["piqa"]
