"""How a task spec is scored: one function per scorer kind, all with one signature
(`Scorer`: the model, the spec and a `ScoreContext` in, a `Scored` out), in the table `SCORERS`
the runner looks a spec's kind up in.

The scorers use the model only through `core.model.interface.LanguageModel` (generation,
token scores, multiple-choice log-likelihoods), so they run on any model that implements it;
drift and lm-eval need a Hugging Face model (`core.model.loading.require_loaded`), and only they
import torch.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.data.records import Example
from core.data.tasks import load_task
from core.errors import LensError
from core.eval.drift import drift_item_scores, drift_task
from core.eval.grading import extract_choice_letter, grade_number, run_code_answers
from core.eval.suites import (
    CODE_EXEC,
    DRIFT,
    LM_EVAL,
    LM_EVAL_METRICS,
    MC_GENERATIVE,
    MC_LOGLIK,
    NUMERIC_MATCH,
    REF_PPL,
    EvalSuite,
    EvalTaskSpec,
)
from core.jobs.metrics import EvalRecord
from core.model.encoding import encode_plain_pair
from core.model.interface import GenerationConfig, LanguageModel
from core.scoring.score import score_examples

#: progress(task, task index, tasks, items done, items in the task (0: not counted))
ProgressFn = Callable[[str, int, int, int, int], None]
#: items(done, total): a scorer's progress through its task's items
ItemsFn = Callable[[int, int], None]


def mc_choice_scores(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood / characters): acc and acc_norm picks,
    first index on ties, as in lm-evaluation-harness."""
    best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    norm = [ll / max(1, len(c)) for ll, c in zip(loglikelihoods, choices, strict=True)]
    best_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return best, best_norm


def _mc_question(example: Example) -> str:
    """The question text of a `core.data.tasks` multiple-choice prompt (its choice lines removed)."""
    meta = example.meta
    block = "\n".join(f"{lab}. {c}" for lab, c in zip(meta["labels"], meta["choices"], strict=True))
    tail = f"\n{block}\n"
    head, sep, _ = example.prompt.rpartition(tail)
    text = head if sep else example.prompt.split("\n", 1)[0]
    return text.removeprefix("Question:").strip()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """Scores of one spec: metrics, how many examples, how long, and per-example details."""

    name: str
    task: str
    scorer: str
    role: str
    primary: str
    metrics: dict[str, float | None]
    n: int
    seconds: float
    details: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""  # why the task could not run (then `metrics` is empty)
    notes: list[str] = field(default_factory=list)  # what a reader should know (items left out)

    @property
    def value(self) -> float | None:
        """The primary metric."""
        return self.metrics.get(self.primary)


# --------------------------------------------------------------------------------------------
# Running a suite
# --------------------------------------------------------------------------------------------


def select_examples(spec: EvalTaskSpec) -> list[Example]:
    """The spec's fixed subset: `n` examples drawn with `random.Random(seed)`, in split order."""
    examples = load_task(spec.task, spec.split).examples
    if spec.n is None or spec.n >= len(examples):
        return list(examples)
    picked = sorted(random.Random(spec.seed).sample(range(len(examples)), spec.n))
    return [examples[i] for i in picked]


@dataclass
class ScoreContext:
    """What a scorer gets besides the model and its spec."""

    suite: EvalSuite
    #: the base model's result on the same suite; None when this run is the base run
    base: SuiteResult | None = None
    #: a frozen copy of the base model (drift of a full fine-tune)
    reference: LanguageModel | None = None
    #: progress through the task's items, for scorers that count them
    items: ItemsFn | None = None


@dataclass
class Scored:
    """What a scorer returns: metrics, per-item details and how many items were scored."""

    metrics: dict[str, float | None]
    details: list[dict[str, Any]]
    n: int
    primary: str | None = None  # None: the spec's primary metric
    notes: list[str] = field(default_factory=list)
    #: a reference-perplexity task's easy-token mask per example id (the base's, or its own in a
    #: base run), which the suite result keeps
    easy_tokens: dict[str, list[bool]] | None = None


#: A scorer kind's function: (model, spec, context) -> Scored.
Scorer = Callable[[LanguageModel, EvalTaskSpec, ScoreContext], Scored]


def _examples(spec: EvalTaskSpec) -> list[Example]:
    examples = select_examples(spec)
    if not examples:
        raise LensError(f"'{spec.name}': the task has no examples.")
    return examples


