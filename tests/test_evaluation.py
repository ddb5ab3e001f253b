"""Evaluation: each scorer on hand-made cases, TI / BWT exactly as docs/METHOD.md (and undefined
when the base scores 0), seeded subsets, the base-score cache, a whole suite on the tiny model,
and the `eval` CLI with and without an adapter."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest

from core.cli import main
from core.data.records import Example
from core.errors import LensError
from core.eval.compare import compare_results, relative_change
from core.eval.config import resolve_adapter_path
from core.eval.grading import (
    extract_choice_letter,
    extract_code,
    extract_number,
    humaneval_program,
    mbpp_program,
    numbers_match,
)
from core.eval.runner import (
    EvalCache,
    SuiteResult,
    base_suite_result,
    load_adapter,
    run_suite,
)
from core.eval.sandbox import SandboxLimits, run_program
from core.eval.scorers import (
    TaskResult,
    _continuation_loglik,
    _mc_question,
    mc_choice_scores,
    select_examples,
)
from core.eval.suites import (
    CODE_EXEC,
    MC_GENERATIVE,
    MC_LOGLIK,
    NUMERIC_MATCH,
    REF_PPL,
    EvalSuite,
    EvalTaskSpec,
    get_suite,
)
from core.model.loading import load_model
from core.scoring.score import score_examples
from tests.reference import score_one_reference

# ------------------------------------------------------------------------------ code_exec


def test_extract_code_prefers_the_fenced_block_defining_the_entry_point():
    answer = (
        "Here is an example call:\n```python\nprint(add(1, 2))\n```\n"
        "And the function:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    )
    assert extract_code(answer, "add") == "def add(a, b):\n    return a + b\n"
    # without an entry point: the first block that defines a function
    assert extract_code(answer).startswith("def add")
    # an answer cut off inside its fence still yields the code
    assert extract_code("Sure!\n```python\ndef f():\n    return 1") == "def f():\n    return 1"
    # no fence: the answer is the code
    assert extract_code("def g():\n    return 2\n") == "def g():\n    return 2"
    # blocks in other languages are not Python
    assert extract_code("```bash\nrm -rf /\n```\n```\nx = 1\n```") == "x = 1\n"


def test_mbpp_program_runs_code_before_setup_and_asserts():
    # Like MBPP task 367: the setup builds objects of a class the solution defines.
    meta = {
        "test_setup_code": "root = Node(3)",
        "test_list": ["assert depth(root) == 1", "assert depth(None) == 0"],
    }
    code = (
        "class Node:\n    def __init__(self, v):\n        self.v = v\n"
        "def depth(n):\n    return 0 if n is None else 1"
    )
    program = mbpp_program(code, meta)
    assert program.index("class Node") < program.index("root = Node") < program.index("assert")
    assert run_program(program).passed
    wrong = code.replace("else 1", "else 2")
    assert not run_program(mbpp_program(wrong, meta)).passed


HUMANEVAL_META = {
    "entry_point": "double",
    "prompt_code": 'from typing import List\n\n\ndef double(xs: List[int]) -> List[int]:\n    """Double each."""\n',
    "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
}


def test_humaneval_program_accepts_full_functions_and_bodies():
    full = "def double(xs: List[int]) -> List[int]:\n    return [2 * x for x in xs]"
    body = "    return [2 * x for x in xs]\n"
    assert run_program(humaneval_program(full, HUMANEVAL_META)).passed
    assert run_program(humaneval_program(body, HUMANEVAL_META)).passed
    assert not run_program(humaneval_program("    return xs\n", HUMANEVAL_META)).passed


# ------------------------------------------------------------------------------ numeric_match


@pytest.mark.parametrize(
    ("answer", "number"),
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 1,234", "1234"),
        ("#### $18.00", "18.00"),
        ("First 5, then 7, so the answer is 42.", "42"),
        ("It drops to -3 degrees.", "-3"),
        ("#### 10\nLater I say 99", "10"),  # the marker wins over the last number
        ("no digits at all", None),
    ],
)
def test_extract_number(answer, number):
    assert extract_number(answer) == number


def test_numbers_match_numerically():
    assert numbers_match("18.00", "18") and numbers_match("1234", "1234")
    assert not numbers_match("17", "18") and not numbers_match(None, "18")


# ------------------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("Answer: C", "C"),
        ("Let me think. A is wrong.\nAnswer: (b)", "B"),
        ("The answer is: D", "D"),
        ("C", "C"),
        ("(A).", "A"),
        ("Answer: Z", None),  # not one of the choices
        ("I am not sure.", None),
    ],
)
def test_extract_choice_letter(answer, letter):
    assert extract_choice_letter(answer, ["A", "B", "C", "D"]) == letter


def test_acc_and_acc_norm_follow_lm_eval_harness():
    # Choice 1 has the highest total log-likelihood; per character, the long choice 0 wins.
    lls = [-8.0, -3.0, -9.0]
    choices = ["a much longer answer", "no", "maybe"]  # 20, 2 and 5 characters
    assert mc_choice_scores(lls, choices) == (1, 0)
    assert mc_choice_scores([-1.0, -1.0], ["x", "y"]) == (0, 0)  # ties: first index


def test_mc_question_keeps_multiline_questions():
    ex = Example(
        "q",
        "Question: Line one\nline two?\nA. yes\nB. no\nAnswer with the letter of the correct choice.",
        "Answer: A",
        {"choices": ["yes", "no"], "labels": ["A", "B"], "gold_index": 0, "gold": "A"},
    )
    assert _mc_question(ex) == "Line one\nline two?"


def test_continuation_loglik_excludes_the_end_of_turn_token(tiny_lm):
    pair = Example("p", "Question: Is the sky blue?\nAnswer:", "yes it is")
    reference = score_one_reference(tiny_lm, pair)  # every response token, end-of-turn last
    (ll,) = _continuation_loglik(tiny_lm, [pair], batch_size=4)
    assert ll == pytest.approx(sum(reference[:-1]), abs=1e-3)
    assert ll != pytest.approx(sum(reference), abs=1e-3)


# ------------------------------------------------------------------------------ ref_ppl


def test_reference_perplexity_uses_the_base_models_easy_tokens(tiny_lm):
    spec = EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=2, tau=50_000.0)
    suite = EvalSuite("t", "", target=(), ood=(spec,))
    base = run_suite(tiny_lm, suite)
    run = score_examples(tiny_lm, select_examples(spec), top_k=1)
    nll = [-lp for rec in run.examples for lp in rec.logprob]
    easy = [x for x in nll if x <= math.log(spec.tau)]
    metrics = base.task("gsm8k_ppl").metrics
    assert 0 < len(easy) < len(nll)  # the threshold splits the tokens
    assert metrics["nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert metrics["nll_easy"] == pytest.approx(sum(easy) / len(easy), rel=1e-6)
    assert metrics["easy_share"] == pytest.approx(len(easy) / len(nll))
    # A later run measures on the BASE's easy tokens, whatever it finds easy itself.
    flipped = {
        name: {k: [not m for m in mask] for k, mask in masks.items()}
        for name, masks in base.easy_tokens.items()
    }
    later = run_suite(tiny_lm, suite, base=replace(base, easy_tokens=flipped))
    hard = [x for x in nll if x > math.log(spec.tau)]
    assert later.task("gsm8k_ppl").metrics["nll_easy"] == pytest.approx(
        sum(hard) / len(hard), rel=1e-6
    )


# ------------------------------------------------------------------------------ TI / BWT


def _result(values: dict[str, float | None], suite: EvalSuite) -> SuiteResult:
    tasks = []
    for spec in suite.specs():
        tasks.append(
            TaskResult(
                spec.name,
                spec.task,
                spec.scorer,
                suite.role(spec.name),
                spec.primary_metric,
                # reference-NLL tasks: the same value as full-token and base-easy-token NLL
                {spec.primary_metric: values[spec.name]}
                | ({"nll_easy": values[spec.name]} if spec.scorer == REF_PPL else {}),
                10,
                0.0,
            )
        )
    return SuiteResult(suite.name, suite.fingerprint(), "m", None, tasks, 0.0)


SUMMARY_SUITE = EvalSuite(
    "s",
    "",
    target=(EvalTaskSpec("mbpp", "mbpp", CODE_EXEC), EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL)),
    ood=(
        EvalTaskSpec("gsm8k", "gsm8k", NUMERIC_MATCH),
        EvalTaskSpec("arc", "arc_challenge", MC_LOGLIK),
        EvalTaskSpec("arc_gen", "arc_challenge", MC_GENERATIVE),
        EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL),
    ),
)


def test_ti_and_bwt_match_the_method_definitions():
    base = _result(
        {"mbpp": 0.5, "mbpp_ppl": 1.0, "gsm8k": 0.4, "arc": 0.8, "arc_gen": 0.5, "gsm8k_ppl": 0.5},
        SUMMARY_SUITE,
    )
    tuned = _result(
        {"mbpp": 0.6, "mbpp_ppl": 0.5, "gsm8k": 0.3, "arc": 0.6, "arc_gen": 0.55, "gsm8k_ppl": 0.6},
        SUMMARY_SUITE,
    )
    c = compare_results(base, tuned, SUMMARY_SUITE)
    assert c.ti == pytest.approx(20.0)  # 100 * (0.6 - 0.5) / 0.5
    # mean of -25 (gsm8k), -25 (arc) and +10 (arc_gen); perplexity tasks stay out
    assert c.bwt == pytest.approx((-25 - 25 + 10) / 3)
    assert c.bwt_tasks == ["gsm8k", "arc", "arc_gen"]
    assert c.nll_easy_change == pytest.approx(20.0)  # 0.5 -> 0.6 NLL on base-easy tokens
    assert c.notes == []


def test_relative_change_against_a_zero_base_is_undefined_not_a_division_by_zero():
    assert relative_change(0.2, 0.0) is None and relative_change(None, 0.5) is None
    base = _result(
        {"mbpp": 0.0, "mbpp_ppl": 1.0, "gsm8k": 0.0, "arc": 0.5, "arc_gen": 0.0, "gsm8k_ppl": 1.0},
        SUMMARY_SUITE,
    )
    tuned = _result(
        {"mbpp": 0.1, "mbpp_ppl": 1.0, "gsm8k": 0.1, "arc": 0.4, "arc_gen": 0.0, "gsm8k_ppl": 1.0},
        SUMMARY_SUITE,
    )
    c = compare_results(base, tuned, SUMMARY_SUITE)
    assert c.ti is None and any("TI undefined" in n for n in c.notes)
    assert c.bwt == pytest.approx(-20.0) and c.bwt_tasks == ["arc"]
    assert any("gsm8k, arc_gen" in n for n in c.notes)
    assert c.per_task["mbpp"]["delta"] == pytest.approx(0.1)  # the absolute change is still shown


# ------------------------------------------------------------------------------ subsets, suites


def test_subsets_are_fixed_and_seeded():
    spec = EvalTaskSpec("arc", "arc_challenge", MC_LOGLIK, n=5, seed=3)
    first = [ex.id for ex in select_examples(spec)]
    assert first == [ex.id for ex in select_examples(spec)] and len(first) == 5
    assert first != [ex.id for ex in select_examples(replace(spec, seed=4))]
    mbpp = select_examples(EvalTaskSpec("m", "mbpp", CODE_EXEC, n=None, split="test"))
    assert len(mbpp) == 100  # the held-out split, never the training split


def test_suites_validate_their_specs():
    assert {"default", "during", "paper", "tiny"} <= {
        get_suite(n).name for n in ("default", "during", "paper", "tiny")
    }
    with pytest.raises(LensError, match="Unknown evaluation suite"):
        get_suite("nope")
    with pytest.raises(LensError, match="Unknown scorer"):
        EvalTaskSpec("x", "mbpp", "bleu")
    spec = EvalTaskSpec("x", "gsm8k", NUMERIC_MATCH)
    with pytest.raises(LensError, match="repeats"):
        EvalSuite("s", "", target=(spec,), ood=(spec,))
    limited = get_suite("default").limited(3)
    assert all(s.n <= 3 for s in limited.specs())
    assert limited.fingerprint() != get_suite("default").fingerprint()
    math_target = get_suite("during").with_target("math", generative=False)
    assert [s.name for s in math_target.target] == ["math_ppl", "target_drift"]
    # the target probe follows the training task: its held-out prompts
    assert math_target.target[1].task == "math"


TINY = EvalSuite(
    "unit",
    "",
    target=(
        EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=2, split="test", max_new_tokens=4),
        EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=2, split="test"),
    ),
    ood=(
        EvalTaskSpec("gsm8k", "gsm8k", NUMERIC_MATCH, n=1, max_new_tokens=4),
        EvalTaskSpec("arc", "arc_easy", MC_LOGLIK, n=2),
        EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=2, mc_format="letter"),
        EvalTaskSpec("arc_gen", "arc_easy", MC_GENERATIVE, n=1, max_new_tokens=4),
    ),
    batch_size=4,
    sandbox=SandboxLimits(cpu_seconds=5, timeout=15),
)


def test_suite_on_the_tiny_model_and_its_cache(tiny_lm):
    cache = EvalCache()
    result, cached = base_suite_result(tiny_lm, TINY, cache=cache)
    assert not cached
    assert [t.name for t in result.tasks] == [s.name for s in TINY.specs()]
    for t in result.tasks:
        assert t.n == next(s.n for s in TINY.specs() if s.name == t.name)
        if t.scorer != REF_PPL:
            assert 0.0 <= t.value <= 1.0
    assert result.task("mbpp").details[0]["status"] in ("passed", "failed", "timeout")
    assert result.task("mbpp_ppl").metrics["nll"] > 0
    assert set(result.task("mmlu").metrics) == {"acc", "acc_norm"}
    records = result.records(step=7)
    assert records[0].keys() == {"kind", "step", "time", "task", "metric", "value", "n", "role"}
    assert {r["role"] for r in records} == {"target", "ood"}
    again, cached = base_suite_result(tiny_lm, TINY, cache=cache)
    assert cached and again.to_dict() == result.to_dict()
    # other settings, other key
    _, cached = base_suite_result(tiny_lm, replace(TINY, batch_size=2), cache=cache)
    assert not cached


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def tiny_adapter(tiny_model_dir, tmp_path):
    """A LoRA adapter for the tiny model with non-zero weights (so it changes the model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    folder = tmp_path / "run" / "adapter"
    peft_model.save_pretrained(folder)
    return folder.parent


def test_cli_eval_base_and_adapter(tiny_model_dir, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["eval", "--model", str(tiny_model_dir), "--suite", "tiny", "--limit", "1"]
    assert main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mbpp" in table and "pass@1" in table and "arc_challenge" in table
    report = json.loads(out.read_text())
    assert report["adapter"] is None and report["base_from_cache"] is False
    # with an adapter: the base comes from the cache, TI / BWT are printed
    assert main([*args, "--adapter", str(tiny_adapter), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "TI  =" in table and "BWT =" in table
    report = json.loads(out.read_text())
    assert report["base_from_cache"] is True
    assert report["adapter"]["adapter"].endswith("adapter")
    assert set(report["comparison"]) >= {"ti", "bwt", "per_task", "notes"}


def test_a_missing_or_incompatible_adapter_fails_in_one_line(tiny_model_dir, tmp_path, capsys):
    args = ["eval", "--model", str(tiny_model_dir), "--suite", "tiny", "--limit", "1"]
    assert main([*args, "--adapter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Adapter") and "does not exist" in err and "\n" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LensError, match="No adapter found"):
        resolve_adapter_path(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["no_such_layer"]})
    )
    fresh = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(LensError, match="does not fit") as info:
        load_adapter(fresh, bad)
    assert "\n" not in str(info.value)


def test_eval_job_body_writes_the_report_and_records(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from core.eval.runner import run_job
    from core.jobs.runfiles import read_metrics

    messages = []
    registry = SimpleNamespace(set_message=lambda job_id, text: messages.append(text))
    config = {"model": str(tiny_model_dir), "suite": "tiny", "limit": 1, "device": "cpu"}
    job = SimpleNamespace(id="j1", config=config, path=tmp_path)
    run_job(job, registry)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["suite"]["name"] == "tiny@1"
    records = read_metrics(tmp_path)
    assert {r["task"] for r in records} == {s.name for s in get_suite("tiny").specs()}
    assert messages[0].startswith("evaluating: mbpp (task 1 of ")
    # drift tasks count their items as they go
    assert any(re.search(r"ood_drift \(task \d+ of \d+\) · 1/1 items", m) for m in messages)
    # the job's state (run_state.json) is the round's last report, read by the views and the CLI
    from core.jobs.state import Phase, read_state

    state = read_state(tmp_path)
    assert state.phase == Phase.EVALUATING and state.line().startswith("evaluating: ")
