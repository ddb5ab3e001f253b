"""Multiple-choice formats: `plain` is lm-evaluation-harness's request (plain text, no chat
template) and scores the same log-likelihoods as a straightforward full forward pass; tasks are
evaluated by name (`eval --tasks`), with one-line errors for what does not exist."""

from __future__ import annotations

import json

import pytest
import torch

from core.cli import main
from core.data.tasks import get_task, load_task
from core.eval.runner import run_suite
from core.eval.scorers import plain_mc_request
from core.eval.suites import tasks_suite


def _reference_loglik(lm, context: str, continuation: str) -> float:
    """lm-eval's loglikelihood, written out: ids of context+continuation without special
    tokens, the continuation's ids after the context's, one full forward pass."""
    tok = lm.tokenizer
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(start, len(whole))))


def test_plain_format_scores_what_a_full_forward_pass_scores(tiny_lm):
    suite = tasks_suite(["arc_easy:validation", "mmlu"], limit=4, mc_format="plain")
    result = run_suite(tiny_lm, suite)
    for spec, task in zip(suite.specs(), result.tasks, strict=True):
        examples = load_task(spec.task, spec.split).examples
        by_id = {ex.id: ex for ex in examples}
        correct = 0
        for detail in task.details:
            ex = by_id[detail["id"]]
            context, continuations, _ = plain_mc_request(ex)
            expected = [_reference_loglik(tiny_lm, context, c) for c in continuations]
            assert detail["ll"] == pytest.approx(expected, abs=1e-4)
            correct += max(range(len(expected)), key=lambda i: (expected[i], -i)) == detail["gold"]
        assert task.metrics["acc"] == correct / len(task.details)


def test_plain_requests_follow_lm_eval_templates():
    arc = load_task("arc_easy", "validation").examples[0]
    context, continuations, norm_by = plain_mc_request(arc)
    assert context.startswith("Question: ") and context.endswith("\nAnswer:")
    assert (
        continuations == [" " + c for c in arc.meta["choices"]] and norm_by == arc.meta["choices"]
    )
    mmlu = load_task("mmlu", limit=1).examples[0]
    context, continuations, _ = plain_mc_request(mmlu)
    subject = mmlu.meta["subject"].replace("_", " ")
    assert context.startswith(
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    )
    assert (
        "\nA. " in context
        and context.endswith("\nAnswer:")
        and continuations == [" A", " B", " C", " D"]
    )
    for name in ("arc_easy", "arc_challenge", "mmlu"):
        assert (get_task(name).mc_format, get_task(name).lm_eval_task) == ("plain", name)
    assert len(load_task("arc_easy", "validation").examples) == 570
    assert len(load_task("arc_challenge", "validation").examples) == 299


def test_eval_named_tasks_from_the_command_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "runs"))
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy:validation,mmlu",
            "--limit", "3", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    tasks = report["base"]["tasks"]
    assert [t["name"] for t in tasks] == ["arc_easy:validation", "mmlu"]
    assert all(t["n"] == 3 and set(t["metrics"]) == {"acc", "acc_norm"} for t in tasks)
    assert [s["mc_format"] for s in report["suite"]["ood"]] == ["plain", "plain"]
    capsys.readouterr()
    for args, reason in (
        (["--tasks", "nosuch"], "Unknown task 'nosuch'"),
        (["--tasks", "arc_easy:train"], "has no split 'train'"),
        (["--tasks", "mbpp", "--mc-format", "plain"], "not multiple choice"),
        (["--tasks", "mmlu", "--suite", "tiny"], "not both"),
        (["--tasks", "mmlu", "--mc-format", "fancy"], "invalid choice"),
    ):
        try:
            code = main(["eval", "--model", str(tiny_model_dir), *args])
        except SystemExit as exc:  # argparse's own check of a flag's choices
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and reason in err[0], (args, err)