def _generate(
    lm: LanguageModel, prompts: list[str], spec: EvalTaskSpec, batch_size: int
) -> list[str]:
    config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=False)
    out = lm.generate(prompts, config, batch_size=batch_size)
    return [gens[0].text for gens in out]


def score_code_exec(lm: LanguageModel, spec: EvalTaskSpec, ctx: ScoreContext) -> Scored:
    """``code_exec``: greedy answers run against the task's tests in the sandbox; pass@1."""
    examples = _examples(spec)
    suite = ctx.suite
    answers = _generate(
        lm, [ex.prompt + spec.instruction for ex in examples], spec, suite.batch_size
    )
    pairs = list(zip(examples, answers, strict=True))
    results = run_code_answers(pairs, suite.sandbox, workers=suite.workers)
    details = [
        {"id": ex.id, "passed": r.passed, "status": r.status, "detail": r.detail, "answer": a}
        for ex, r, a in zip(examples, results, answers, strict=True)
    ]
    metrics = {"pass@1": sum(r.passed for r in results) / len(results)}
    return Scored(metrics, details, len(examples))


def score_numeric_match(lm: LanguageModel, spec: EvalTaskSpec, ctx: ScoreContext) -> Scored:
    """``numeric_match``: a greedy answer's final number against the gold answer; exact_match."""
    examples = _examples(spec)
    answers = _generate(
        lm, [ex.prompt + spec.instruction for ex in examples], spec, ctx.suite.batch_size
    )
    details = []
    for ex, answer in zip(examples, answers, strict=True):
        predicted, ok = grade_number(answer, str(ex.meta["gold"]))
        details.append({"id": ex.id, "correct": ok, "predicted": predicted, "answer": answer})
    metrics = {"exact_match": sum(d["correct"] for d in details) / len(details)}
    return Scored(metrics, details, len(examples))


def score_mc_generative(lm: LanguageModel, spec: EvalTaskSpec, ctx: ScoreContext) -> Scored:
    """``mc_generative``: the choice letter of a greedy answer; acc."""
    examples = _examples(spec)
    answers = _generate(
        lm, [ex.prompt + spec.instruction for ex in examples], spec, ctx.suite.batch_size
    )
    details = []
    for ex, answer in zip(examples, answers, strict=True):
        letter = extract_choice_letter(answer, ex.meta["labels"])
        ok = letter == ex.meta["gold"]
        details.append(
            {
                "id": ex.id,
                "correct": ok,
                "predicted": letter,
                "answer": answer,
                "n_choices": len(ex.meta["labels"]),
            }
        )
    metrics = {"acc": sum(d["correct"] for d in details) / len(details)}
    return Scored(metrics, details, len(examples))


def _continuation_loglik(lm: LanguageModel, pairs: list[Example], batch_size: int) -> list[float]:
    """Summed log-probability of each pair's response tokens, end-of-turn token(s) excluded."""
    run = score_examples(lm, pairs, top_k=1, cache=None, max_batch=max(batch_size, 16))
    if run.skipped or len(run.examples) != len(pairs):
        raise LensError(f"Could not score {len(run.skipped)} multiple-choice continuation(s).")
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    out = []
    for rec in run.examples:
        keep = len(rec.logprob)
        while keep > 1 and rec.response_token_ids[keep - 1] in special:
            keep -= 1
        out.append(float(sum(rec.logprob[:keep])))
    return out


def plain_mc_request(example: Example) -> tuple[str, list[str], list[str]]:
    """lm-evaluation-harness's request for a built-in multiple-choice example: (context,
    continuations, the choice strings acc_norm divides by). ARC (lm-eval's `arc_easy` /
    `arc_challenge`): "Question: {q}\\nAnswer:" and " {choice}". MMLU (lm-eval's `mmlu`, zero-shot):
    the subject line, the question with its lettered choices, "Answer:", and " A" ... " D"."""
    meta = example.meta
    labels, choices = list(meta["labels"]), list(meta["choices"])
    question = _mc_question(example)
    if "subject" in meta:
        subject = str(meta["subject"]).replace("_", " ")
        lines = [question, *(f"{lab}. {c}" for lab, c in zip(labels, choices, strict=True))]
        context = (
            f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            + "\n".join(lines)
            + "\nAnswer:"
        )
        return context, [f" {lab}" for lab in labels], labels
    return f"Question: {question}\nAnswer:", [f" {c}" for c in choices], choices


