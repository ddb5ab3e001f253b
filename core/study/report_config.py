"""`ReportConfig`: the settings of ``python -m core report`` (an offline HTML report of runs),
apart from `core.study.report` so that the command line builds its parser without pandas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.config import JobConfig, help_meta
from core.errors import LensError

DEFAULT_TITLE = "Perplexity Lens report"


@dataclass
class ReportConfig(JobConfig):
    """Which runs go into the report, where it is written, and what it shows."""

    COMMAND: ClassVar[str] = "report"
    LABEL: ClassVar[str] = "report"

    runs: list[str] = field(
        default_factory=list,
        metadata=help_meta("run ids or run folders", positional=True, required=True),
    )
    out: str = field(
        default="", metadata=help_meta("output .html file", required=True, metavar="OUT")
    )
    title: str = field(
        default=DEFAULT_TITLE, metadata=help_meta("the report's heading", metavar="TITLE")
    )
    examples: int = field(
        default=0,
        metadata=help_meta(
            "heatmap snapshots of the first run's first N training examples, scored by the "
            "original model, with the run's mask (loads the model)",
            metavar="N",
        ),
    )
    ppl_change: bool = field(
        default=True,
        metadata=help_meta(
            "include saved token-perplexity-change results (Compare page, Diagnostics); "
            "--no-ppl-change leaves them out"
        ),
    )
    device: str = field(
        default="auto", metadata=help_meta("device for --examples scoring", metavar="DEVICE")
    )
    dtype: str = field(
        default="auto", metadata=help_meta("dtype for --examples scoring", metavar="DTYPE")
    )

    def __post_init__(self) -> None:
        if not self.runs:
            raise LensError("Name at least one run (a run id or a run folder).")
        if not isinstance(self.out, str) or not self.out.strip():
            raise LensError("Give --out, the output .html file.")
        if self.examples < 0:
            raise LensError(f"--examples must be 0 or more (got {self.examples}).")

    def report_kwargs(self) -> dict[str, Any]:
        """The keywords of `core.study.report.write_report`."""
        return {
            "run_ids": list(self.runs),
            "out": self.out,
            "title": self.title,
            "n_examples": self.examples,
            "include_ppl_changes": self.ppl_change,
            "device": self.device,
            "dtype": self.dtype,
        }
