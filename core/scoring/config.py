"""`ScoreConfig`: the settings of ``python -m core score`` (model, data source, scoring), its
flags and the equivalent command the Masking studio shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.config import JobConfig, field_from, help_meta
from core.data.records import CONVENTIONS, PROMPT_CONDITIONED
from core.errors import LensError
from core.model.config import ModelsConfig

SOURCES = ("task", "data", "hub_dataset")


@dataclass
class ScoreConfig(JobConfig):
    """Score every response token of one data source with one model, into a JSONL file."""

    COMMAND: ClassVar[str] = "score"
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (SOURCES,)
    ALWAYS: ClassVar[tuple[str, ...]] = ("model", "out")
    LABEL: ClassVar[str] = "scoring"

    # model: as `python -m core models` takes it
    model: str = field_from(ModelsConfig, "model")
    device: str = field_from(ModelsConfig, "device")
    dtype: str = field_from(ModelsConfig, "dtype")
    # data: exactly one source
    task: str | None = field(
        default=None, metadata=help_meta("built-in task name (see `python -m core tasks`)")
    )
    data: str | None = field(
        default=None,
        metadata=help_meta("instead of a task: a JSONL or CSV file of prompt/response rows"),
    )
    hub_dataset: str | None = field(
        default=None,
        metadata=help_meta("instead of a task: a Hugging Face dataset id (needs network)"),
    )
    split: str | None = field(
        default=None, metadata=help_meta("task split (mbpp: train, test, all) or hub split")
    )
    prompt_col: str = field(default="prompt", metadata=help_meta("prompt column of a data file"))
    response_col: str = field(
        default="response", metadata=help_meta("response column of a data file")
    )
    id_col: str | None = field(
        default=None, metadata=help_meta("id column of a data file (default: row numbers)")
    )
    limit: int | None = field(default=None, metadata=help_meta("first N examples only"))
    # scoring
    convention: str = field(
        default=PROMPT_CONDITIONED,
        metadata=help_meta(
            "prompt-conditioned (STM) or response-only perplexity", choices=CONVENTIONS
        ),
    )
    top_k: int = field(default=5, metadata=help_meta("top-k alternatives kept per token"))
    max_length: int | None = field(
        default=None, metadata=help_meta("truncate longer sequences (default: model context)")
    )
    source: str = field(default="ground_truth", metadata=help_meta("label for the data source"))
    cache: bool = field(
        default=True, metadata=help_meta("read and write the score cache (--no-cache: neither)")
    )
    out: str = field(
        default="", metadata=help_meta("output JSONL file", required=True, metavar="FILE")
    )

    def __post_init__(self) -> None:
        given = [name for name in SOURCES if getattr(self, name)]
        if len(given) != 1:
            raise LensError("Give exactly one data source: --task, --data or --hub-dataset.")
        if self.convention not in CONVENTIONS:
            raise LensError(
                f"Unknown convention '{self.convention}' (use {', '.join(CONVENTIONS)})."
            )
        if not isinstance(self.out, str) or not self.out.strip():
            raise LensError("Give --out, the output JSONL file.")

    def source_kwargs(self) -> dict[str, Any]:
        """The keywords of `core.data.sources.load_source`."""
        return {
            "task": self.task,
            "split": self.split,
            "data": self.data,
            "hub": self.hub_dataset,
            "prompt_col": self.prompt_col,
            "response_col": self.response_col,
            "id_col": self.id_col,
            "limit": self.limit,
        }