def _score_mc_plain(
    lm: LanguageModel, examples: list[Example]
) -> list[tuple[list[float], list[str]]]:
    """The `plain` format: lm-eval's requests scored as plain text (no chat template), each
    question's choices batched together."""
    encs, spans = [], []
    for ex in examples:
        context, continuations, norm_by = plain_mc_request(ex)
        spans.append((len(encs), norm_by))
        encs += [
            encode_plain_pair(lm.tokenizer, context, c, max_length=lm.max_length)
            for c in continuations
        ]
    results = lm.continuation_logprobs(encs)
    return [([ll for ll, _ in results[s : s + len(norm)]], norm) for s, norm in spans]


def score_mc_loglik(lm: LanguageModel, spec: EvalTaskSpec, ctx: ScoreContext) -> Scored:
    """``mc_loglik``: each choice's log-likelihood as a continuation picks the answer; acc and
    acc_norm (`plain`: lm-eval's plain-text requests; `text` / `chat` / `letter`: chat-templated
    continuations)."""
    examples = _examples(spec)
    if spec.mc_format == "plain":
        scored = _score_mc_plain(lm, examples)
        return _mc_results(examples, scored)
    pairs, spans = [], []
    for ex in examples:
        labels, choices = ex.meta["labels"], ex.meta["choices"]
        if spec.mc_format in ("text", "chat"):
            prompt = f"Question: {_mc_question(ex)}\nAnswer:"
            continuations = list(choices)
        else:
            prompt = ex.prompt
            continuations = [f"Answer: {label}" for label in labels]
        start = len(pairs)
        for k, cont in enumerate(continuations):
            pairs.append(Example(f"{ex.id}#{k}", prompt, cont))
        spans.append((start, continuations))
    lls = _continuation_loglik(lm, pairs, ctx.suite.batch_size)
    scored = [(lls[start : start + len(conts)], conts) for start, conts in spans]
    return _mc_results(examples, scored)


def _mc_results(examples: list[Example], scored: list[tuple[list[float], list[str]]]) -> Scored:
    """acc and acc_norm (log-likelihood over characters of `norm_by`), with per-item details."""
    details, acc, acc_norm = [], 0, 0
    for ex, (ll, norm_by) in zip(examples, scored, strict=True):
        pick, pick_norm = mc_choice_scores(ll, norm_by)
        gold = int(ex.meta["gold_index"])
        acc += pick == gold
        acc_norm += pick_norm == gold
        details.append({"id": ex.id, "gold": gold, "pred": pick, "pred_norm": pick_norm, "ll": ll})
    n = len(examples)
    return Scored({"acc": acc / n, "acc_norm": acc_norm / n}, details, n)


def score_ref_ppl(lm: LanguageModel, spec: EvalTaskSpec, ctx: ScoreContext) -> Scored:
    """``ref_ppl``: the reference answers' pooled NLL over all response tokens and over those
    the base model found easy (its own in a base run, whose mask it returns)."""
    examples = _examples(spec)
    base, suite = ctx.base, ctx.suite
    base_easy = base.easy_tokens.get(spec.name) if base is not None else None
    if base is not None and base_easy is None:
        raise LensError(f"The base result has no easy-token mask for '{spec.name}'.")
    run = score_examples(lm, examples, top_k=1, cache=None, max_batch=max(suite.batch_size, 16))
    total_nll = easy_nll = 0.0
    total_n = easy_n = 0
    seq_ppls, details = [], []
    easy_map: dict[str, list[bool]] = {}
    for rec in run.examples:
        nll = [-lp for lp in rec.logprob]
        own_easy = [x <= math.log(spec.tau) for x in nll]
        easy_map[rec.id] = own_easy
        mask = own_easy if base_easy is None else base_easy.get(rec.id)
        if mask is None or len(mask) != len(nll):
            raise LensError(
                f"'{spec.name}': the base model's easy-token mask does not match example {rec.id}; "
                "re-run the base evaluation with the same model and suite."
            )
        total_nll += sum(nll)
        total_n += len(nll)
        easy = [x for x, m in zip(nll, mask, strict=True) if m]
        easy_nll += sum(easy)
        easy_n += len(easy)
        seq_ppls.append(rec.seq_ppl)
        details.append(
            {
                "id": rec.id,
                "tokens": len(nll),
                "easy_tokens": len(easy),
                "nll_sum": sum(nll),
                "easy_nll_sum": sum(easy),
            }
        )
    mean_nll = total_nll / total_n if total_n else None
    mean_easy = easy_nll / easy_n if easy_n else None
    metrics: dict[str, float | None] = {
        "nll": mean_nll,
        "ppl": math.exp(mean_nll) if mean_nll is not None else None,
        "nll_easy": mean_easy,
        "ppl_easy": math.exp(mean_easy) if mean_easy is not None else None,
        "seq_ppl_mean": sum(seq_ppls) / len(seq_ppls) if seq_ppls else None,
        "easy_share": easy_n / total_n if total_n else None,
    }
    kept = base_easy if base_easy is not None else easy_map
    return Scored(metrics, details, len(examples), easy_tokens=kept)


