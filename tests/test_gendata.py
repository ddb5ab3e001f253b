"""Self-Output / Rephrase generation: verifiers on known-correct and known-wrong answers, the
selection rule on hand-made candidates, and the pipeline on the tiny model (its samples are
noise, so the verdicts there come from a stand-in verifier): dropped prompts, resume, manifest."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from core.data.records import Example
from core.data.tasks import load_task
from core.datagen import run as gendata
from core.datagen.config import GenDataConfig
from core.datagen.run import CANDIDATES_JSONL, read_candidates, run_generation, select_candidate
from core.datagen.store import list_generated_sets
from core.errors import LensError
from core.eval import grading
from core.eval.grading import Verdict, check_answers


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "response": f"#### {2 * i}"}
        for i in range(5)
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(tiny_model_dir, data_file, **overrides):
    values = dict(
        data=str(data_file),
        task=None,
        id_col="id",
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        n_samples=3,
        max_new_tokens=6,
        prompt_batch=2,
        verify="none",
        workers=1,
    )
    return GenDataConfig.from_preset("cpu-quick", **{**values, **overrides})


# --------------------------------------------------------------------------- verifiers


def test_mbpp_verifier_runs_the_asserts_in_the_sandbox():
    ex = load_task("mbpp", "train", limit=1).examples[0]
    wrong = f"```python\ndef {ex.meta['entry_point']}(*args):\n    return None\n```"
    crash = "```python\nimport sys\nsys.exit(0)\n```"
    verdicts = check_answers(ex, [f"Here:\n```python\n{ex.response}\n```", wrong, crash], "code")
    assert [v.correct for v in verdicts] == [True, False, False]
    assert verdicts[1].detail  # the failing assert is reported


def test_number_and_boxed_verifiers():
    gsm = load_task("gsm8k", limit=1).examples[0]
    gold = gsm.meta["gold"]
    verdicts = check_answers(
        gsm, [f"so\n#### {gold}", f"#### {int(gold) + 1}", "no idea"], "number"
    )
    assert [v.correct for v in verdicts] == [True, False, False]
    assert "expected" in verdicts[1].detail

    math = Example("m", "Half of one?", "It is \\boxed{\\frac{1}{2}}.", {"gold": "\\frac{1}{2}"})
    answers = ["\\boxed{\\dfrac{1}{2}}", "\\boxed{ \\frac{1}{2} }", "\\boxed{2}", "1/2"]
    assert [v.correct for v in check_answers(math, answers, "boxed")] == [True, True, False, False]
    # a user file without gold: the reference's final number is the gold answer
    plain = Example("p", "2+2?", "The sum is 4.", {})
    assert [v.correct for v in check_answers(plain, ["4", "5"], "number")] == [True, False]


def test_auto_verifier_per_task_and_clear_error_for_files():
    assert (
        grading.resolve_verifier("auto", load_task("mbpp", limit=1).examples[0], "mbpp") == "code"
    )
    assert grading.resolve_verifier("auto", load_task("gsm8k", limit=1).examples[0], "gsm8k") == (
        "number"
    )
    assert grading.resolve_verifier("auto", Example("x", "p", "r"), "math") == "boxed"
    with pytest.raises(LensError, match="No verifier"):
        grading.resolve_verifier("auto", Example("x", "p", "r"), None)


# --------------------------------------------------------------------------- selection


def test_selection_rule_on_hand_made_candidates():
    ppls = [1.5, 1.1, 3.0, 0.9, None]
    correct = [True, True, True, False, False]  # 0.9 is wrong: never chosen
    rng = random.Random(0)
    assert select_candidate(ppls, correct, "lowest", rng) == 1
    assert select_candidate(ppls, correct, "highest", rng) == 2
    picks = {select_candidate(ppls, correct, "random", random.Random(s)) for s in range(40)}
    assert picks == {0, 1, 2}
    assert select_candidate(ppls, [False] * 5, "lowest", rng) is None


def test_config_validation_and_cli_command_round_trip():
    with pytest.raises(LensError, match="must contain"):
        GenDataConfig(kind="rephrase", template="Rewrite {instruction}")
    with pytest.raises(LensError, match="selection"):
        GenDataConfig(selection="median")
    paper = GenDataConfig()
    assert (paper.n_samples, paper.temperature, paper.top_p, paper.max_new_tokens) == (
        32,
        0.7,
        0.95,
        512,
    )
    with pytest.raises(LensError, match="threads"):
        GenDataConfig(threads=0)
    config = GenDataConfig.from_preset(
        "cpu-quick", task="gsm8k", split="test", selection="random", threads=1
    )
    command = config.command(submit=True)
    assert "--task gsm8k" in command and "--selection random" in command
    assert "--threads 1" in command
    from core.cli import build_parser

    args = build_parser().parse_args(command.split()[3:])
    assert GenDataConfig.from_args(args) == config


# --------------------------------------------------------------------------- the pipeline


def fake_verifier(correct_ids):
    """Stand-in for check_answers: every sample of the listed prompts is correct."""

    def check(example, answers, verifier, **kwargs):
        return [Verdict(example.id in correct_ids, "stand-in") for _ in answers]

    return check


def test_self_output_keeps_lowest_ppl_correct_sample_and_counts_dropped(
    tmp_path, tiny_lm, tiny_model_dir, data_file, monkeypatch
):
    monkeypatch.setattr(gendata, "check_answers", fake_verifier({"q0", "q2", "q3"}))
    config = tiny_config(tiny_model_dir, data_file, verify="number", seed=7)
    folder = run_generation(config, tmp_path / "run", student=tiny_lm)

    records = {r["id"]: r for r in read_candidates(tmp_path / "run")}
    assert sorted(records) == ["q0", "q1", "q2", "q3", "q4"]
    for rec in records.values():
        assert len(rec["candidates"]) == 3
    assert records["q1"]["chosen"] is None and records["q4"]["chosen"] is None

    [gset] = list_generated_sets()
    assert gset.path == folder and gset.kind == "self_output"
    assert gset.model_fingerprint == tiny_lm.fingerprint
    kept = gset.load_examples()
    assert [ex.id for ex in kept] == ["q0", "q2", "q3"]
    for ex in kept:
        cands = records[ex.id]["candidates"]
        best = min(c["ppl"] for c in cands)
        assert ex.response == next(c["text"] for c in cands if c["ppl"] == best)
        assert ex.prompt == f"What is {ex.id[1]} plus {ex.id[1]}?"

    prov = gset.provenance
    assert prov["n_kept"] == 3 and prov["n_dropped"] == 2
    assert sorted(prov["dropped_ids"]) == ["q1", "q4"]
    assert prov["n_samples"] == 15 and prov["acceptance_rate"] == pytest.approx(9 / 15)
    assert prov["seed"] == 7 and prov["version"] == 1
    assert prov["wall_seconds"] > 0 and prov["n_tokens"] > 0
    assert prov["scoring"] == {"convention": "response_only", "selection": "lowest"}

    # a second run of the same settings is a new version, the first stays
    run_generation(config, tmp_path / "run2", student=tiny_lm)
    names = sorted(s.name for s in list_generated_sets())
    assert names == [folder.name, folder.name.replace("-v1", "-v2")]


def test_no_correct_sample_at_all_fails_with_one_line(
    tmp_path, tiny_lm, tiny_model_dir, data_file, monkeypatch
):
    monkeypatch.setattr(gendata, "check_answers", fake_verifier(set()))
    config = tiny_config(tiny_model_dir, data_file, verify="number", limit=2)
    with pytest.raises(LensError, match="No prompt had a correct sample"):
        run_generation(config, tmp_path / "run", student=tiny_lm)
    assert list_generated_sets() == []
    assert len(read_candidates(tmp_path / "run")) == 2  # the samples stay for inspection


def test_interrupted_run_resumes_without_redoing_finished_prompts(
    tmp_path, tiny_lm, tiny_model_dir, data_file, monkeypatch
):
    config = tiny_config(tiny_model_dir, data_file, prompt_batch=1)
    run = tmp_path / "run"

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_generation(config, run, student=tiny_lm, progress=stop_after_two)
    first = read_candidates(run)
    assert [r["id"] for r in first] == ["q0", "q1"]
    assert list_generated_sets() == []

    prompts_generated = []
    real_generate = gendata.generation_prompt

    def spy(config, example):
        prompts_generated.append(example.id)
        return real_generate(config, example)

    monkeypatch.setattr(gendata, "generation_prompt", spy)
    # the resumed attempt runs with another thread count: that does not change the data
    threads_before = torch.get_num_threads()
    try:
        run_generation(replace(config, threads=1), run, student=tiny_lm)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads_before)
    assert prompts_generated == ["q2", "q3", "q4"]
    after = read_candidates(run)
    assert [r["id"] for r in after] == ["q0", "q1", "q2", "q3", "q4"]
    assert after[:2] == first  # finished prompts were kept as they were
    [gset] = list_generated_sets()
    assert gset.n_examples == 5 and gset.provenance["n_done"] == 5
    assert gset.provenance["torch_threads"] == 1

    # the run folder belongs to these settings
    with pytest.raises(LensError, match="other settings"):
        run_generation(tiny_config(tiny_model_dir, data_file, n_samples=2), run, student=tiny_lm)


def test_rephrase_shows_the_reference_and_pairs_with_the_original_instruction(
    tmp_path, tiny_lm, tiny_model_dir, data_file, monkeypatch
):
    import core.model.generation

    seen = []

    original = core.model.generation.generate_responses

    def spy(lm, prompts, config, **kwargs):
        seen.extend(prompts)
        assert config.num_return_sequences == 1  # one rewrite per prompt
        return original(lm, prompts, config, **kwargs)

    monkeypatch.setattr(core.model.generation, "generate_responses", spy)
    template = "Task: {instruction}\nReference: {reference}\nYour answer:"
    config = tiny_config(tiny_model_dir, data_file, kind="rephrase", template=template, limit=2)
    run_generation(config, tmp_path / "run", student=tiny_lm)
    assert seen == [
        "Task: What is 0 plus 0?\nReference: #### 0\nYour answer:",
        "Task: What is 1 plus 1?\nReference: #### 2\nYour answer:",
    ]
    [gset] = list_generated_sets()
    assert gset.kind == "rephrase"
    assert [ex.prompt for ex in gset.load_examples()] == ["What is 0 plus 0?", "What is 1 plus 1?"]


def test_teacher_generates_and_student_scores(tmp_path, tiny_lm, tiny_model_dir, data_file):
    from core.model.loading import load_model

    teacher = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    teacher.fingerprint = "teacher-fingerprint"
    config = tiny_config(tiny_model_dir, data_file, teacher="some/teacher", limit=2)
    run_generation(config, tmp_path / "run", student=tiny_lm, teacher=teacher)
    [gset] = list_generated_sets()
    assert gset.model == "some/teacher" and gset.model_fingerprint == "teacher-fingerprint"
    assert gset.provenance["student_fingerprint"] == tiny_lm.fingerprint
    assert gset.name.startswith("self-output-qa-teacher-v")


def test_cli_generate_runs_as_a_foreground_job(tmp_path, tiny_model_dir, data_file, capsys):
    from core.cli import main
    from core.jobs.registry import JobRegistry

    code = main(
        [
            "generate",
            "--preset",
            "cpu-quick",
            "--data",
            str(data_file),
            "--id-col",
            "id",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--verify",
            "none",
            "--n-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--limit",
            "2",
            "--name",
            "cli-set",
        ]
    )
    assert code == 0
    [job] = JobRegistry().list()
    assert job.kind == "generate" and job.status == "succeeded"
    assert (job.path / CANDIDATES_JSONL).is_file()
    [gset] = list_generated_sets()
    assert gset.name == "cli-set" and gset.n_examples == 2

    with pytest.raises(SystemExit):
        main(["generate", "--data", str(data_file), "--selection", "median"])
    capsys.readouterr()
    assert main(["generate", "--data", str(data_file), "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: No verifier for this data file: its examples carry no tests or gold answer. "
        "Choose verify 'number' (final number must match the reference's), 'boxed' or 'none'."
    )
    assert len(JobRegistry().list()) == 1  # no job was registered for the bad request


# --------------------------------------------------------------------------- the page


def test_generate_page_shows_the_cli_command_and_the_sets(tmp_path, monkeypatch):
    import shlex
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from core.cli import build_parser
    from core.datagen.store import write_generated_set

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "runs"))
    kept = [Example("q1", "What is 1 plus 1?", "#### 2", {"gendata": {"ppl": 1.3}})]
    write_generated_set(
        "demo-v1",
        "self_output",
        kept,
        data_key="file:abc",
        model="default",
        model_fingerprint="fp",
        provenance={"acceptance_rate": 0.25, "n_kept": 1, "n_done": 2, "seed": 3},
    )
    at = AppTest.from_file(str(root / "app.py"), default_timeout=60)
    at.query_params.update(kind="task", task="gsm8k", split="test", limit="5")
    at.run()
    at.switch_page("pages/generate.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [cmd] = [c.value for c in at.code if c.value.startswith("python -m core generate")]
    config = GenDataConfig.from_args(build_parser().parse_args(shlex.split(cmd)[3:]))
    # the sidebar's "first 5" carries into the job
    assert (config.task, config.split, config.limit) == ("gsm8k", "test", 5)
    at.selectbox(key="gen_preset").set_value("paper").run()
    [cmd] = [c.value for c in at.code if c.value.startswith("python -m core generate")]
    config = GenDataConfig.from_args(build_parser().parse_args(shlex.split(cmd)[3:]))
    assert (config.preset, config.n_samples, config.limit) == ("paper", 32, 5)
    sets = at.dataframe[-2].value  # the sets table, then the preview
    assert list(sets["set"]) == ["demo-v1"] and list(sets["accepted"]) == ["25.0%"]
    assert list(at.dataframe[-1].value["response"]) == ["#### 2"]
