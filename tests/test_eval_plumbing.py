"""The evaluation runner's plumbing on a fake model (`tests/fake_model.py`): every built-in
scorer kind that needs no real model runs end to end through `core.eval.scorers.SCORERS`,
without torch; what a scorer reports is what the model gave; an unknown kind, a kind that needs
a Hugging Face model, and a failing task are handled in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.errors import LensError
from core.eval.runner import run_suite
from core.eval.scorers import SCORERS, SuiteResult, plain_mc_request, select_examples
from core.eval.suites import (
    DRIFT,
    LM_EVAL,
    MC_LOGLIK,
    NUMERIC_MATCH,
    REF_PPL,
    SCORER_KINDS,
    EvalSuite,
    EvalTaskSpec,
    get_suite,
)
from core.model.encoding import encode_pair, encode_plain_pair
from core.model.interface import LanguageModel
from core.model.loading import LoadedModel, require_loaded
from tests.fake_model import FakeModel

ROOT = Path(__file__).resolve().parents[1]


# The body of the torch-free test, run in a fresh interpreter: pytest's own process has torch
# loaded already (conftest.py loads models).
TORCH_FREE = textwrap.dedent(
    """
    import json, sys
    from core.eval.compare import compare_results
    from core.eval.runner import run_suite
    from tests.fake_model import FakeModel, plumbing_suite

    suite = plumbing_suite()
    lm = FakeModel()
    base = run_suite(lm, suite)
    again = run_suite(FakeModel(), suite)
    tuned = run_suite(FakeModel(seed=1), suite, base=base)
    comparison = compare_results(base, tuned, suite)
    print(json.dumps({
        "base": base.to_dict(),
        "again": again.to_dict(),
        "tuned": tuned.to_dict(),
        "comparison": comparison.to_dict(),
        "calls": lm.calls,
        "specs": [[s.name, s.scorer, s.n] for s in suite.specs()],
        "loaded": [m for m in ("torch", "transformers", "peft") if m in sys.modules],
    }))
    """
)


def test_a_suite_runs_end_to_end_on_the_fake_model_without_torch():
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []  # neither torch nor transformers was imported
    base = SuiteResult.from_dict(out["base"])
    tuned = SuiteResult.from_dict(out["tuned"])
    kinds = {scorer for _, scorer, _ in out["specs"]}
    assert kinds == set(SCORER_KINDS) - {DRIFT, LM_EVAL}
    for name, scorer, n in out["specs"]:
        for result in (base, tuned):
            task = result.task(name)
            assert task is not None and task.scorer == scorer
            assert not task.skipped and task.n == n and len(task.details) == n
            assert task.primary in task.metrics
    # deterministic: the same model scores the same numbers, another one other numbers
    timeless = [[{**t, "seconds": 0} for t in out[k]["tasks"]] for k in ("base", "again")]
    assert timeless[0] == timeless[1]
    assert base.task("mbpp_ppl").metrics != tuned.task("mbpp_ppl").metrics
    # a tuned run measures reference perplexity on the base run's easy tokens
    assert set(base.easy_tokens) == {"mbpp_ppl", "gsm8k_ppl"}
    assert tuned.easy_tokens == base.easy_tokens
    # three generative tasks, one plain multiple-choice task, scoring batches for the rest
    calls = out["calls"]
    assert calls["generate"] == 3 and calls["continuation_logprobs"] == 1
    assert calls["score_pairs"] >= 4
    assert set(out["comparison"]["per_task"]) >= {"mbpp", "arc_challenge", "gsm8k_ppl"}


def test_scorers_report_what_the_model_gives():
    """Reference perplexity sums the model's own log-probs of each encoded pair, and a plain
    multiple-choice pick is the choice with the highest continuation log-likelihood."""
    lm = FakeModel()
    ppl = EvalTaskSpec("ppl", "gsm8k", REF_PPL, n=2)
    plain = EvalTaskSpec("arc", "arc_easy", MC_LOGLIK, n=3, mc_format="plain")
    result = run_suite(lm, EvalSuite("s", "", target=(ppl,), ood=(plain,)))
    for ex, detail in zip(select_examples(ppl), result.task("ppl").details, strict=True):
        enc = encode_pair(lm.tokenizer, ex.prompt, ex.response, max_length=lm.max_length)
        (scores,) = lm.score_pairs([enc], 1)
        assert detail["id"] == ex.id and detail["tokens"] == enc.n_response
        assert detail["nll_sum"] == pytest.approx(-sum(scores.logprob))
    for ex, detail in zip(select_examples(plain), result.task("arc").details, strict=True):
        context, continuations, _ = plain_mc_request(ex)
        encs = [encode_plain_pair(lm.tokenizer, context, c) for c in continuations]
        lls = [ll for ll, _ in lm.continuation_logprobs(encs)]
        assert detail["ll"] == pytest.approx(lls)
        assert detail["pred"] == max(range(len(lls)), key=lambda i: (lls[i], -i))


def test_the_scorer_table_covers_every_kind_and_an_unknown_one_fails_before_any_work(
    monkeypatch,
):
    assert set(SCORERS) == set(SCORER_KINDS)
    lm = FakeModel()
    suite = EvalSuite(
        "s",
        "",
        target=(EvalTaskSpec("ppl", "gsm8k", REF_PPL, n=1),),
        ood=(EvalTaskSpec("gsm8k", "gsm8k", NUMERIC_MATCH, n=1),),
    )
    monkeypatch.delitem(SCORERS, NUMERIC_MATCH)
    with pytest.raises(LensError) as err:
        run_suite(lm, suite)
    assert str(err.value).startswith("Unknown scorer 'numeric_match' for 'gsm8k' (use ")
    assert "\n" not in str(err.value)
    assert lm.calls == {}  # not even the first task ran


def test_kinds_that_need_a_hugging_face_model_say_so_in_one_line():
    lm = FakeModel()
    lm_eval = EvalSuite("s", "", (), (EvalTaskSpec("x", "piqa", LM_EVAL, n=2),))
    skipped = run_suite(lm, lm_eval).task("x")
    assert skipped.skipped and "\n" not in skipped.skipped and skipped.metrics == {}
    drift = get_suite("tiny").ood[-1]
    assert drift.scorer == DRIFT
    with pytest.raises(LensError, match=r"needs a Hugging Face model, not FakeModel\.$"):
        run_suite(lm, EvalSuite("s", "", (), (drift,)))


def test_the_model_is_evaluated_in_eval_mode_and_put_back():
    lm = FakeModel(training=True)
    seen: list[bool] = []
    real = lm.score_pairs

    def noting(encs, top_k):
        seen.append(lm.training)
        return real(encs, top_k)

    lm.score_pairs = noting  # type: ignore[method-assign]
    ppl = EvalTaskSpec("ppl", "gsm8k", REF_PPL, n=1)
    suite = EvalSuite("s", "", (ppl,), ())
    run_suite(lm, suite)
    assert seen == [False] and lm.training
    # a task that fails still puts the mode back
    stale = SuiteResult("s", suite.fingerprint(), "m", None, [], 0.0)
    with pytest.raises(LensError, match="no easy-token mask"):
        run_suite(lm, suite, base=stale)
    assert lm.training


def test_the_loaded_model_and_the_fake_implement_the_interface(tiny_lm):
    assert isinstance(tiny_lm, LoadedModel) and isinstance(tiny_lm, LanguageModel)
    assert isinstance(FakeModel(), LanguageModel)
    assert require_loaded(tiny_lm, "x") is tiny_lm
    with pytest.raises(LensError, match="^Drift needs a Hugging Face model, not FakeModel.$"):
        require_loaded(FakeModel(), "Drift")
    # the same operation, the same shape of answer
    enc = encode_pair(tiny_lm.tokenizer, "Say hi.", "Hi!", max_length=64)
    (real,) = tiny_lm.score_pairs([enc], 3)
    assert len(real.logprob) == len(real.rank) == enc.n_response
    assert all(len(row) == 3 for row in real.top_ids)
    assert tiny_lm.vocab_size == tiny_lm.model.config.vocab_size
