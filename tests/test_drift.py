"""Drift from the base model (core/eval/drift.py): the per-token numbers against a naive
full-logits numpy reference, exact zeros, the cached base answers, probes and bad input."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.errors import LensError
from core.eval.compare import compare_results
from core.eval.drift import ProbeAnswerCache, score_drift
from core.eval.probes import OOD_DOMAINS, PROBE_OOD, PROBE_TEXT, Probe, load_probe
from core.eval.runner import run_suite
from core.eval.suites import DRIFT, EvalSuite, EvalTaskSpec
from core.model.encoding import encode_prompt
from core.model.loading import LoadedModel
from tests.factories import lora

PROMPTS = ("Write a function that adds two numbers.", "What is the capital of France?")


def _probe(*prompts: str) -> Probe:
    from core.data.records import Example

    return Probe("test", tuple(Example(f"p/{i}", p, "") for i, p in enumerate(prompts)))


def _naive(lm: LoadedModel, prompt: str, answer: list[int]) -> dict[str, np.ndarray]:
    """Full logits of every position, base (adapter disabled) and tuned, in numpy float64."""
    ids = torch.tensor([encode_prompt(lm.tokenizer, prompt) + answer])
    start = ids.shape[1] - len(answer)
    with torch.no_grad():
        tuned = lm.model(input_ids=ids).logits[0].double().numpy()
        with lm.model.disable_adapter():
            base = lm.model(input_ids=ids).logits[0].double().numpy()

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lb, lt = log_softmax(base[start - 1 : -1]), log_softmax(tuned[start - 1 : -1])
    rows = np.arange(len(answer))
    return {
        "kl": (np.exp(lb) * (lb - lt)).sum(-1),
        "agree": lb.argmax(-1) == lt.argmax(-1),
        "nll_base": -lb[rows, answer],
        "nll_tuned": -lt[rows, answer],
    }


def test_drift_matches_a_naive_full_logits_reference(tiny_lm):
    tuned = lora(tiny_lm, trained=True)
    cache = ProbeAnswerCache()
    metrics, details, _ = score_drift(
        tuned, _probe(*PROMPTS), max_new_tokens=12, is_base=False, answer_cache=cache
    )
    assert metrics["kl"] > 0.01  # the perturbed adapter moved the distributions
    kl_all, agree_all, dnll_all = [], [], []
    for prompt, detail in zip(PROMPTS, details, strict=True):
        ref = _naive(tuned, prompt, detail["ids"])
        np.testing.assert_allclose(detail["token_kl"], ref["kl"], atol=1e-5)
        assert detail["kl_sum"] == pytest.approx(ref["kl"].sum(), abs=1e-5)
        assert detail["agree"] == int(ref["agree"].sum())
        assert detail["nll_base_sum"] == pytest.approx(ref["nll_base"].sum(), abs=1e-5)
        assert detail["nll_tuned_sum"] == pytest.approx(ref["nll_tuned"].sum(), abs=1e-5)
        np.testing.assert_allclose(
            detail["token_dlp"], ref["nll_base"] - ref["nll_tuned"], atol=1e-5
        )
        kl_all.append(ref["kl"])
        agree_all.append(ref["agree"])
        dnll_all.append(ref["nll_tuned"] - ref["nll_base"])
    kl, agree, dnll = (np.concatenate(x) for x in (kl_all, agree_all, dnll_all))
    assert metrics["kl"] == pytest.approx(kl.mean(), abs=1e-5)
    assert metrics["kl_p99"] == pytest.approx(np.percentile(kl, 99), abs=1e-5)
    assert metrics["top1_agree"] == pytest.approx(agree.mean(), abs=1e-9)
    assert metrics["dnll"] == pytest.approx(dnll.mean(), abs=1e-5)
    # the split by direction adds up to the whole KL
    assert metrics["kl_toward"] + metrics["kl_away"] == pytest.approx(metrics["kl"], abs=1e-12)


def test_drift_is_exactly_zero_for_a_fresh_adapter_and_for_the_base_itself(tiny_lm):
    probe = _probe(*PROMPTS)
    cache = ProbeAnswerCache()
    base_metrics, base_details, _ = score_drift(
        tiny_lm, probe, max_new_tokens=10, is_base=True, answer_cache=cache
    )
    fresh_metrics, fresh_details, _ = score_drift(
        lora(tiny_lm, trained=False), probe, max_new_tokens=10, is_base=False, answer_cache=cache
    )
    for metrics, details in ((base_metrics, base_details), (fresh_metrics, fresh_details)):
        assert metrics["kl"] == 0.0
        assert metrics["kl_p99"] == 0.0
        assert metrics["top1_agree"] == 1.0
        assert metrics["dnll"] == 0.0
        assert all(d["kl_sum"] == 0.0 for d in details)
    # the same answers were teacher-forced on both sides (the cache served the second)
    assert [d["ids"] for d in base_details] == [d["ids"] for d in fresh_details]


def test_base_answers_are_cached_and_recomputed_when_the_model_or_template_changes(tiny_lm):
    probe = _probe(*PROMPTS)
    cache = ProbeAnswerCache()
    _, first, notes = score_drift(
        tiny_lm, probe, max_new_tokens=6, is_base=True, answer_cache=cache
    )
    assert any("answered 2 probe prompt(s) now" in n for n in notes)
    assert len(cache) == 2
    _, again, notes = score_drift(
        tiny_lm, probe, max_new_tokens=6, is_base=True, answer_cache=cache
    )
    assert not any("answered" in n for n in notes)
    assert [d["ids"] for d in again] == [d["ids"] for d in first]
    other_model = replace(tiny_lm, fingerprint=tiny_lm.fingerprint + "-other")
    _, _, notes = score_drift(
        other_model, probe, max_new_tokens=6, is_base=True, answer_cache=cache
    )
    assert any("answered 2" in n for n in notes)
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    _, _, notes = score_drift(
        replace(tiny_lm, tokenizer=tokenizer),
        probe,
        max_new_tokens=6,
        is_base=True,
        answer_cache=cache,
    )
    assert any("answered 2" in n for n in notes)
    assert len(cache) == 6


def test_the_ood_probe_is_balanced_fixed_and_large_enough():
    probe = load_probe(PROBE_OOD)
    assert len(probe.items) >= 200
    first = probe.domains[:8]
    assert first == list(OOD_DOMAINS) * 2  # interleaved: the first n items stay balanced
    assert [ex.id for ex in load_probe(PROBE_OOD, n=12).items] == [ex.id for ex in probe.items[:12]]
    assert len({ex.id for ex in probe.items}) == len(probe.items)
    text = load_probe(PROBE_TEXT, n=5)
    assert text.plain_text and all(len(ex.prompt) > 50 for ex in text.items)


def test_a_suite_with_drift_tasks_compares_with_paired_intervals(tiny_lm):
    suite = EvalSuite(
        "drift-test",
        "",
        target=(EvalTaskSpec("target_drift", "mbpp", DRIFT, n=3, split="test", max_new_tokens=6),),
        ood=(
            EvalTaskSpec("ood_drift", PROBE_OOD, DRIFT, n=4, max_new_tokens=6),
            EvalTaskSpec("text_drift", PROBE_TEXT, DRIFT, n=3),
        ),
    )
    base = run_suite(tiny_lm, suite)
    assert base.task("ood_drift").value == 0.0
    tuned = run_suite(lora(tiny_lm, trained=True), suite, base=base)
    assert tuned.task("ood_drift").value > 0
    assert tuned.task("text_drift").metrics["dbpb"] is not None
    comparison = compare_results(base, tuned, suite)
    row = comparison.per_task["ood_drift"]
    assert row["metric"] == "kl" and row["role"] == "ood"
    interval = row["delta_interval"]
    assert interval["n"] == 4 and interval["low"] <= interval["estimate"] <= interval["high"]
    assert comparison.bwt is None  # drift never enters BWT
    assert "target_drift" in comparison.per_task
    json.dumps(tuned.to_dict())  # saved rounds stay JSON


def test_a_full_fine_tune_needs_a_reference_with_the_same_tokenizer(tiny_lm):
    full = replace(tiny_lm, model=copy.deepcopy(tiny_lm.model))
    with pytest.raises(LensError, match="no adapter to disable"):
        score_drift(full, _probe(*PROMPTS), max_new_tokens=4, is_base=False)
    metrics, _, _ = score_drift(
        full, _probe(*PROMPTS), max_new_tokens=4, is_base=False, reference=tiny_lm
    )
    assert metrics["kl"] == 0.0  # an unchanged copy does not drift
    other = copy.deepcopy(tiny_lm.tokenizer)
    other.add_tokens(["<brand-new-token>"])
    with pytest.raises(LensError, match="different tokenizer"):
        score_drift(
            full,
            _probe(*PROMPTS),
            max_new_tokens=4,
            is_base=False,
            reference=replace(tiny_lm, tokenizer=other),
        )


def test_bad_probe_files_get_one_line(tmp_path, tiny_lm):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": ""}\n{"prompt": "   "}\n')
    with pytest.raises(LensError, match="no usable prompts"):
        load_probe(f"file:{empty}")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(LensError, match="line 2: not valid JSON"):
        load_probe(f"file:{broken}")
    with pytest.raises(LensError, match="does not exist"):
        load_probe(f"file:{tmp_path / 'missing.txt'}")
    long = tmp_path / "long.txt"
    long.write_text("short prompt\n" + "word " * 400 + "\n")
    probe = load_probe(f"file:{long}")
    assert len(probe.items) == 2
    with pytest.raises(LensError, match="longer than the model's 256-token context"):
        run_suite(
            tiny_lm,
            EvalSuite("f", "", (), (EvalTaskSpec("mine", f"file:{long}", DRIFT, n=None),)),
        )


def test_cli_eval_measures_drift_on_a_users_probe_file(tiny_model_dir, tmp_path, capsys):
    from core.cli import main

    probe = tmp_path / "my_prompts.txt"
    probe.write_text("What is the boiling point of water?\n\nName three primary colours.\n")
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy", "--limit", "2"]
    assert main([*args, "--probe", str(probe), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    task = next(t for t in report["base"]["tasks"] if t["name"] == "drift:my_prompts")
    assert task["scorer"] == DRIFT and task["n"] == 2 and task["metrics"]["kl"] == 0.0
    assert "drift:my_prompts" in capsys.readouterr().out
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n\n")
    assert main([*args, "--probe", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Probe file 'empty.csv' has no usable prompts") and "\n" not in err


def _count_passes(monkeypatch) -> list[bool]:
    """Record each drift forward pass: True when the adapter was disabled (the base's pass)."""
    from core.model.loading import LoadedModel

    calls: list[bool] = []
    original = LoadedModel.response_logits

    def counted(self, encs):
        layers = [m for m in self.model.modules() if hasattr(m, "lora_A")]
        calls.append(not layers or all(m.disable_adapters for m in layers))
        return original(self, encs)

    monkeypatch.setattr(LoadedModel, "response_logits", counted)
    return calls


def _summarised_round(lm, probe, caches, *, is_base: bool, tokens: int):
    """One drift round with the given (answers, summaries) caches."""
    answers, summaries = caches
    return score_drift(
        lm,
        probe,
        max_new_tokens=tokens,
        is_base=is_base,
        answer_cache=answers,
        summary_cache=summaries,
    )


def test_a_later_round_runs_only_the_tuned_pass_and_keeps_the_exact_kl(tiny_lm, monkeypatch):
    from core.eval.base_summary import BaseSummaryCache

    probe = _probe(*PROMPTS)
    caches = answers, summaries = ProbeAnswerCache(), BaseSummaryCache()
    tuned = lora(tiny_lm, trained=True)
    calls = _count_passes(monkeypatch)
    # step 0: the base itself, one pass, which also summarises the base's side
    _summarised_round(tiny_lm, probe, caches, is_base=True, tokens=12)
    assert len(summaries) == 2
    calls.clear()
    metrics, details, _ = _summarised_round(tuned, probe, caches, is_base=False, tokens=12)
    assert calls == [False]  # one batch, the tuned pass only: no base pass
    for prompt, detail in zip(PROMPTS, details, strict=True):
        ref = _naive(tuned, prompt, detail["ids"])
        np.testing.assert_allclose(detail["token_kl"], ref["kl"], atol=1e-5)
        assert detail["agree"] == int(ref["agree"].sum())
        assert detail["nll_base_sum"] == pytest.approx(ref["nll_base"].sum(), abs=1e-5)
    # the same numbers as the two-pass computation
    calls.clear()
    slow, slow_details, _ = score_drift(
        tuned, probe, max_new_tokens=12, is_base=False, answer_cache=answers, one_pass=False
    )
    assert calls == [True, False]
    for a, b in zip(details, slow_details, strict=True):
        np.testing.assert_allclose(a["token_kl"], b["token_kl"], atol=1e-6)
        assert a["agree"] == b["agree"]
    assert metrics["kl"] == pytest.approx(slow["kl"], abs=1e-6)


def test_base_summaries_are_made_when_missing_and_keyed_by_the_model(tiny_lm, monkeypatch):
    from core.eval.base_summary import BaseSummaryCache, plain_head, summary_model_key

    probe = _probe(*PROMPTS)
    caches = answers, summaries = ProbeAnswerCache(), BaseSummaryCache()
    tuned = lora(tiny_lm, trained=True)
    calls = _count_passes(monkeypatch)
    first, _, _ = _summarised_round(tuned, probe, caches, is_base=False, tokens=8)
    assert calls == [True, False] and len(summaries) == 2  # no step 0: the base's pass ran
    calls.clear()
    again, _, _ = _summarised_round(tuned, probe, caches, is_base=False, tokens=8)
    assert calls == [False] and again["kl"] == pytest.approx(first["kl"], abs=1e-12)
    head = plain_head(tiny_lm)
    key = summary_model_key(tiny_lm, head)
    assert summary_model_key(replace(tiny_lm, fingerprint="other"), head) != key
    changed = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        changed.get_output_embeddings().weight.mul_(1.01)
    assert (
        summary_model_key(
            replace(tiny_lm, model=changed), plain_head(replace(tiny_lm, model=changed))
        )
        != key
    )
    # an adapter on the output head wraps it: no summaries, both passes
    from peft import LoraConfig, get_peft_model

    head_lora = get_peft_model(
        copy.deepcopy(tiny_lm.model), LoraConfig(r=2, target_modules=["lm_head", "q_proj"])
    )
    assert plain_head(replace(tiny_lm, model=head_lora)) is None
