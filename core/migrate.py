"""`python -m core migrate`: convert the project's own older on-disk formats in place, once, so
that every reader takes the current format only.

What it converts (each step lives with the format's owner):

- the score cache before the columnar store, `<cache>/scores.sqlite`, copied into the store
  `<cache>/scores` (`core.scoring.legacy`; records of a model the store does not know yet need
  `--model NAME`);
- a job registry `<runs>/jobs.sqlite` without the columns added since the first release
  (`core.jobs.store.migrate_job_table`; `JobStore` refuses it until then);
- evaluation rounds and metrics files of run folders that name the easy-token NLL a reference-
  NLL task's score (`core.eval.legacy`).

Every step is idempotent (a second run finds nothing to do) and keeps the user's data: the new
file is written atomically first, then the old one is kept as `<name>.migrated` (renamed, or a
copy of a file rewritten in place), never deleted. `--dry-run` reads and reports, and changes
nothing.

Until then the old files are not read, and not ignored in silence: `score` and the pages that
show scores say that an old score cache waits (`core.scoring.legacy.legacy_score_note`), the job
registry refuses an old table with a line naming this command, and the Runs page says when a run
folder holds old evaluation results (`core.study.runs.RunView.old_format`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from core.config import JobConfig, help_meta
from core.eval.legacy import migrate_run_folder
from core.io import MigrationStep, cache_dir
from core.jobs.runfiles import EVAL_DIR, METRICS_JSONL, runs_dir
from core.jobs.store import job_folders, migrate_job_table
from core.scoring.legacy import KeyParts, migrate_score_cache, old_score_files

NOTHING = "nothing to migrate: every file is in the current format"


@dataclass
class MigrateConfig(JobConfig):
    """``python -m core migrate [--dry-run] [--model NAME ...]``."""

    COMMAND: ClassVar[str] = "migrate"
    LABEL: ClassVar[str] = "migrate"

    dry_run: bool = field(
        default=False, metadata=help_meta("say what would be converted, and change nothing")
    )
    models: list[str] = field(
        default_factory=list,
        metadata=help_meta(
            "a model the old score cache holds scores of ('default', a Hugging Face id, a "
            "folder or a .gguf file; repeat for several): its records are copied too (loads it)",
            flag="model",
            repeat=True,
            metavar="NAME",
        ),
    )


@dataclass
class MigrationReport:
    """What `migrate` converted (or would, in a dry run), one step per file or folder, and what
    it left as it was, with why."""

    steps: list[MigrationStep] = field(default_factory=list)
    dry_run: bool = False

    @property
    def converted(self) -> list[MigrationStep]:
        """The steps that changed something (or would)."""
        return [s for s in self.steps if s.converted]

    def lines(self) -> list[str]:
        """One line per step; a single line saying so when there is nothing to convert."""
        lines = [s.text for s in self.steps]
        if not self.converted:
            lines.insert(0, NOTHING)
        return lines


def model_key_parts(names: Sequence[str]) -> list[KeyParts]:
    """The old score keys' model parts of each named model: its fingerprint under each dtype,
    its chat template and its context length (each model is loaded on the CPU)."""
    from core.model.loading import DTYPES, load_model  # lazy: heavy (torch)

    parts = []
    for name in names:
        lm = load_model(name, device="cpu", dtype="float32")
        for dtype in DTYPES:
            model_key = f"{lm.fingerprint}|{dtype}"
            parts.append(KeyParts(model_key, lm.template_fingerprint, lm.max_length))
    return parts


def _run_folders(runs: Path, jobs: dict[Path, str]) -> dict[Path, str | None]:
    """Run folder -> its job's status (None without a job): the runs root's folders that hold
    evaluation results, and every job's folder."""
    found: dict[Path, str | None] = {}
    if runs.is_dir():
        for folder in sorted(runs.iterdir()):
            if (folder / EVAL_DIR).is_dir() or (folder / METRICS_JSONL).is_file():
                found[folder.resolve()] = None
    for folder, status in jobs.items():
        if folder.is_dir():
            found[folder.resolve()] = status
    return found


def migrate(
    root: str | Path | None = None,
    *,
    runs: str | Path | None = None,
    models: Sequence[str] = (),
    dry_run: bool = False,
) -> MigrationReport:
    """Convert every old-format file under the cache folder `root` (default `cache_dir()`) and
    the runs root `runs` (default: `runs_dir()` for the default cache, else `<root>/runs`).
    `models` name models whose old cached scores to place (see `core.scoring.legacy`)."""
    cache = Path(root) if root is not None else cache_dir()
    if runs is None:
        runs = runs_dir(create=False) if root is None else cache / "runs"
    runs = Path(runs)
    report = MigrationReport(dry_run=dry_run)
    # a model is loaded only when there are old scores for it to place
    parts = model_key_parts(models) if models and old_score_files(cache, kept=True) else []
    report.steps += migrate_score_cache(cache, models=parts, dry_run=dry_run)
    report.steps += migrate_job_table(runs, dry_run=dry_run)
    for folder, status in _run_folders(runs, job_folders(runs)).items():
        report.steps += migrate_run_folder(folder, dry_run=dry_run, job_status=status)
    return report
