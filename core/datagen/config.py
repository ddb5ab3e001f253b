"""`GenDataConfig`: the settings of a Self-Output or Rephrase data-generation run, presets and flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.config import JobConfig
from core.config import help_meta as _help
from core.data.tasks import get_task
from core.errors import LensError
from core.eval.grading import VERIFIERS

KINDS = ("self_output", "rephrase")
SELECTIONS = ("lowest", "random", "highest")
CONVENTIONS = ("response_only", "prompt")

DEFAULT_REPHRASE_TEMPLATE = (
    "{instruction}\n\n"
    "Here is a reference answer:\n\n{reference}\n\n"
    "Write your own complete answer to the task above. Use the reference as a guide, "
    "but answer in your own words and style."
)
MATH_HINT = "\n\nPut the final answer in \\boxed{}."


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's settings (docs/METHOD.md): 32 samples, T 0.7, top-p 0.95, up to 512 new tokens.
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


@dataclass
class GenDataConfig(JobConfig):
    """Everything one data-generation run needs; defaults are the ``paper`` preset.

    Build one with `GenDataConfig.from_preset("cpu-quick", task="gsm8k")`; `to_dict` /
    `from_dict` round-trip it through a job's `config.json`.
    """

    COMMAND: ClassVar[str] = "generate"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    DEFAULT_PRESET: ClassVar[str] = "paper"
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("task", "data"),)
    CONFIG_FILE: ClassVar[bool] = True
    LABEL: ClassVar[str] = "generation"

    preset: str = field(
        default="paper",
        metadata=_help("paper (N=32, T=0.7, top-p 0.95, 512 tokens) or cpu-quick (8 prompts, N=4)"),
    )
    kind: str = field(
        default="self_output", metadata=_help("self_output or rephrase", choices=KINDS)
    )
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
        metadata=_help(
            "auto (the task's verifier), code, number, boxed or none (keep all)", choices=VERIFIERS
        ),
    )
    selection: str = field(
        default="lowest", metadata=_help("lowest, random or highest ppl", choices=SELECTIONS)
    )
    convention: str = field(
        default="response_only",
        metadata=_help("perplexity for ranking: response_only or prompt", choices=CONVENTIONS),
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
        """N for Self-Output; Rephrase writes one answer per prompt (docs/METHOD.md)."""
        return self.n_samples if self.kind == "self_output" else 1

    def data_label(self) -> str:
        """Short name of the data: "mbpp-train" or the file's stem."""
        if self.task:
            return f"{self.task}-{self.split or get_task(self.task).default_split}"
        return Path(str(self.data)).stem

    def describe(self) -> str:
        """One line for job lists."""
        who = self.teacher and f"{self.teacher} → {self.model}" or self.model
        n = f"N={self.n_samples} · " if self.kind == "self_output" else ""
        limit = f" (first {self.limit})" if self.limit else ""
        return f"{self.kind} · {n}{self.data_label()}{limit} · {who}"
