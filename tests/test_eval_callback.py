"""Evaluation during training: on a tiny model trained for a few steps, the callback writes the
agreed metrics.jsonl records at step 0 (the base), every N steps and at the end."""

from __future__ import annotations

import json
import re

import pytest
import torch

from core.eval.probes import PROBE_OOD
from core.eval.runner import EvalCache
from core.eval.scorers import SuiteResult
from core.eval.suites import DRIFT, MC_LOGLIK, REF_PPL, EvalSuite, EvalTaskSpec
from core.jobs.runfiles import eval_round_path, eval_round_steps, read_metrics
from core.jobs.state import Phase, read_state
from core.model.loading import EMBEDDED_FINGERPRINT
from core.training.callbacks import EvalCallback, make_training_callbacks
from core.training.config import TrainConfig
from core.training.trainer import run_training

SUITE = EvalSuite(
    "callback-test",
    "",
    # a random tiny model finds few tokens easy at tau 2.5; a high tau gives it some
    target=(EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=2, split="test", tau=50_000.0),),
    ood=(
        EvalTaskSpec("arc", "arc_easy", MC_LOGLIK, n=2),
        EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=2, tau=50_000.0),
        EvalTaskSpec("ood_drift", PROBE_OOD, DRIFT, n=2, max_new_tokens=6),
    ),
)
ROWS = [
    {"prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"prompt": "What is 7 times 8?", "response": "7 times 8 is 56."},
    {"prompt": "Say hello.", "response": "Hello! How can I help you today?"},
]


def test_callback_writes_eval_records_during_training(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = TrainConfig.from_preset(
        "paper",
        model=str(tiny_model_dir),
        device="cpu",
        task=None,
        data=str(data),
        max_length=64,
        batch_size=3,
        learning_rate=5e-2,  # big steps, so the evaluated model visibly changes
        max_steps=5,
        precision="fp32",
    )
    run = tmp_path / "run"
    messages: list[str] = []
    callback = EvalCallback(SUITE, run, every_n_steps=2, model_name="tiny", status=messages.append)
    run_training(config, run, callbacks=[callback])

    records = read_metrics(run)
    evals = [r for r in records if r["kind"] == "eval"]
    summaries = [r for r in records if r["kind"] == "eval_summary"]
    # step 0 (the base), every 2 steps, and the final step 5
    assert sorted({r["step"] for r in evals}) == [0, 2, 4, 5]
    assert [s["step"] for s in summaries] == [0, 2, 4, 5]
    for r in evals:
        assert set(r) == {"kind", "step", "time", "task", "metric", "value", "n", "role"}
        assert r["n"] == 2
        assert r["role"] == ("target" if r["task"] == "mbpp_ppl" else "ood")
    per_step = {s: {(r["task"], r["metric"]) for r in evals if r["step"] == s} for s in (0, 5)}
    assert per_step[0] == per_step[5]
    assert ("arc", "acc") in per_step[0] and ("gsm8k_ppl", "nll_easy") in per_step[0]
    assert all(set(s) >= {"kind", "step", "time", "bwt", "ti"} for s in summaries)
    assert summaries[0]["nll_easy_change"] == pytest.approx(0.0, abs=1e-3)  # base vs itself
    # every round keeps its per-item results, the input of paired intervals
    assert eval_round_steps(run) == [0, 2, 4, 5]
    final = SuiteResult.from_dict(json.loads(eval_round_path(run, 5).read_text()))
    assert [d["id"] for d in final.task("arc").details] == [
        d["id"] for d in callback.history[0][1].task("arc").details
    ]
    assert {"nll_sum", "tokens"} <= set(final.task("mbpp_ppl").details[0])
    # no target accuracy here: TI is the sign-flipped change of the target's full-token NLL
    assert summaries[0]["ti"] == pytest.approx(0.0, abs=1e-9)  # base vs itself
    assert summaries[-1]["ti"] is not None and summaries[-1]["ti_low"] <= summaries[-1]["ti"]

    def nll(step: int) -> float:
        return next(
            r["value"]
            for r in evals
            if r["step"] == step and r["task"] == "mbpp_ppl" and r["metric"] == "nll"
        )

    assert nll(5) != pytest.approx(nll(0), rel=1e-4)  # it evaluated the model being trained
    # drift from the base: exactly 0 at step 0 (a fresh LoRA adapter), then the adapter moves it
    kl = {r["step"]: r["value"] for r in evals if (r["task"], r["metric"]) == ("ood_drift", "kl")}
    assert kl[0] == 0.0 and kl[5] > 0.0
    # the status line says which state the job is in: round k of 5, training, the final round
    said = [m.split(":")[0] for m in messages]
    assert "evaluating step 0 of 5" in said and "evaluating step 4 of 5" in said
    assert "training" in said and "final evaluation (step 5)" in said
    assert "evaluating step 5 of 5" not in said and not any(
        m.startswith("training: step 5/") for m in messages
    )
    assert read_state(run).phase == Phase.FINAL_EVAL  # run_state.json: the last report
    # evaluation never leaves the model in eval mode for training, and the run finished
    assert records[-1]["kind"] == "done"
    assert callback.seconds > 0 and [h[0] for h in callback.history] == [0, 2, 4, 5]


def test_training_config_gets_the_during_suite_with_its_own_target():
    config = TrainConfig.from_preset("cpu-quick", eval_every=10)
    (callback,) = make_training_callbacks(config, "/tmp/unused")
    assert callback.every_n_steps == 10
    assert callback.fingerprint == EMBEDDED_FINGERPRINT and isinstance(callback.cache, EvalCache)
    assert callback.suite.target[0].name == "mbpp_ppl"
    gsm = TrainConfig.from_preset("cpu-quick", eval_every=5, task="gsm8k", split="test")
    (callback,) = make_training_callbacks(gsm, "/tmp/unused")
    assert [s.name for s in callback.suite.target] == ["gsm8k_ppl", "target_drift"]
    assert callback.suite.target[1].task == "gsm8k"  # drift on the training task's prompts
    assert all(s.task != "gsm8k" for s in callback.suite.ood)
    limited = TrainConfig.from_preset(
        "cpu-quick", eval_every=5, eval_suite={"suite": "default", "limit": 3}
    )
    (callback,) = make_training_callbacks(limited, "/tmp/unused")
    assert all(s.n <= 3 for s in callback.suite.specs())
    assert make_training_callbacks(TrainConfig.from_preset("cpu-quick"), "/tmp/unused") == []


def test_rounds_under_bf16_training_score_in_float32(tiny_model_dir, tiny_lm, tmp_path):
    # Training runs under bf16 autocast; the callback adds none and the trainer's autocast does
    # not reach it: the step-0 round equals a plain float32 evaluation of the same base model.
    from core.eval.runner import run_suite

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = TrainConfig.from_preset(
        "paper",
        model=str(tiny_model_dir),
        device="cpu",
        task=None,
        data=str(data),
        max_length=64,
        batch_size=3,
        max_steps=1,
        precision="bf16",
    )
    run = tmp_path / "run"
    autocast_seen: list[bool] = []

    class Watching(EvalCallback):
        def evaluate(self, step, model, tokenizer=None, **kwargs):
            hook = model.register_forward_hook(
                lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu"))
            )
            try:
                return super().evaluate(step, model, tokenizer, **kwargs)
            finally:
                hook.remove()

    callback = Watching(SUITE, run, every_n_steps=1, model_name="tiny")
    run_training(config, run, callbacks=[callback])
    records = read_metrics(run)
    assert records[-1]["kind"] == "done"
    assert json.loads((run / "summary.json").read_text())["precision"] == "bf16"
    assert autocast_seen and not any(autocast_seen)
    reference = run_suite(tiny_lm, SUITE)
    step0 = callback.history[0][1]
    diffs = {
        (task.name, metric): abs(step0.task(task.name).metrics[metric] - value)
        for task in reference.tasks
        for metric, value in task.metrics.items()
        if metric in ("nll", "nll_easy", "acc")
    }
    # bit-for-bit up to float32 summation order (this random model's near-uniform logits make
    # bf16's error small too: about 5e-5 here)
    assert max(diffs.values()) < 1e-6, diffs


def test_a_full_fine_tune_measures_drift_against_a_frozen_base_copy(
    tiny_model_dir, tmp_path, capsys
):
    from core.model.loading import load_model

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = TrainConfig.from_preset(
        "paper",
        model=str(tiny_model_dir),
        device="cpu",
        task=None,
        data=str(data),
        max_length=64,
        batch_size=3,
        learning_rate=1e-2,
        max_steps=2,
        precision="fp32",
        finetune="full",
    )
    suite = EvalSuite(
        "full-drift", "", (), (EvalTaskSpec("ood_drift", PROBE_OOD, DRIFT, n=2, max_new_tokens=6),)
    )
    loads = []

    def load_reference():
        loads.append(1)
        return load_model(str(tiny_model_dir), device="cpu", dtype="float32")

    run = tmp_path / "run"
    callback = EvalCallback(
        suite, run, every_n_steps=1, model_name="tiny", load_reference=load_reference
    )
    run_training(config, run, callbacks=[callback])
    kls = [h[1].task("ood_drift").value for h in callback.history]
    assert kls[0] == 0.0 and all(k > 0 for k in kls[1:])
    assert loads == [1]  # one frozen copy for the whole run
    # the job log states the memory the copy costs
    assert re.search(
        r"frozen copy of the base model for reference \(\d+ MiB\)", capsys.readouterr().out
    )
