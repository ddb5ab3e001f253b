"""Multiple-choice formats: `plain` is lm-evaluation-harness's request (plain text, no chat
template) and scores the same log-likelihoods as a straightforward full forward pass; tasks are
evaluated by name (`eval --tasks`), with one-line errors for what does not exist. Choices that
share a context are scored on a copy of its KV cache, and that scores what full sequences do."""

from __future__ import annotations

import json
import random

import pytest
import torch

from core.cli import main
from core.data.tasks import get_task, load_task
from core.eval.runner import run_suite
from core.eval.scorers import plain_mc_request
from core.eval.suites import tasks_suite
from core.model import forward
from core.model.encoding import EncodedPair


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
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--tasks",
        "arc_easy:validation,mmlu",
        "--limit",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
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


def _greedy_tokens(lm, context: list[int], n: int) -> list[int]:
    """The model's own top tokens after `context`, one at a time: a choice whose every token
    is greedy."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


def _mc_pairs(lm, seed: int) -> list[EncodedPair]:
    """Random contexts (3 to 40 tokens) with 1 to 5 choices each: choices of 1 to 12 tokens,
    some sharing their first token, some one token, some the model's greedy tokens, a context
    with one-token choices only and lone pairs (single-choice groups), shuffled."""
    rng = random.Random(seed)
    pairs = []
    for q in range(14):
        context = [rng.randrange(100, 5000) for _ in range(rng.randint(3, 40))]
        choices = [
            [rng.randrange(100, 5000) for _ in range(rng.randint(1, 12))]
            for _ in range(rng.randint(1, 5))
        ]
        if q % 3 == 0:  # same first token as the first choice
            choices.append(choices[0][:1] + [rng.randrange(100, 5000) for _ in range(3)])
        if q % 4 == 1:
            choices += [_greedy_tokens(lm, context, 1), _greedy_tokens(lm, context, 3)]
        if q == 5:
            choices = [[rng.randrange(100, 5000)] for _ in range(4)]
        pairs += [EncodedPair(context + c, len(context)) for c in choices]
    rng.shuffle(pairs)
    return pairs


@pytest.mark.parametrize(("budget", "max_batch"), [(2048, 64), (96, 3)])
def test_shared_context_scores_what_full_sequences_score(tiny_lm, budget, max_batch):
    """Each context run once, its choices on copies of its cache (several batches with the small
    budget): the same summed log-probs within 1e-4 and the same greedy flags as scoring every
    pair as a whole sequence, through the cache for every multi-choice context."""
    cached: list[bool] = []

    def note(module, args, kwargs):
        cached.append(kwargs.get("past_key_values") is not None)

    hook = tiny_lm.model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        for seed in range(3):
            pairs = _mc_pairs(tiny_lm, seed)
            cached.clear()
            new = forward.continuation_logprobs(
                tiny_lm, pairs, token_budget=budget, max_batch=max_batch
            )
            assert any(cached)
            cached.clear()
            old = forward.continuation_logprobs(tiny_lm, pairs, share_context=False)
            assert not any(cached)
            assert [lp for lp, _ in new] == pytest.approx([lp for lp, _ in old], abs=1e-4)
            assert [g for _, g in new] == [g for _, g in old]
            assert any(g for _, g in old)  # the greedy choices are flagged, both ways
    finally:
        hook.remove()
    assert type(tiny_lm.model) not in forward._NO_SHARED_CONTEXT


def test_shared_context_falls_back_to_full_sequences(tiny_lm, monkeypatch):
    """A model whose forward cannot continue a copied cache (here: an error on first use) is
    scored as full sequences, the same numbers, and not tried again."""
    calls = []

    def fails(*args, **kwargs):
        calls.append(1)
        raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")

    monkeypatch.setattr(forward, "_NO_SHARED_CONTEXT", set())
    monkeypatch.setattr(forward, "_shared_context_batch", fails)
    pairs = _mc_pairs(tiny_lm, 7)
    first = forward.continuation_logprobs(tiny_lm, pairs)
    again = forward.continuation_logprobs(tiny_lm, pairs)
    old = forward.continuation_logprobs(tiny_lm, pairs, share_context=False)
    assert first == old and again == old  # the same batches: the same numbers
    assert calls == [1] and type(tiny_lm.model) in forward._NO_SHARED_CONTEXT


def test_split_by_length_pays_a_pass_only_for_enough_padding():
    assert forward._split_by_length([9, 9, 1, 1], 4) == [(0, 2), (2, 4)]
    assert forward._split_by_length([9, 9, 1, 1], 100) == [(0, 4)]
    assert forward._split_by_length([3], 48) == [(0, 1)]
    assert forward._split_by_length([], 48) == []


def test_arc_picks_are_those_of_full_sequences(tiny_lm, monkeypatch):
    """`run_suite` on ARC-Easy in the `plain` format: the same per-item picks (acc and acc_norm)
    and log-likelihoods with each question's context shared as with every choice scored whole."""
    suite = tasks_suite(["arc_easy:validation"], limit=24, mc_format="plain")
    shared = run_suite(tiny_lm, suite).tasks[0].details
    monkeypatch.setattr(forward, "_NO_SHARED_CONTEXT", {type(tiny_lm.model)})
    whole = run_suite(tiny_lm, suite).tasks[0].details
    assert [(d["id"], d["pred"], d["pred_norm"]) for d in shared] == [
        (d["id"], d["pred"], d["pred_norm"]) for d in whole
    ]
    for a, b in zip(shared, whole, strict=True):
        assert a["ll"] == pytest.approx(b["ll"], abs=1e-4)