class TaskUnavailable(LensError):
    """An optional task cannot run here (a missing package, unreachable data): the suite
    records the reason for that task and goes on."""


LM_EVAL_MISSING = "lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')"


def check_lm_eval_tasks(names: Sequence[str]) -> None:
    """A one-line `LensError` unless every name is a task (or group) lm-evaluation-harness
    knows: run before any work, so a typo does not cost a whole suite first. Listing the tasks
    reads lm-eval's task index (seconds), not their data; data that cannot be fetched is still
    found, and skipped, when the task runs."""
    import difflib

    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        return
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LensError(
            f"--lm-eval-task {names[0]}: {LM_EVAL_MISSING}; or leave the flag out."
        ) from None
    known = set(TaskManager().all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LensError(f"Unknown lm-eval task '{name}'{hint}; `lm-eval ls tasks` lists them.")


def _lm_eval_metrics(task_results: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's "metric,filter" entries as metric names ("acc", "exact_match/flexible-extract"),
    standard errors and aliases left out."""
    metrics: dict[str, float | None] = {}
    for key, value in task_results.items():
        name, _, filt = key.partition(",")
        if name.endswith("_stderr") or name == "alias" or isinstance(value, (str, bool)):
            continue
        if not isinstance(value, (int, float)):
            continue
        metrics[name if filt in ("", "none") else f"{name}/{filt}"] = float(value)
    return metrics


def score_lm_eval(lm: LanguageModel, spec: EvalTaskSpec, ctx: ScoreContext) -> Scored:
    """``lm_eval``: one lm-evaluation-harness task on the loaded model (`core.eval.runner`'s
    docstring); `TaskUnavailable` when it cannot run here (the suite records it as skipped)."""
    try:
        import lm_eval  # lazy: heavy (optional; imports torch)
        from lm_eval.models.huggingface import HFLM  # lazy: heavy
    except ImportError:
        raise TaskUnavailable(LM_EVAL_MISSING) from None
    from core.model.loading import require_loaded  # lazy: heavy (torch)

    try:
        hf = require_loaded(lm, "An lm-eval task")
    except LensError as exc:
        raise TaskUnavailable(str(exc)) from None
    try:
        wrapped = HFLM(pretrained=hf.model, tokenizer=hf.tokenizer, batch_size=ctx.suite.batch_size)
        out = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=[spec.task],
            limit=spec.n,
            random_seed=spec.seed,
            numpy_random_seed=spec.seed,
            torch_random_seed=spec.seed,
            log_samples=False,
        )
    except Exception as exc:  # noqa: BLE001 - unknown task, data not reachable: one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise TaskUnavailable(
            f"lm-eval task '{spec.task}' could not run: {type(exc).__name__}: {first}"
        ) from None
    results = (out or {}).get("results", {}).get(spec.task) or (out or {}).get("groups", {}).get(
        spec.task
    )
    if not results:
        raise TaskUnavailable(f"lm-eval returned no results for task '{spec.task}'")
    metrics = _lm_eval_metrics(results)
    if not metrics:
        raise TaskUnavailable(f"lm-eval task '{spec.task}' reported no numeric metric")
    samples = ((out or {}).get("n-samples") or {}).get(spec.task) or {}
    n = int(samples.get("effective") or spec.n or 0)
    primary = spec.metric or next((m for m in LM_EVAL_METRICS if m in metrics), next(iter(metrics)))
    if primary not in metrics:
        raise TaskUnavailable(
            f"lm-eval task '{spec.task}' has no metric '{primary}' "
            f"(it reports {', '.join(metrics)})"
        )
    return Scored(metrics, [], n, primary=primary)


def score_drift(lm: LanguageModel, spec: EvalTaskSpec, ctx: ScoreContext) -> Scored:
    """``drift``: KL from the base model on a probe (`core.eval.drift`); needs a Hugging Face
    model (full-vocabulary logits). A base run (no `ctx.base`) is drift 0."""
    from core.model.loading import require_loaded  # lazy: heavy (torch)

    hf = require_loaded(lm, f"The drift task '{spec.name}'")
    reference = (
        require_loaded(ctx.reference, "Drift's base copy") if ctx.reference is not None else None
    )
    metrics, details, n, notes = drift_task(
        hf, spec, ctx.suite, is_base=ctx.base is None, reference=reference, progress=ctx.items
    )
    return Scored(metrics, details, n, notes=notes)


#: Scorer kind (`core.eval.suites.SCORER_KINDS`) -> its function.
SCORERS: dict[str, Scorer] = {
    CODE_EXEC: score_code_exec,
    NUMERIC_MATCH: score_numeric_match,
    MC_LOGLIK: score_mc_loglik,
    MC_GENERATIVE: score_mc_generative,
    REF_PPL: score_ref_ppl,
    LM_EVAL: score_lm_eval,
    DRIFT: score_drift,
}


def scorer_for(spec: EvalTaskSpec) -> Scorer:
    """The function that scores `spec`'s kind; an unknown kind is a one-line `LensError`."""
    scorer = SCORERS.get(spec.scorer)
    if scorer is None:
        raise LensError(
            f"Unknown scorer '{spec.scorer}' for '{spec.name}' (use {', '.join(SCORERS)})."
        )
    return scorer


@dataclass
class SuiteResult:
    """One model's results on one suite.

    `easy_tokens` holds, per reference-perplexity task and example id, which response tokens the
    model found easy (ppl <= tau); for a base run these define the "easy" set later runs use.
    """

    suite: str
    settings_fingerprint: str
    model: str
    adapter: str | None
    tasks: list[TaskResult]
    seconds: float
    created: float = field(default_factory=time.time)
    easy_tokens: dict[str, dict[str, list[bool]]] = field(default_factory=dict)

    def task(self, name: str) -> TaskResult | None:
        """The result of the spec called `name`."""
        return next((t for t in self.tasks if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SuiteResult:
        """Inverse of `to_dict`."""
        values = dict(data)
        values["tasks"] = [TaskResult(**t) for t in data["tasks"]]
        return cls(**values)

    def records(self, step: int, when: float | None = None) -> list[dict[str, Any]]:
        """metrics.jsonl "eval" records: one per task and metric, the task's primary metric
        (the one TI / BWT use) first, so readers that take a task's first metric take it."""
        when = time.time() if when is None else when
        rows = []
        for t in self.tasks:
            order = sorted(t.metrics, key=lambda m: m != t.primary)
            for metric, value in ((m, t.metrics[m]) for m in order):
                record = EvalRecord(
                    step=step,
                    time=when,
                    task=t.name,
                    metric=metric,
                    value=value,
                    n=t.n,
                    role=t.role,
                )
                rows.append(record.to_dict())
        return rows


def item_scores(task: TaskResult, metric: str) -> dict[str, tuple[float, float]] | None:
    """Per item id, the (numerator, denominator) of `metric` on this task, so a paired interval
    can resample items: accuracies are (correct, 1); pooled NLLs are (summed NLL, tokens).
    None when the details do not carry it (an lm-eval task, or results from before per-item
    sums were kept)."""
    if not task.details:
        return None
    if task.scorer == DRIFT:
        return drift_item_scores(task.details, metric)
    out: dict[str, tuple[float, float]] = {}
    for d in task.details:
        if "id" not in d:
            return None
        if metric == "acc" and "pred" in d:
            value = (float(d["pred"] == d["gold"]), 1.0)
        elif metric == "acc_norm" and "pred_norm" in d:
            value = (float(d["pred_norm"] == d["gold"]), 1.0)
        elif metric == "pass@1" and "passed" in d:
            value = (float(bool(d["passed"])), 1.0)
        elif metric in ("exact_match", "acc") and "correct" in d:
            value = (float(bool(d["correct"])), 1.0)
        elif metric == "nll" and "nll_sum" in d:
            value = (float(d["nll_sum"]), float(d["tokens"]))
        elif metric == "nll_easy" and "easy_nll_sum" in d:
            value = (float(d["easy_nll_sum"]), float(d["easy_tokens"]))
        else:
            return None
        out[str(d["id"])] = value
    return out


def chance_items(task: TaskResult) -> dict[str, float] | None:
    """Per item id, the accuracy a uniform random guess gets (1 / number of choices), for
    multiple-choice tasks; None for other tasks (or details without the choice count)."""
    out: dict[str, float] = {}
    for d in task.details:
        choices = len(d["ll"]) if "ll" in d else d.get("n_choices")
        if "id" not in d or not choices:
            return None
        out[str(d["id"])] = 1.0 / float(choices)
    return out or None
