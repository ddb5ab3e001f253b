"""The example record every task and user dataset is turned into."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair.

    `prompt` is the user turn, `response` the ground-truth assistant turn. `meta` holds what the
    task's scorer needs (asserts, gold answer, choices, ...) and must be JSON-serialisable.
    """

    id: str
    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


@dataclass
class LoadReport:
    """What happened while loading a dataset, so nothing is dropped silently."""

    source: str
    loaded: int = 0
    skipped_empty: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the UI and CLI."""
        text = f"{self.source}: {self.loaded} examples"
        if self.skipped_empty:
            text += f", {self.skipped_empty} empty rows skipped"
        return text


@dataclass
class Dataset:
    """A named list of examples plus the report of how it was loaded."""

    name: str
    examples: list[Example]
    report: LoadReport

    def fingerprint(self) -> str:
        """Content hash of the examples (ids, prompts, responses), stable across runs."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps([ex.id, ex.prompt, ex.response]).encode())
        return h.hexdigest()[:16]
