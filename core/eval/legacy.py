"""Evaluation results in a run folder as versions before the honest target metric wrote them, and
the `python -m core migrate` step that rewrites them; readers take the current format only.

Until 2026-12-02 a reference-NLL task (`ref_ppl`) named the easy-token NLL (`nll_easy`) its
score. Since then its score is the full-token NLL (`nll`) and `nll_easy` a labelled diagnostic.
Two files of a run folder carry the old choice:

- an evaluation round, `eval/step-N.json`: such a task's "primary" is `nll_easy`;
- `metrics.jsonl`: a round's "eval" records list a task's primary metric first, so such a task's
  `nll_easy` record comes before its `nll` record.

The migration sets the primary to `nll` and puts the `nll` record first (moving those two lines,
every other byte kept), after a copy of the old file is kept as `<name>.migrated`. The folder
of a job still queued or running is left alone (its metrics file is being appended to).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.eval.suites import PRIMARY_METRIC, REF_PPL
from core.io import MigrationStep, keep_copy, read_json, write_bytes_atomic, write_json_atomic
from core.jobs.runfiles import EVAL_DIR, METRICS_JSONL, eval_round_steps

NLL = PRIMARY_METRIC[REF_PPL]  # the full-token NLL
EASY_NLL = "nll_easy"


def _old_task(task: Mapping[str, Any]) -> bool:
    return (
        task.get("scorer") == REF_PPL
        and NLL in (task.get("metrics") or {})
        and task.get("primary") != NLL
    )


def round_is_old(data: Any) -> bool:
    """Whether a saved round (`eval/step-N.json`'s JSON) names the easy-token NLL a
    reference-NLL task's score."""
    tasks = data.get("tasks") if isinstance(data, dict) else None
    return any(isinstance(t, dict) and _old_task(t) for t in tasks or ())


def result_is_old(result: Any) -> bool:
    """`round_is_old` for a round already read (a `SuiteResult`)."""
    return any(t.scorer == REF_PPL and NLL in t.metrics and t.primary != NLL for t in result.tasks)


def records_are_old(records: Iterable[tuple[Any, Any, Any]]) -> bool:
    """Whether "eval" records, as (step, task, metric) in file order, put a task's easy-token
    NLL before its full-token NLL within a round."""
    easy_first: set[tuple[Any, Any]] = set()
    for step, task, metric in records:
        if metric == EASY_NLL:
            easy_first.add((step, task))
        elif metric == NLL and (step, task) in easy_first:
            return True
    return False


def _swapped_lines(raw: bytes) -> tuple[bytes, int]:
    """`raw` (a metrics.jsonl) with each round's `nll` record moved before its `nll_easy` one
    (the two lines trade places); the number of pairs moved."""
    lines = raw.splitlines(keepends=True)
    places: dict[tuple[Any, Any], dict[str, list[int]]] = {}
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == "eval":
            metric = record.get("metric")
            if metric in (NLL, EASY_NLL):
                group = places.setdefault((record.get("step"), record.get("task")), {})
                group.setdefault(str(metric), []).append(i)
    moved = 0
    for group in places.values():
        for easy, full in zip(group.get(EASY_NLL, []), group.get(NLL, []), strict=False):
            if easy < full:
                lines[easy], lines[full] = lines[full], lines[easy]
                moved += 1
    for i, line in enumerate(lines[:-1]):
        if not line.endswith(b"\n"):
            lines[i] = line + b"\n"
    return b"".join(lines), moved


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def migrate_run_folder(
    run_dir: str | Path, *, dry_run: bool = False, job_status: str | None = None
) -> list[MigrationStep]:
    """Rewrite the evaluation rounds and the metrics file of one run folder that carry the old
    reference-NLL score (see the module docstring); one line per file kind rewritten. A folder
    whose job is `queued` or `running` (`job_status`) is left alone, with a line saying so."""
    run = Path(run_dir)
    rounds = [run / EVAL_DIR / f"step-{s}.json" for s in eval_round_steps(run)]
    old_rounds = [(p, data) for p in rounds if round_is_old(data := read_json(p))]
    metrics = run / METRICS_JSONL
    raw = metrics.read_bytes() if metrics.is_file() else b""
    new_raw, moved = _swapped_lines(raw)
    if not old_rounds and not moved:
        return []
    if job_status in ("queued", "running"):
        text = (
            f"{run}: holds evaluation results in the old format, left as it is while its job is "
            f"{job_status}; run `python -m core migrate` again when it has ended"
        )
        return [MigrationStep(run, text, converted=False)]
    steps = []
    if old_rounds:
        if not dry_run:
            for path, data in old_rounds:
                for task in data["tasks"]:
                    if isinstance(task, dict) and _old_task(task):
                        task["primary"] = NLL
                keep_copy(path)
                write_json_atomic(path, data)
        names = ", ".join(p.name for p, _ in old_rounds)
        verb = "would name" if dry_run else "named"
        kept = "would keep" if dry_run else "kept"
        steps.append(
            MigrationStep(
                run / EVAL_DIR,
                f"{run / EVAL_DIR}: {verb} the full-token NLL the reference-NLL score in "
                f"{_plural(len(old_rounds), 'evaluation round')} ({names}; was the easy-token "
                f"NLL); {kept} the old files as <name>.migrated",
            )
        )
    if moved:
        if not dry_run:
            keep_copy(metrics)
            write_bytes_atomic(metrics, new_raw)
        verb = "would put" if dry_run else "put"
        kept = "would keep" if dry_run else "kept"
        steps.append(
            MigrationStep(
                metrics,
                f"{metrics}: {verb} the full-token NLL record before the easy-token one for "
                f"{_plural(moved, 'reference-NLL task result')} (a task in a round); {kept} the "
                f"old file as {metrics.name}.migrated",
            )
        )
    return steps
