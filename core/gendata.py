"""Generated training data: Self-Output and Rephrase sets, made by a background job.

Self-Output (METHOD.md): for each training prompt the model samples N responses; every sample is
checked by the task's verifier (MBPP / HumanEval: the asserts run in `core.sandbox`; GSM8K: the
final number; MATH: the last \\boxed{} answer); among the correct ones the label is picked by
sequence perplexity (lowest by default, or random / highest) under the scoring model, in either
perplexity convention. Prompts with no correct sample are dropped and counted.

Rephrase: the model is shown the instruction AND the ground-truth answer through an editable
template and writes its own answer; the same verifier filters it; the kept answer is paired with
the ORIGINAL instruction.

Teacher (distillation): `teacher` names another model that generates; the scoring model (the
student, `model`) still ranks the candidates.

Resume: every finished prompt is appended as one line to `<run_dir>/candidates.jsonl` (all its
samples, their verdicts and perplexities, the chosen one). A restarted run skips the prompts found
there, so a cancelled or killed job loses at most the batch that was in flight. The samples of a
half-finished batch are drawn afresh on restart (the sampling seed is per batch).

The result is written with `core.generated.write_generated_set` under a versioned name
(`<base>-v<N>`, N one more than the newest existing version), with provenance in the manifest:
models, settings, seed, acceptance rate, prompts kept and dropped, tokens and wall time.

No Streamlit imports here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shlex
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.data import Example
from core.errors import LensError
from core.training import cli_flag, parse_optional

KINDS = ("self_output", "rephrase")
SELECTIONS = ("lowest", "random", "highest")
CONVENTIONS = ("response_only", "prompt")
VERIFIERS = ("auto", "code", "number", "boxed", "none")
CANDIDATES_JSONL = "candidates.jsonl"
STATE_JSON = "gendata.json"

DEFAULT_REPHRASE_TEMPLATE = (
    "{instruction}\n\n"
    "Here is a reference answer:\n\n{reference}\n\n"
    "Write your own complete answer to the task above. Use the reference as a guide, "
    "but answer in your own words and style."
)
MATH_HINT = "\n\nPut the final answer in \\boxed{}."

ProgressFn = Callable[[int, int], None]
StatusFn = Callable[[str], None]


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class GenDataConfig:
    """Everything one data-generation run needs; defaults are the ``paper`` preset.

    Build one with `GenDataConfig.from_preset("cpu-quick", task="gsm8k")`; `to_dict` /
    `from_dict` round-trip it through a job's `config.json`.
    """

    preset: str = field(default="paper", metadata=_help("preset the defaults come from"))
    kind: str = field(default="self_output", metadata=_help("self_output or rephrase"))
    # models
    model: str = field(
        default="default",
        metadata=_help("scoring model (the student): 'default', a Hugging Face id or a folder"),
    )
    teacher: str | None = field(
        default=None, metadata=_help("another model that generates (distillation); none = model")
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=_help("auto, float32, bfloat16, float16"))
    # data
    task: str | None = field(default="mbpp", metadata=_help("built-in task to generate for"))
    split: str | None = field(
        default=None, metadata=_help("task split (default: the task's first, mbpp: train)")
    )
    data: str | None = field(
        default=None, metadata=_help("instead of a task: a JSONL/CSV file of prompt/response")
    )
    prompt_col: str = field(default="prompt", metadata=_help("prompt column of a data file"))
    response_col: str = field(default="response", metadata=_help("response column of a data file"))
    id_col: str | None = field(default=None, metadata=_help("id column of a data file"))
    limit: int | None = field(default=None, metadata=_help("first N prompts only"))
    # sampling
    n_samples: int = field(default=32, metadata=_help("samples per prompt (Self-Output)"))
    temperature: float = field(default=0.7, metadata=_help("sampling temperature"))
    top_p: float = field(default=0.95, metadata=_help("nucleus sampling top-p"))
    max_new_tokens: int = field(default=512, metadata=_help("longest sample, in tokens"))
    prompt_batch: int = field(
        default=1, metadata=_help("prompts per generate call (each with all its samples)")
    )
    seed: int = field(default=0, metadata=_help("sampling and random-selection seed"))
    hint: str = field(
        default="auto",
        metadata=_help(
            "text appended to the prompt when generating (not stored): auto = the task's answer "
            "format (GSM8K '#### N', MATH \\boxed{}), none, or your own text"
        ),
    )
    template: str = field(
        default=DEFAULT_REPHRASE_TEMPLATE,
        metadata=_help("Rephrase prompt; must contain {instruction} and {reference}"),
    )
    # filter and selection
    verify: str = field(
        default="auto",
        metadata=_help("auto (the task's verifier), code, number, boxed or none (keep all)"),
    )
    selection: str = field(default="lowest", metadata=_help("lowest, random or highest ppl"))
    convention: str = field(
        default="response_only", metadata=_help("perplexity for ranking: response_only or prompt")
    )
    workers: int = field(default=2, metadata=_help("sandbox processes checking code at once"))
    threads: int | None = field(
        default=None,
        metadata=_help(
            "torch CPU threads for the job (none = $PLENS_THREADS, else torch's default); "
            "1 is often fastest on a busy shared machine"
        ),
    )
    # output
    name: str | None = field(
        default=None, metadata=_help("set name (default: <kind>-<data>-<model>-v<N>)")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `LensError` (one line) on any inconsistent setting."""
        if self.preset not in PRESETS:
            raise LensError(f"Unknown preset '{self.preset}' (use {', '.join(PRESETS)}).")
        checks = [
            (self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got '{self.kind}'."),
            (
                self.selection in SELECTIONS,
                f"selection must be one of {', '.join(SELECTIONS)}, got '{self.selection}'.",
            ),
            (
                self.convention in CONVENTIONS,
                f"convention must be one of {', '.join(CONVENTIONS)}, got '{self.convention}'.",
            ),
            (self.verify in VERIFIERS, f"verify must be one of {', '.join(VERIFIERS)}."),
            (bool(self.task) != bool(self.data), "Give exactly one of task or data."),
            (self.n_samples >= 1, "n_samples must be at least 1."),
            (self.temperature > 0, "temperature must be above 0 (sampling)."),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]."),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1."),
            (self.prompt_batch >= 1, "prompt_batch must be at least 1."),
            (self.workers >= 1, "workers must be at least 1."),
            (self.threads is None or self.threads >= 1, "threads must be at least 1."),
            (self.limit is None or self.limit >= 1, "limit must be at least 1."),
        ]
        for ok, message in checks:
            if not ok:
                raise LensError(message)
        if self.kind == "rephrase":
            missing = [p for p in ("{instruction}", "{reference}") if p not in self.template]
            if missing:
                raise LensError(f"The Rephrase template must contain {' and '.join(missing)}.")
        if self.name is not None and (not self.name or "/" in self.name or self.name[0] == "."):
            raise LensError(f"Invalid set name {self.name!r}.")

    @property
    def samples_per_prompt(self) -> int:
        """N for Self-Output; Rephrase writes one answer per prompt (METHOD.md)."""
        return self.n_samples if self.kind == "self_output" else 1

    @classmethod
    def from_preset(cls, preset: str = "paper", /, **overrides: Any) -> GenDataConfig:
        """The preset's values, then `overrides` (which may include the set's `name`)."""
        if preset not in PRESETS:
            raise LensError(f"Unknown preset '{preset}' (use {', '.join(PRESETS)}).")
        return cls(**{**PRESETS[preset], "preset": preset, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenDataConfig:
        """From a `config.json` dict: the named preset first, then the given keys."""
        if not isinstance(data, dict):
            raise LensError("A generation config must be a JSON object.")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise LensError(f"Unknown generation setting(s): {', '.join(unknown)}.")
        values = dict(data)
        return cls.from_preset(values.pop("preset", "paper"), **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what a job's config.json holds)."""
        return asdict(self)

    def data_label(self) -> str:
        """Short name of the data: "mbpp-train" or the file's stem."""
        if self.task:
            from core.tasks import get_task

            return f"{self.task}-{self.split or get_task(self.task).default_split}"
        return Path(str(self.data)).stem

    def describe(self) -> str:
        """One line for job lists."""
        who = self.teacher and f"{self.teacher} → {self.model}" or self.model
        n = f"N={self.n_samples} · " if self.kind == "self_output" else ""
        limit = f" (first {self.limit})" if self.limit else ""
        return f"{self.kind} · {n}{self.data_label()}{limit} · {who}"


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's settings (METHOD.md): 32 samples, T 0.7, top-p 0.95, up to 512 new tokens.
    "paper": {},
    # Sized for 2 CPU cores and the embedded 135M model: a few minutes end to end
    # (docs/BENCHMARKS.md, "Data generation").
    "cpu-quick": {
        "limit": 8,
        "n_samples": 4,
        "max_new_tokens": 192,
        "prompt_batch": 2,
    },
}


# --------------------------------------------------------------------------- CLI flags


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config`, `--preset` and one flag per `GenDataConfig` field (all unset by default)."""
    parser.add_argument("--config", help="generation config JSON (e.g. a job's config.json)")
    hints = typing.get_type_hints(GenDataConfig)
    for f in fields(GenDataConfig):
        if f.name == "preset":
            parser.add_argument("--preset", default=None, choices=list(PRESETS), help=_HELP_PRESET)
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": f.metadata.get("help")}
        choices = {
            "kind": KINDS,
            "selection": SELECTIONS,
            "convention": CONVENTIONS,
            "verify": VERIFIERS,
        }
        if f.name in choices:
            kwargs["choices"] = list(choices[f.name])
        else:
            kwargs["type"] = parse_optional(base) if args else base
            kwargs["metavar"] = base.__name__.upper()
        parser.add_argument(cli_flag(f.name), **kwargs)


_HELP_PRESET = "paper (N=32, T=0.7, top-p 0.95, 512 tokens) or cpu-quick (8 prompts, N=4)"


def config_from_args(args: argparse.Namespace) -> GenDataConfig:
    """`--config` file (if any), then `--preset`, then every flag given on the command line."""
    base: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config).expanduser()
        try:
            base = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise LensError(f"Cannot read config {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise LensError(f"{path} is not valid JSON ({exc}).") from None
        GenDataConfig.from_dict(base)  # unknown keys fail here, with the file's name known
    given = {
        f.name: getattr(args, f.name)
        for f in fields(GenDataConfig)
        if f.name != "preset" and getattr(args, f.name, None) is not None
    }
    if "data" in given and "task" not in given:
        given["task"] = None
    if "task" in given and "data" not in given:
        given["data"] = None
    preset = args.preset or base.pop("preset", "paper")
    base.pop("preset", None)
    return GenDataConfig.from_preset(preset, **{**base, **given})


def cli_command(config: GenDataConfig, *, submit: bool = False) -> str:
    """The exact `python -m core generate ...` command that runs `config` (non-preset values)."""
    defaults = GenDataConfig.from_preset(config.preset).to_dict()
    parts = ["python", "-m", "core", "generate", "--preset", config.preset]
    for f in fields(GenDataConfig):
        value = getattr(config, f.name)
        explicit = f.name in ("task", "split") and config.task or f.name == "data"
        if f.name == "preset" or (value == defaults[f.name] and not explicit):
            continue
        if f.name in ("task", "split") and value is None:
            continue  # implied by --data, or the task's default split
        if f.name == "data" and value is None:
            continue
        parts += [cli_flag(f.name), "none" if value is None else str(value)]
    if submit:
        parts.append("--submit")
    return shlex.join(parts)


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Verdict:
    """Whether one candidate answer is correct, and why not."""

    correct: bool
    detail: str = ""


def _normalise_math(answer: str) -> str:
    """Loose LaTeX normalisation for comparing \\boxed{} answers (spacing, \\left, dfrac...)."""
    text = answer.strip().strip("$")
    for old, new in (("\\!", ""), ("\\,", ""), ("\\left", ""), ("\\right", ""), ("dfrac", "frac")):
        text = text.replace(old, new)
    text = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text).rstrip(".")


def resolve_verifier(verify: str, example: Example, task: str | None) -> str:
    """The verifier an example gets: `verify`, or for "auto" the one its task's data supports."""
    if verify != "auto":
        return verify
    meta = example.meta
    if "test_list" in meta or ("test" in meta and "prompt_code" in meta):
        return "code"
    if task == "math":
        return "boxed"
    if task == "gsm8k" or "gold" in meta:
        return "number"
    raise LensError(
        f"No verifier for {task or 'this data file'}: its examples carry no tests or gold answer. "
        "Choose verify 'number' (final number must match the reference's), 'boxed' or 'none'."
    )


def check_answers(
    example: Example,
    answers: Sequence[str],
    verifier: str,
    *,
    workers: int = 2,
    limits: Any = None,
) -> list[Verdict]:
    """Check candidate answers to one example with `verifier` (code runs in the sandbox).

    code: the program from each answer (`extract_code`) plus the task's asserts, run in
    `core.sandbox` (identical programs run once); number: the answer's final number equals the
    gold one (`meta["gold"]`, else the reference's final number); boxed: the last \\boxed{} matches
    the gold answer; none: every answer counts as correct.
    """
    from core.evaluation import (
        extract_code,
        extract_number,
        humaneval_program,
        mbpp_program,
        numbers_match,
    )

    if verifier == "none":
        return [Verdict(True, "not verified") for _ in answers]
    meta = example.meta
    if verifier == "code":
        from core.sandbox import run_programs

        programs = []
        for answer in answers:
            code = extract_code(answer, meta.get("entry_point"))
            if "test_list" in meta:
                programs.append(mbpp_program(code, meta))
            elif "test" in meta and "prompt_code" in meta:
                programs.append(humaneval_program(code, meta))
            else:
                raise LensError(f"Example {example.id} has no tests to run the code against.")
        unique = list(dict.fromkeys(programs))
        results = dict(zip(unique, run_programs(unique, limits, workers=workers), strict=True))
        return [Verdict(results[p].passed, results[p].detail) for p in programs]
    if verifier == "number":
        gold = meta.get("gold")
        gold = str(gold) if gold is not None else extract_number(example.response)
        if gold is None:
            raise LensError(f"Example {example.id} has no number in its reference answer.")
        verdicts = []
        for answer in answers:
            found = extract_number(answer)
            ok = numbers_match(found, gold)
            verdicts.append(Verdict(ok, "" if ok else f"answered {found}, expected {gold}"))
        return verdicts
    if verifier == "boxed":
        from core.tasks import last_boxed

        gold = meta.get("gold") or last_boxed(example.response)
        if gold is None:
            raise LensError(f"Example {example.id} has no \\boxed{{}} answer in its reference.")
        verdicts = []
        for answer in answers:
            found = last_boxed(answer)
            ok = found is not None and (
                _normalise_math(found) == _normalise_math(gold) or numbers_match(found, gold)
            )
            verdicts.append(Verdict(ok, "" if ok else f"answered {found}, expected {gold}"))
        return verdicts
    raise LensError(f"Unknown verifier '{verifier}' (use {', '.join(VERIFIERS)}).")


# --------------------------------------------------------------------------- selection


def select_candidate(
    ppls: Sequence[float | None], correct: Sequence[bool], rule: str, rng: random.Random
) -> int | None:
    """Index of the label among the candidates: the correct one with the lowest (or highest)
    sequence perplexity, or a random correct one; None when no candidate is correct."""
    pool = [i for i, ok in enumerate(correct) if ok]
    if not pool:
        return None
    if rule == "random":
        return rng.choice(pool)
    if rule not in ("lowest", "highest"):
        raise LensError(f"selection must be one of {', '.join(SELECTIONS)}, got '{rule}'.")
    scored = [i for i in pool if ppls[i] is not None]
    if not scored:
        return pool[0]
    sign = 1.0 if rule == "lowest" else -1.0
    return min(scored, key=lambda i: (sign * float(ppls[i]), i))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the run


@dataclass
class GenerationSummary:
    """What a generation run produced (also the provenance written to the manifest)."""

    n_prompts: int = 0
    n_done: int = 0
    n_kept: int = 0
    n_dropped: int = 0
    n_samples: int = 0
    n_correct: int = 0
    n_tokens: int = 0
    n_unfinished: int = 0
    generation_seconds: float = 0.0
    wall_seconds: float = 0.0
    dropped_ids: list[str] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        """Share of samples that passed the verifier."""
        return self.n_correct / self.n_samples if self.n_samples else None

    @property
    def kept_rate(self) -> float | None:
        """Share of prompts with at least one correct sample (kept in the set)."""
        return self.n_kept / self.n_done if self.n_done else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, rates included."""
        data = asdict(self)
        data["acceptance_rate"] = self.acceptance_rate
        data["kept_rate"] = self.kept_rate
        data["tokens_per_second"] = (
            self.n_tokens / self.generation_seconds if self.generation_seconds else None
        )
        return data

    def describe(self) -> str:
        """One line for logs and the CLI."""
        rate = self.acceptance_rate
        return (
            f"{self.n_kept} of {self.n_done} prompts kept ({self.n_dropped} dropped: no correct "
            f"sample); {self.n_correct}/{self.n_samples} samples correct"
            + (f" ({100 * rate:.1f}%)" if rate is not None else "")
            + f"; {self.n_tokens} tokens in {self.generation_seconds:.0f}s of generation"
        )


def prompt_hash(text: str) -> str:
    """Short content hash of a prompt (a resumed run only reuses records of the same prompt)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_source_examples(config: GenDataConfig) -> list[Example]:
    """The prompts (with their ground truth and meta) the run generates for."""
    from core.sources import load_source

    dataset = load_source(
        task=config.task,
        split=config.split,
        data=config.data,
        prompt_col=config.prompt_col,
        response_col=config.response_col,
        id_col=config.id_col,
        limit=config.limit,
    )
    if not dataset.examples:
        raise LensError("The data has no examples to generate for.")
    return dataset.examples


def preflight(config: GenDataConfig) -> int:
    """Check the data loads and every example has a verifier, before any model is loaded or a
    job is queued (raises `LensError` with one line). Returns the number of prompts."""
    examples = load_source_examples(config)
    for ex in examples:
        resolve_verifier(config.verify, ex, config.task)
    return len(examples)


def generation_prompt(config: GenDataConfig, example: Example) -> str:
    """What the generating model is shown for `example` (the stored prompt stays the original)."""
    if config.kind == "rephrase":
        base = config.template.format_map(
            {"instruction": example.prompt, "reference": example.response}
        )
    else:
        base = example.prompt
    return base + _hint_text(config)


def _hint_text(config: GenDataConfig) -> str:
    if config.hint == "none":
        return ""
    if config.hint != "auto":
        return config.hint
    if config.task == "gsm8k":
        from core.evaluation import GSM8K_INSTRUCTION

        return GSM8K_INSTRUCTION
    if config.task == "math":
        return MATH_HINT
    return ""


def read_candidates(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-prompt records of a run (`candidates.jsonl`), skipping a half-written last line."""
    path = Path(run_dir) / CANDIDATES_JSONL
    if not path.is_file():
        return []
    records = []
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            records.append(rec)
    return records


def _append_candidates(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record as one whole line, then fsync (a crash loses at most that line)."""
    path = run_dir / CANDIDATES_JSONL
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a+b") as fh:
        fh.seek(0, 2)
        if fh.tell():
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                line = "\n" + line
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def summarise(records: Sequence[dict[str, Any]], n_prompts: int) -> GenerationSummary:
    """Totals over per-prompt records (a resumed run counts every attempt's work)."""
    summary = GenerationSummary(n_prompts=n_prompts)
    for rec in records:
        cands = rec.get("candidates", [])
        summary.n_done += 1
        summary.n_samples += len(cands)
        summary.n_correct += sum(bool(c.get("correct")) for c in cands)
        summary.n_tokens += sum(int(c.get("n_tokens", 0)) for c in cands)
        summary.n_unfinished += sum(not c.get("finished", True) for c in cands)
        summary.generation_seconds += float(rec.get("seconds", 0.0))
        if rec.get("chosen") is None:
            summary.n_dropped += 1
            summary.dropped_ids.append(str(rec["id"]))
        else:
            summary.n_kept += 1
    return summary


def _default_name(config: GenDataConfig, model_label: str) -> str:
    from core.generated import generated_sets_dir

    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_label).name or model_label).strip("-")
    base = f"{config.kind.replace('_', '-')}-{config.data_label()}-{model}"
    root = generated_sets_dir()
    versions = [0]
    if root.is_dir():
        for folder in root.iterdir():
            m = re.fullmatch(re.escape(base) + r"-v(\d+)", folder.name)
            if m:
                versions.append(int(m.group(1)))
    return f"{base}-v{max(versions) + 1}"


def _data_key(config: GenDataConfig) -> str:
    from core.generated import file_data_key, task_data_key
    from core.tasks import get_task

    if config.task:
        return task_data_key(config.task, config.split or get_task(config.task).default_split)
    return file_data_key(str(config.data))


def _run_state(config: GenDataConfig, run_dir: Path) -> dict[str, Any]:
    """The run folder's fixed facts (set name, settings); a resumed run must match them (the
    thread count may change: it does not change what is generated)."""
    from core.jobs import read_json, write_json_atomic

    settings = {k: v for k, v in config.to_dict().items() if k not in ("name", "threads")}
    state = read_json(run_dir / STATE_JSON)
    if isinstance(state, dict):
        if state.get("settings") != settings:
            changed = sorted(
                k for k in settings if settings.get(k) != state.get("settings", {}).get(k)
            )
            raise LensError(
                f"{run_dir} holds a generation run with other settings ({', '.join(changed)}); "
                "use a new run folder."
            )
        return state
    model_label = config.teacher or config.model
    state = {
        "name": config.name or _default_name(config, model_label),
        "settings": settings,
        "started": time.time(),
    }
    write_json_atomic(run_dir / STATE_JSON, state)
    return state


def generation_progress(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Latest progress of a run from its metrics records: done/total prompts, kept, accepted."""
    progress: dict[str, Any] = {"done": 0, "total": None, "finished": False}
    for rec in records:
        if rec.get("kind") in ("start", "generate"):
            progress.update({k: v for k, v in rec.items() if k != "kind"})
        elif rec.get("kind") == "done":
            progress.update({k: v for k, v in rec.items() if k != "kind"})
            progress["finished"] = True
    return progress


def run_generation(
    config: GenDataConfig,
    run_dir: str | Path,
    *,
    status: StatusFn | None = None,
    progress: ProgressFn | None = None,
    student: Any = None,
    teacher: Any = None,
) -> Path:
    """Generate, verify, select and write the set; resumable in `run_dir`. Returns the set folder.

    `student` / `teacher` take already loaded models (`core.models.LoadedModel`; tests pass the
    tiny model); otherwise they are loaded from `config.model` / `config.teacher`.
    `progress(done, total)` is called after each prompt's record is saved.
    """
    from core.cache import ScoreCache
    from core.generated import write_generated_set
    from core.generation import GenerationConfig, generate_responses, set_torch_threads
    from core.jobs import append_metric, write_json_atomic
    from core.models import load_model
    from core.scoring import score_examples

    threads = set_torch_threads(config.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    say = status or (lambda message: None)
    t0 = time.monotonic()
    state = _run_state(config, run)
    examples = load_source_examples(config)
    verifiers = {ex.id: resolve_verifier(config.verify, ex, config.task) for ex in examples}
    by_id = {ex.id: ex for ex in examples}
    records = {
        r["id"]: r
        for r in read_candidates(run)
        if r["id"] in by_id and r.get("prompt_hash") == prompt_hash(by_id[r["id"]].prompt)
    }
    todo = [ex for ex in examples if ex.id not in records]
    total = len(examples)
    print(
        f"{config.describe()}: {total} prompts, {len(records)} already done "
        f"(resumed from {CANDIDATES_JSONL})"
        if records
        else f"{config.describe()}: {total} prompts",
        f"({threads} torch thread{'s' if threads > 1 else ''})",
        flush=True,
    )
    append_metric(
        run,
        {"kind": "start", "time": time.time(), "done": len(records), "total": total},
    )
    say("loading models")
    student = student or load_model(config.model, device=config.device, dtype=config.dtype)
    if config.teacher and teacher is None:
        teacher = load_model(config.teacher, device=config.device, dtype=config.dtype)
    generator = teacher or student
    wall_before = float(state.get("wall_seconds", 0.0))
    n_samples = config.samples_per_prompt
    gen_config = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        num_return_sequences=n_samples,
        seed=config.seed,
    )
    cache = ScoreCache()
    order = {ex.id: i for i, ex in enumerate(examples)}
    for start in range(0, len(todo), config.prompt_batch):
        chunk = todo[start : start + config.prompt_batch]
        say(f"generating: {len(records)}/{total} prompts done")
        t_gen = time.monotonic()
        # seed per batch from the first prompt's position: a resumed run draws new batches the
        # same way a fresh run would from that point
        batch_config = GenerationConfig(
            **{**gen_config.to_dict(), "seed": config.seed + order[chunk[0].id]}
        )
        outputs = generate_responses(
            generator,
            [generation_prompt(config, ex) for ex in chunk],
            batch_config,
            batch_size=config.prompt_batch,
        )
        seconds = (time.monotonic() - t_gen) / len(chunk)
        for ex, samples in zip(chunk, outputs, strict=True):
            texts = [s.text for s in samples]
            verdicts = check_answers(ex, texts, verifiers[ex.id], workers=config.workers)
            correct = [v.correct and bool(t.strip()) for v, t in zip(verdicts, texts, strict=True)]
            ppls: list[float | None] = [None] * len(texts)
            good = [i for i, ok in enumerate(correct) if ok]
            if good:
                cands = [Example(f"{ex.id}#{i}", ex.prompt, texts[i]) for i in good]
                scored = score_examples(
                    student, cands, convention=config.convention, cache=cache, source=config.kind
                )
                by_cand = {rec.id: rec.seq_ppl for rec in scored.examples}
                for i in good:
                    ppls[i] = by_cand.get(f"{ex.id}#{i}")
            rng = random.Random(f"{config.seed}:{ex.id}")
            chosen = select_candidate(ppls, correct, config.selection, rng)
            record = {
                "id": ex.id,
                "prompt_hash": prompt_hash(ex.prompt),
                "verifier": verifiers[ex.id],
                "seconds": seconds,
                "chosen": chosen,
                "candidates": [
                    {
                        "text": s.text,
                        "n_tokens": s.n_tokens,
                        "finished": s.finished,
                        "correct": correct[i],
                        "detail": verdicts[i].detail,
                        "ppl": ppls[i],
                    }
                    for i, s in enumerate(samples)
                ],
            }
            _append_candidates(run, record)
            records[ex.id] = record
            state["wall_seconds"] = wall_before + time.monotonic() - t0
            write_json_atomic(run / STATE_JSON, state)
            if progress:
                progress(len(records), total)
        done = summarise(list(records.values()), total)
        append_metric(run, {"kind": "generate", "time": time.time(), **_counts(done)})
        print(f"{done.n_done}/{total} prompts: {done.describe()}", flush=True)

    summary = summarise([records[ex.id] for ex in examples], total)
    summary.wall_seconds = wall_before + time.monotonic() - t0
    kept = []
    for ex in examples:
        rec = records[ex.id]
        if rec["chosen"] is None:
            continue
        cand = rec["candidates"][rec["chosen"]]
        meta = {
            **ex.meta,
            "gendata": {
                "ppl": cand["ppl"],
                "n_samples": len(rec["candidates"]),
                "n_correct": sum(c["correct"] for c in rec["candidates"]),
                "finished": cand["finished"],
            },
        }
        kept.append(Example(id=ex.id, prompt=ex.prompt, response=cand["text"], meta=meta))
    if not kept:
        raise LensError(
            f"No prompt had a correct sample ({summary.n_correct} of {summary.n_samples} samples "
            f"correct): nothing to write. The samples are in {run / CANDIDATES_JSONL}."
        )
    say("writing the set")
    provenance = {
        "version": _version_of(state["name"]),
        "student_model": config.model,
        "student_fingerprint": student.fingerprint,
        "teacher_model": config.teacher,
        "scoring": {"convention": config.convention, "selection": config.selection},
        "verifier": sorted(set(verifiers.values())),
        "seed": config.seed,
        "torch_threads": threads,
        "config": config.to_dict(),
        "run_dir": str(run.absolute()),
        **summary.to_dict(),
    }
    folder = write_generated_set(
        state["name"],
        config.kind,
        kept,
        data_key=_data_key(config),
        model=config.teacher or config.model,
        model_fingerprint=generator.fingerprint,
        settings={**gen_config.to_dict(), "hint": config.hint, "prompt_batch": config.prompt_batch},
        note=f"{summary.describe()}; generated by {generator.display_name}",
        provenance=provenance,
    )
    append_metric(
        run, {"kind": "done", "time": time.time(), "set": str(folder), **_counts(summary)}
    )
    print(f"wrote {folder}: {summary.describe()}", flush=True)
    return folder


def _counts(summary: GenerationSummary) -> dict[str, Any]:
    """The progress fields of metrics records ("generate" after each batch, and "done")."""
    return {
        "done": summary.n_done,
        "total": summary.n_prompts,
        "kept": summary.n_kept,
        "dropped": summary.n_dropped,
        "samples": summary.n_samples,
        "correct": summary.n_correct,
        "tokens": summary.n_tokens,
        "acceptance_rate": summary.acceptance_rate,
    }


def _version_of(name: str) -> int | None:
    m = re.search(r"-v(\d+)$", name)
    return int(m.group(1)) if m else None


def run_job(job: Any, registry: Any) -> None:
    """Entry point of a "generate" job process (see `core.jobs.run_job_process`)."""
    config = GenDataConfig.from_dict(job.config)

    def status(message: str) -> None:
        registry.set_message(job.id, message)

    run_generation(config, job.path, status=status)
    registry.set_message(job.id, "done")
