"""Hand-made run folders with per-item evaluation rounds, written the way the training callback
writes them: `eval/step-N.json` (the round's full result with per-item details), the round's
"eval" records and the "eval_summary" that `compare_results` gives against step 0. No model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.eval.compare import compare_results, recorded_suite
from core.eval.drift import drift_metrics
from core.eval.scorers import SuiteResult, TaskResult
from core.io import write_json_atomic
from core.jobs.runfiles import append_metric, eval_round_path

#: task name -> (scorer, role): a target reference-NLL task, an OOD multiple-choice task (four
#: choices: chance 0.25) and an OOD reference-NLL task, like the "during" suite
TASKS: dict[str, tuple[str, str]] = {
    "mbpp_ppl": ("ref_ppl", "target"),
    "arc_easy": ("mc_loglik", "ood"),
    "gsm8k_ppl": ("ref_ppl", "ood"),
}


DRIFT_TOKENS = 10  # answer tokens per drift probe item


def drift_details(name: str, items: Sequence[Any]) -> list[dict[str, Any]]:
    """A drift task's per-item details from (kl per token, tokens agreeing with the base's top-1,
    Δ NLL of the base's answer per token, share of the KL toward the base's answer) per item,
    each item `DRIFT_TOKENS` tokens long, the way `core.eval.drift.item_details` saves them."""
    details = []
    for i, (kl, agree, dnll, toward) in enumerate(items):
        kl_sum, tokens = float(kl) * DRIFT_TOKENS, DRIFT_TOKENS
        details.append(
            {
                "id": f"{name}-{i}",
                "domain": "mix",
                "tokens": tokens,
                "kl_sum": kl_sum,
                "kl_max": float(kl),
                "agree": int(agree),
                "nll_base_sum": 1.0 * tokens,
                "nll_tuned_sum": (1.0 + float(dnll)) * tokens,
                "ent_base_sum": 2.0 * tokens,
                "ent_tuned_sum": 2.0 * tokens,
                "kl_toward_sum": float(toward) * kl_sum,
                "kl_away_sum": (1.0 - float(toward)) * kl_sum,
                "ids": list(range(tokens)),
                "token_kl": [float(kl)] * tokens,
                "token_dlp": [-float(dnll)] * tokens,
            }
        )
    return details


def task_result(name: str, items: Sequence[Any], scorer: str, role: str) -> TaskResult:
    """A task's result from per-item values: 0/1 correctness for multiple choice and code,
    (summed NLL, tokens) pairs for reference NLL, `drift_details` tuples for drift."""
    if scorer == "drift":
        details = drift_details(name, items)
        return TaskResult(
            name, name, scorer, role, "kl", drift_metrics(details), len(items), 0.1, details
        )
    if scorer == "ref_ppl":
        details = [
            {
                "id": f"{name}-{i}",
                "tokens": int(tok),
                "easy_tokens": int(tok),
                "nll_sum": float(s),
                "easy_nll_sum": 0.5 * float(s),
            }
            for i, (s, tok) in enumerate(items)
        ]
        total = sum(d["tokens"] for d in details)
        nll = sum(d["nll_sum"] for d in details) / total
        metrics = {"nll": nll, "ppl": 2.718281828**nll, "nll_easy": nll / 2}
        primary = "nll"
    elif scorer == "mc_loglik":
        details = [
            {
                "id": f"{name}-{i}",
                "gold": 0,
                "pred": 0 if ok else 1,
                "pred_norm": 0,
                "ll": [-1.0, -2.0, -3.0, -4.0],
            }
            for i, ok in enumerate(items)
        ]
        metrics = {"acc": sum(map(bool, items)) / len(items), "acc_norm": 1.0}
        primary = "acc"
    else:  # code_exec
        details = [{"id": f"{name}-{i}", "passed": bool(ok)} for i, ok in enumerate(items)]
        metrics = {"pass@1": sum(map(bool, items)) / len(items)}
        primary = "pass@1"
    return TaskResult(
        name, name.removesuffix("_ppl"), scorer, role, primary, metrics, len(items), 0.1, details
    )


def make_eval_run(
    root: Path,
    run_id: str,
    rounds: Mapping[int, Mapping[str, Sequence[Any]]],
    *,
    method: str = "stm",
    seed: int = 0,
    tasks: Mapping[str, tuple[str, str]] = TASKS,
    losses: Sequence[float] = (2.0, 1.8, 1.7, 1.6),
) -> Path:
    """A run folder whose evaluation rounds (step -> task -> per-item values) are saved with
    their records and TI / BWT summaries against the first round; `losses` are the training
    losses at steps 1, 2, ... (none: an evaluation-only run)."""
    folder = root / run_id
    folder.mkdir(parents=True)
    config = {
        "method": method,
        "tau": 2.5 if method != "gt" else None,
        "seed": seed,
        "model": "default",
    }
    (folder / "config.json").write_text(json.dumps(config))
    append_metric(folder, {"kind": "data", "time": 1.0, "method": method, "tau": config["tau"]})
    for step, loss in enumerate(losses, start=1):
        append_metric(
            folder,
            {
                "kind": "train",
                "step": step,
                "epoch": 0.1 * step,
                "time": 1.0 + step,
                "loss": loss,
                "lr": 1e-4,
            },
        )
    base = None
    for step, values in sorted(rounds.items()):
        result = SuiteResult(
            suite="fake",
            settings_fingerprint="fp",
            model="default",
            adapter=None,
            tasks=[
                task_result(name, values[name], *tasks[name]) for name in tasks if name in values
            ],
            seconds=1.0,
            created=1.0,
        )
        write_json_atomic(eval_round_path(folder, step), result.to_dict())
        for record in result.records(step, when=10.0 + step):
            append_metric(folder, record)
        base = base or result
        summary = compare_results(base, result, recorded_suite(base)).summary_record(step, 10.0)
        append_metric(folder, summary)
    return folder


# Per-item values of a typical run: the target NLL falls, ARC-Easy loses items, GSM8K's NLL rises.
N = 24
BASE = {
    "mbpp_ppl": [(10.0 + i % 5, 10) for i in range(N)],
    "arc_easy": [i % 4 != 0 for i in range(N)],  # 18/24 right: well above chance
    "gsm8k_ppl": [(12.0 + i % 3, 10) for i in range(N)],
}


def later(step: int) -> dict[str, list[Any]]:
    """The values at a later step: NLLs move by `step` tenths of a nat, ARC-Easy loses items."""
    return {
        "mbpp_ppl": [
            (s - step * (0.5 + 0.1 * (i % 3)), t) for i, (s, t) in enumerate(BASE["mbpp_ppl"])
        ],
        "arc_easy": [ok and i >= step * 2 for i, ok in enumerate(BASE["arc_easy"])],
        "gsm8k_ppl": [(s + 0.2 * step * (i % 2), t) for i, (s, t) in enumerate(BASE["gsm8k_ppl"])],
    }


#: `TASKS` and the drift probes every built-in suite now has: the target's held-out prompts
#: (role "target") and the mixed out-of-domain prompts (role "ood")
DRIFT_TASKS: dict[str, tuple[str, str]] = {
    **TASKS,
    "target_drift": ("drift", "target"),
    "ood_drift": ("drift", "ood"),
}
#: the base model against itself: no drift (KL 0, every top-1 agrees, Δ NLL 0)
BASE_DRIFT = {
    **BASE,
    "target_drift": [(0.0, DRIFT_TOKENS, 0.0, 0.0)] * N,
    "ood_drift": [(0.0, DRIFT_TOKENS, 0.0, 0.0)] * N,
}


def later_drift(step: int) -> dict[str, list[Any]]:
    """`later(step)` plus drift growing with `step`: on the target's prompts mostly sharpening
    toward the base's own answers (Δ NLL < 0, 80% of the KL toward), on OOD prompts mostly moving
    away (Δ NLL > 0, 20% toward)."""
    return {
        **later(step),
        "target_drift": [
            (
                0.02 * step * (1 + i % 3),
                DRIFT_TOKENS - (i % 2) * min(step, 5),
                -0.01 * step * (1 + i % 2),
                0.8,
            )
            for i in range(N)
        ],
        "ood_drift": [
            (
                0.01 * step * (1 + i % 4),
                DRIFT_TOKENS - (i % 3 == 0) * min(step, 5),
                0.005 * step * (i % 3),
                0.2,
            )
            for i in range(N)
        ],
    }
