"""Resolve "where do the examples come from" (built-in task, user file, hub dataset) in one place,
so the CLI and the app pick data the same way."""

from __future__ import annotations

from core.data.records import Dataset
from core.data.tasks import load_task
from core.data.userdata import load_hub_dataset, load_user_data
from core.errors import LensError


def load_source(
    *,
    task: str | None = None,
    split: str | None = None,
    data: str | None = None,
    hub: str | None = None,
    prompt_col: str = "prompt",
    response_col: str = "response",
    id_col: str | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load examples from exactly one of: a built-in task, a JSONL/CSV file, a hub dataset id."""
    given = [name for name, value in (("task", task), ("data", data), ("hub", hub)) if value]
    if len(given) != 1:
        raise LensError("Give exactly one data source: a task, a data file, or a hub dataset.")
    if limit is not None and limit < 1:
        raise LensError(f"limit must be at least 1 (got {limit}).")
    if task:
        return load_task(task, split=split, limit=limit)
    if data:
        return load_user_data(data, prompt_col, response_col, id_col=id_col, limit=limit)

    return load_hub_dataset(
        hub or "",
        split=split or "train",
        prompt_col=prompt_col,
        response_col=response_col,
        id_col=id_col,
        limit=limit,
    )
