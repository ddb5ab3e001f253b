"""What is evaluated, as data: task specs (a built-in task, a scorer kind, a seeded subset) and suites."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from core.data.tasks import get_task
from core.errors import LensError
from core.eval.probes import FILE_PREFIX, PROBE_OOD, PROBE_TEXT, load_probe
from core.eval.sandbox import SandboxLimits
from core.masking import DEFAULT_TAU

CODE_EXEC, NUMERIC_MATCH, MC_LOGLIK, MC_GENERATIVE, REF_PPL, LM_EVAL, DRIFT = (
    "code_exec",
    "numeric_match",
    "mc_loglik",
    "mc_generative",
    "ref_ppl",
    "lm_eval",
    "drift",
)
SCORER_KINDS = (CODE_EXEC, NUMERIC_MATCH, MC_LOGLIK, MC_GENERATIVE, REF_PPL, LM_EVAL, DRIFT)
PRIMARY_METRIC = {
    CODE_EXEC: "pass@1",
    NUMERIC_MATCH: "exact_match",
    MC_LOGLIK: "acc",
    MC_GENERATIVE: "acc",
    # the full-token NLL: the easy-token NLL ("nll_easy") is what STM lowers by construction,
    # so it is kept as a labelled diagnostic, never a task's score
    REF_PPL: "nll",
    LM_EVAL: "",  # the first of LM_EVAL_METRICS the task reports, unless the spec names one
    # drift from the base model (core.eval.drift): the mean token KL(base || tuned), 0 for the
    # base itself; lower is less drift
    DRIFT: "kl",
}
# lm-evaluation-harness metrics, in the order one is picked as a task's primary metric.
LM_EVAL_METRICS = ("acc", "exact_match", "pass@1", "acc_norm", "f1", "mc2", "em", "bleu")
TARGET, OOD = "target", "ood"
#: Multiple-choice formats of ``mc_loglik``: ``plain`` is lm-evaluation-harness's convention (plain
#: text, no chat template, context "Question: ...\\nAnswer:" and continuation " {choice}";
#: MMLU: lettered choices and " A".. " D"); ``text`` (also called ``chat``) scores each choice
#: text as the assistant's reply under the chat template; ``letter`` scores "Answer: A".. the
#: same way (the paper's lettered prompt).
MC_FORMATS = ("plain", "text", "chat", "letter")

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
    chooses the requests of ``mc_loglik`` (see `MC_FORMATS`). `tau` is the easy-token
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
        if self.mc_format not in MC_FORMATS:
            raise LensError(
                f"'{self.name}': unknown multiple-choice format '{self.mc_format}' "
                f"(use {', '.join(MC_FORMATS)})."
            )

    @property
    def primary_metric(self) -> str:
        """The metric TI / BWT use ("" for an lm-eval task that names none: decided by what
        the task reports)."""
        return self.metric or PRIMARY_METRIC[self.scorer]

    @property
    def is_accuracy(self) -> bool:
        """Higher is better and it enters TI / BWT (every scorer but reference perplexity and
        drift)."""
        return self.scorer not in (REF_PPL, DRIFT)


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
        n = next((s.n for s in self.target if s.scorer != DRIFT), 20)
        target = _target_specs(task, n=n)
        if not generative:
            target = tuple(s for s in target if s.scorer in (MC_LOGLIK, REF_PPL))
        split = "test" if task == "mbpp" else None
        target += tuple(
            replace(s, task=task, split=split) for s in self.target if s.scorer == DRIFT
        )
        ood = tuple(s for s in self.ood if s.task != task)
        return replace(self, name=f"{self.name}:{task}", target=target, ood=ood)


#: Tokens of the base model's answer that drift is measured on (per probe prompt).
DRIFT_TOKENS = 64


def drift_specs(
    target_task: str | None, *, target_n: int, ood_n: int, text_n: int, tokens: int = DRIFT_TOKENS
) -> tuple[tuple[EvalTaskSpec, ...], tuple[EvalTaskSpec, ...]]:
    """(target, ood) drift specs: the training task's held-out prompts (none when `target_task`
    is None or `target_n` 0), the mixed OOD probe and the general-text probe (each left out at
    n 0). See `core.eval.probes`."""

    target = ()
    if target_task and target_n:
        split = "test" if target_task == "mbpp" else None
        target = (
            EvalTaskSpec(
                "target_drift", target_task, DRIFT, n=target_n, split=split, max_new_tokens=tokens
            ),
        )
    ood = []
    if ood_n:
        ood.append(EvalTaskSpec("ood_drift", PROBE_OOD, DRIFT, n=ood_n, max_new_tokens=tokens))
    if text_n:
        ood.append(EvalTaskSpec("text_drift", PROBE_TEXT, DRIFT, n=text_n, max_new_tokens=tokens))
    return target, tuple(ood)


def _target_specs(task: str, n: int | None, ppl_n: int | None = None) -> tuple[EvalTaskSpec, ...]:
    """Accuracy spec + reference-perplexity spec for a target task."""
    accuracy = {
        "mbpp": EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=n, split="test", max_new_tokens=384),
        "humaneval": EvalTaskSpec("humaneval", "humaneval", CODE_EXEC, n=n, max_new_tokens=384),
        "gsm8k": EvalTaskSpec(
            "gsm8k", "gsm8k", NUMERIC_MATCH, n=n, instruction=GSM8K_INSTRUCTION, max_new_tokens=320
        ),
        "arc_challenge": EvalTaskSpec(
            "arc_challenge", "arc_challenge", MC_LOGLIK, n=n, mc_format="plain"
        ),
        "arc_easy": EvalTaskSpec("arc_easy", "arc_easy", MC_LOGLIK, n=n, mc_format="plain"),
        "mmlu": EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=n, mc_format="plain"),
    }

    get_task(task)  # an unknown task fails here with the list of known ones
    split = "test" if task == "mbpp" else None
    ppl = EvalTaskSpec(f"{task}_ppl", task, REF_PPL, n=ppl_n or n, split=split)
    # Tasks without an accuracy recipe here (e.g. MATH) are tracked by reference perplexity.
    return (accuracy[task], ppl) if task in accuracy else (ppl,)


def _suite_default() -> EvalSuite:
    """CPU-sized: small seeded subsets (one generation batch per generative task); its run time
    with the embedded model is in docs/BENCHMARKS.md."""
    drift_target, drift_ood = drift_specs("mbpp", target_n=24, ood_n=200, text_n=100)
    return EvalSuite(
        name="default",
        description=(
            "Target MBPP (held-out split) pass@1 and reference perplexity; OOD GSM8K, "
            "ARC-Challenge, ARC-Easy, MMLU and reference perplexity on each; drift from the base "
            "model on 24 held-out MBPP prompts, 200 mixed OOD prompts and 100 LAMBADA passages; "
            "small seeded subsets sized for a CPU."
        ),
        target=(
            EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=8, split="test", max_new_tokens=256),
            EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=24, split="test"),
            *drift_target,
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
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=30, mc_format="plain"),
            EvalTaskSpec("arc_easy", "arc_easy", MC_LOGLIK, n=30, mc_format="plain"),
            EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=30, mc_format="plain"),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=24),
            EvalTaskSpec("arc_challenge_ppl", "arc_challenge", REF_PPL, n=30),
            EvalTaskSpec("arc_easy_ppl", "arc_easy", REF_PPL, n=30),
            EvalTaskSpec("mmlu_ppl", "mmlu", REF_PPL, n=30),
            *drift_ood,
        ),
    )


def _suite_during() -> EvalSuite:
    """What the training callback runs every N steps: forward passes only (no generation), so a
    round costs a few training steps (docs/BENCHMARKS.md); generation-based scores come from
    `python -m core eval`. Small on purpose: its accuracy detects only large changes (the Runs
    page draws its paired intervals), its reference NLLs carry the finer signal."""
    drift_target, drift_ood = drift_specs("mbpp", target_n=12, ood_n=40, text_n=0)
    return EvalSuite(
        name="during",
        description=(
            "For evaluation during training: target MBPP (held-out) reference NLL; OOD "
            "ARC-Easy validation accuracy (lm-eval format) and reference NLL on GSM8K and "
            "MMLU; drift from the base model on 12 held-out MBPP prompts and 40 mixed OOD "
            "prompts; forward passes only (the base's probe answers are generated once and "
            "cached), small subsets (wide intervals)."
        ),
        target=(EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=8, split="test"), *drift_target),
        ood=(
            EvalTaskSpec(
                "arc_easy", "arc_easy", MC_LOGLIK, n=24, split="validation", mc_format="plain"
            ),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=8),
            EvalTaskSpec("mmlu_ppl", "mmlu", REF_PPL, n=12),
            *drift_ood,
        ),
    )


#: Items of the protocol suite's target reference-NLL task (one forward pass each).
PROTOCOL_PPL_N = 30


def _suite_protocol() -> EvalSuite:
    """What each arm of `python -m core protocol` (cpu preset) evaluates at step 0 and at the
    end: forward passes only, sized for 3 seeds of 4 arms on 2 cores (56 minutes measured from
    empty caches; docs/BENCHMARKS.md, "Paper protocol"). ARC-Easy is the one multiple-choice task the
    embedded model scores above chance, so it is scored on its whole validation split (570
    questions, lm-eval's format) as the benchmark view. Forgetting is read from drift from the
    base model: 100 mixed OOD prompts (ARC-Easy, GSM8K, MMLU, TriviaQA), 40 LAMBADA passages and
    24 held-out MBPP prompts. The OOD reference-NLL tasks of earlier versions are gone: on this
    model they measured answer format, not knowledge (docs/cpu_forgetting.json), and cost
    about 60 s a round."""
    drift_target, drift_ood = drift_specs("mbpp", target_n=24, ood_n=100, text_n=40)
    return EvalSuite(
        name="protocol",
        description=(
            "For the paper protocol on a CPU: target MBPP (held-out, 30) full-token reference "
            "NLL; OOD ARC-Easy validation accuracy (all 570, lm-eval's format); drift from the "
            "base model on 24 held-out MBPP prompts, 100 mixed OOD prompts and 40 LAMBADA "
            "passages; forward passes only."
        ),
        target=(
            EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=PROTOCOL_PPL_N, split="test"),
            *drift_target,
        ),
        ood=(
            EvalTaskSpec(
                "arc_easy", "arc_easy", MC_LOGLIK, n=None, split="validation", mc_format="plain"
            ),
            *drift_ood,
        ),
    )


def _suite_paper() -> EvalSuite:
    """The paper's tasks at full size (hours on a CPU; meant for a GPU)."""
    drift_target, drift_ood = drift_specs("mbpp", target_n=100, ood_n=300, text_n=300)
    return EvalSuite(
        name="paper",
        description=(
            "Full sizes: MBPP held-out (100) pass@1, HumanEval (164) pass@1, GSM8K (1319), "
            "ARC-Challenge generative (1172) and log-likelihood, ARC-Easy, MMLU (14042), and "
            "reference perplexity on 200 examples of each; drift from the base model on the "
            "100 held-out MBPP prompts, all 300 OOD probe prompts and 300 LAMBADA passages."
        ),
        target=(
            EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=None, split="test", max_new_tokens=512),
            EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=None, split="test"),
            *drift_target,
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
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=None, mc_format="plain"),
            EvalTaskSpec("arc_easy", "arc_easy", MC_LOGLIK, n=None, mc_format="plain"),
            EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=None, mc_format="plain"),
            EvalTaskSpec("humaneval", "humaneval", CODE_EXEC, n=None, max_new_tokens=512),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=200),
            EvalTaskSpec("arc_challenge_ppl", "arc_challenge", REF_PPL, n=200),
            EvalTaskSpec("mmlu_ppl", "mmlu", REF_PPL, n=200),
            *drift_ood,
        ),
    )


