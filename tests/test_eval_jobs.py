"""Standalone evaluation as a job: queued -> running -> succeeded through the registry in its
own process (tiny model, "tiny" suite), results in the job's run folder where the Runs and
Compare pages read them; `python -m core eval --submit`; adapters named by run id."""

from __future__ import annotations

import json

import pytest

from core.cli import main
from core.errors import LensError
from core.eval.config import EvalConfig, eval_job_config, resolve_adapter_path
from core.eval.suites import get_suite
from core.jobs.registry import QUEUED, RUNNING, SUCCEEDED, JobRegistry
from core.jobs.runfiles import read_metrics
from core.study.runs import load_run, runs_table


def test_an_eval_job_runs_through_the_registry_and_writes_its_results(
    tiny_model_dir, trained_run, runs
):
    registry = JobRegistry(runs)
    config = eval_job_config(
        str(tiny_model_dir), adapter=trained_run.name, suite="tiny", limit=1, device="cpu"
    )
    assert config["step"] == 3 and config["method"] == "stm"
    assert config["evaluates"] == trained_run.name
    label = EvalConfig.from_dict(config).describe()
    job = registry.submit("eval", config, device="cpu", label=label, start=False)
    assert registry.get(job.id, refresh=False).status == QUEUED

    assert registry.kick() == [job.id]
    running = registry.get(job.id, refresh=False)
    assert running.status == RUNNING and running.pid  # a process of its own
    done = registry.wait(job.id, timeout=300)
    assert done.status == SUCCEEDED, done.error
    assert (
        done.exit_code == 0
        and done.label == f"eval tiny, limit 1: {tiny_model_dir} + {trained_run.name}"
    )

    folder = done.path
    report = json.loads((folder / "eval.json").read_text())
    assert report["suite"]["name"] == "tiny@1"
    assert report["adapter"]["adapter"] == str((trained_run / "adapter").absolute())
    assert set(report["comparison"]) >= {"ti", "bwt", "per_task", "notes"}

    # the base at step 0, the adapter at its training step, TI / BWT at both
    records = read_metrics(folder)
    evals = [r for r in records if r["kind"] == "eval"]
    assert sorted({r["step"] for r in evals}) == [0, 3]
    names = {s.name for s in get_suite("tiny").specs()}
    assert {r["task"] for r in evals if r["step"] == 0} == names
    assert {r["task"] for r in evals if r["step"] == 3} == names
    # a task's primary metric comes first (readers that take the first metric take it)
    # a reference-NLL task's score is its full-token NLL (the easy-token NLL is a diagnostic)
    assert next(r for r in evals if r["task"] == "mbpp_ppl")["metric"] == "nll"
    summaries = [r for r in records if r["kind"] == "eval_summary"]
    assert [s["step"] for s in summaries] == [0, 3]
    assert summaries[-1]["bwt"] == report["comparison"]["bwt"]
    nll = {r["step"]: r["value"] for r in evals if (r["task"], r["metric"]) == ("mbpp_ppl", "nll")}
    assert nll[0] == report["base"]["tasks"][1]["metrics"]["nll"]
    assert nll[3] != pytest.approx(nll[0], rel=1e-4)  # the adapter changed the model

    # the Runs / Compare pages' reader: labelled like the run it evaluates, scores and TI / BWT
    view = load_run(folder)
    assert view.method == "stm" and view.label.startswith("stm τ=2.5")
    table = runs_table([view])
    adapted = {t["name"]: t["metrics"] for t in report["adapter"]["tasks"]}
    assert table.loc[0, "mbpp pass@1"] == adapted["mbpp"]["pass@1"]
    assert table.loc[0, "arc_challenge acc"] == adapted["arc_challenge"]["acc"]
    assert table.loc[0, "BWT"] == view.final_bwt_ti[0] == report["comparison"]["bwt"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["kind"] == "eval" and summary["step"] == 3
    assert "evaluating: mbpp (task 1 of" in (folder / "log.txt").read_text()


def test_cli_eval_submit_queues_a_job_and_bad_input_makes_none(
    tiny_model_dir, trained_run, runs, capsys
):
    base = ["eval", "--model", str(tiny_model_dir), "--suite", "tiny", "--limit", "1"]
    assert main([*base, "--adapter", "no-such-run", "--submit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Adapter 'no-such-run' does not exist") and "\n" not in err
    assert main([*base, "--suite", "nope", "--submit"]) == 2
    assert "Unknown evaluation suite 'nope'" in capsys.readouterr().err
    registry = JobRegistry(runs)
    assert registry.list(refresh=False) == []  # no job for bad input

    assert main([*base, "--device", "cpu", "--submit"]) == 0
    job_id = capsys.readouterr().out.strip()
    job = registry.wait(job_id, timeout=300)
    assert job.kind == "eval" and job.status == SUCCEEDED, job.error
    assert job.label == f"eval tiny, limit 1: {tiny_model_dir} (base)"
    records = read_metrics(job.path)
    assert {r["step"] for r in records} == {0}  # base only: no adapter step, no TI / BWT
    assert load_run(job.path).method == "base"


def test_adapters_resolve_from_run_ids_and_the_cli_command_round_trips(trained_run):
    assert resolve_adapter_path(trained_run.name) == trained_run / "adapter"
    with pytest.raises(LensError, match="neither a folder nor a run id"):
        resolve_adapter_path("20990101-000000-none")
    config = eval_job_config("default", adapter=trained_run.name, suite="default", limit=4)
    command = EvalConfig.from_dict(config).command()
    assert command == f"python -m core eval --model default --adapter {trained_run.name} " + (
        "--suite default --limit 4"
    )
    from core.cli import build_parser

    args = build_parser().parse_args(command.split()[3:])
    again = EvalConfig.from_args(args).resolved().to_dict()
    assert again == config