def _suite_tiny() -> EvalSuite:
    """Every scorer kind on 2-3 examples with short generations: for tests and smoke checks."""
    drift_target, drift_ood = drift_specs("mbpp", target_n=2, ood_n=3, text_n=2, tokens=8)
    return EvalSuite(
        name="tiny",
        description="Every scorer kind on a few examples with short generations (tests).",
        target=(
            EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=2, split="test", max_new_tokens=8),
            EvalTaskSpec("mbpp_ppl", "mbpp", REF_PPL, n=2, split="test"),
            *drift_target,
        ),
        ood=(
            EvalTaskSpec("gsm8k", "gsm8k", NUMERIC_MATCH, n=2, max_new_tokens=8),
            EvalTaskSpec("arc_challenge", "arc_challenge", MC_LOGLIK, n=3),
            EvalTaskSpec("mmlu", "mmlu", MC_LOGLIK, n=3, mc_format="letter"),
            EvalTaskSpec("arc_easy_gen", "arc_easy", MC_GENERATIVE, n=2, max_new_tokens=6),
            EvalTaskSpec("gsm8k_ppl", "gsm8k", REF_PPL, n=2),
            *drift_ood,
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


def suite_from_config(value: Any, target_task: str | None = None) -> EvalSuite:
    """The suite named by a training config's `eval_suite`: None (the "during" suite), a suite
    name, a one-item list with a suite name, or {"suite": name, "limit": n}. When the run trains
    on another built-in task than the suite's target, the target becomes that task."""
    shape = (
        f'eval_suite must be a suite name ({", ".join(SUITES)}) or {{"suite": NAME, "limit": N}}'
    )
    limit = None
    if value is None:
        name = "during"
    elif isinstance(value, str):
        name = value
    elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        name = value[0]
    elif isinstance(value, dict) and isinstance(value.get("suite", "during"), str):
        unknown = sorted(set(value) - {"suite", "limit"})
        if unknown:
            raise LensError(f"{shape}; got the key {unknown[0]!r}.")
        name, limit = value.get("suite", "during"), value.get("limit")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise LensError(f"eval_suite's limit must be a whole number >= 1, got {limit!r}.")
    else:
        raise LensError(f"{shape}, got {json.dumps(value, default=str)}.")
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


# --------------------------------------------------------------------------------------------
# Standalone evaluation (the CLI's `eval`, and a job's body)
# --------------------------------------------------------------------------------------------


def build_suite(
    suite: EvalSuite | str,
    *,
    limit: int | None = None,
    lm_eval_tasks: Sequence[str] = (),
    probes: Sequence[str] = (),
) -> EvalSuite:
    """A suite by name (or as given), plus lm-eval tasks (20 documents each) and drift on the
    user's probe files (checked here, before any work), capped at `limit` examples per task."""

    chosen = get_suite(suite) if isinstance(suite, str) else suite
    names = [n.strip() for n in lm_eval_tasks if n.strip()]
    if names:
        chosen = chosen.with_lm_eval_tasks(names)
    extra = []
    for path in probes:
        task = f"{FILE_PREFIX}{path}"
        load_probe(task)  # a file with no usable prompt fails now, with one line
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        extra.append(
            EvalTaskSpec(f"drift:{stem}", task, DRIFT, n=None, max_new_tokens=DRIFT_TOKENS)
        )
    if extra:
        chosen = replace(chosen, name=f"{chosen.name}+probes", ood=(*chosen.ood, *extra))
    return chosen.limited(limit) if limit is not None else chosen


#: How each kind of built-in task is scored when evaluated by name.
TASK_SCORERS = {
    "multiple_choice": MC_LOGLIK,
    "code_exec": CODE_EXEC,
    "numeric_match": NUMERIC_MATCH,
}


def parse_task_name(text: str) -> tuple[str, str]:
    """ "task" or "task:split" -> (task, split), checked against the catalogue (a one-line
    `LensError` names what exists)."""

    name, _, split = text.strip().partition(":")
    spec = get_task(name)
    split = split or spec.default_split
    if split not in spec.splits:
        raise LensError(
            f"Task '{name}' has no split '{split}'. Available splits: {', '.join(spec.splits)}."
        )
    return name, split


def tasks_suite(
    names: Sequence[str], *, limit: int | None = None, mc_format: str | None = None
) -> EvalSuite:
    """A suite of named built-in tasks ("arc_easy:validation", "mmlu"): each on a seeded
    subset of `limit` items (the whole split when None), multiple-choice tasks in their own
    default format unless `mc_format` names one. All count as out-of-domain tasks."""

    if not names:
        raise LensError("Name at least one task, e.g. --tasks arc_easy:validation,mmlu.")
    if limit is not None and limit < 1:
        raise LensError("--limit must be at least 1.")
    specs = []
    for text in names:
        task, split = parse_task_name(text)
        info = get_task(task)
        scorer = TASK_SCORERS.get(info.scorer)
        if scorer is None:
            raise LensError(
                f"Task '{task}' cannot be evaluated by name yet (no {info.scorer} scorer)."
            )
        extra: dict[str, Any] = {}
        if scorer == MC_LOGLIK:
            extra["mc_format"] = mc_format or info.mc_format or "text"
        elif mc_format:
            raise LensError(f"Task '{task}' is not multiple choice: --mc-format does not apply.")
        if scorer == NUMERIC_MATCH:
            extra.update(instruction=GSM8K_INSTRUCTION, max_new_tokens=320)
        name = task if split == info.default_split else f"{task}:{split}"
        specs.append(EvalTaskSpec(name, task, scorer, n=limit, split=split, **extra))
    label = ",".join(s.name for s in specs)
    return EvalSuite(f"tasks:{label}", f"Built-in tasks by name: {label}.", (), tuple(specs))
