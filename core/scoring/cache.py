"""The score cache: scored examples on disk, per scoring setting, keyed by example content.

A scoring setting is what makes two scores of the same text differ: the model fingerprint (with
dtype), the chat template, the perplexity convention, the context length and the top-k width
(`ScoreSetting`). Each setting is one table of the columnar store (`core/scoring/store.py`:
Parquet fragments), whose rows are keyed by the example's content (`content_key`: id, prompt,
response). So asking again for the same data is instant, scoring a superset only computes the
new examples, and changing the setting or an example's text misses.

Before the store, scores lived in `<cache_dir()>/scores.sqlite`; the cache does not read that
file: `python -m core migrate` copies its scores into the store (`core.scoring.legacy`), and the
CLI and the pages that show scores say so while the file is there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from core.io import cache_dir
from core.scoring.store import ScoreStore
from core.scoring.tokens import TokenScores

SCHEMA_VERSION = 1  # part of every setting's table name (and of the old SQLite cache's keys)
STORE_DIR = "scores"


class HasContent(Protocol):
    """What a row key is made of: an example's id, prompt and response."""

    id: str
    prompt: str
    response: str


@dataclass(frozen=True)
class ScoreSetting:
    """Everything besides the example that a score depends on: one table of the store."""

    model_key: str
    template_fp: str
    convention: str
    max_length: int
    top_k: int

    def key(self) -> str:
        """The setting's table name: a hash of its parts."""
        payload = json.dumps(
            ["store", SCHEMA_VERSION, self.model_key, self.template_fp, self.convention]
            + [int(self.max_length), int(self.top_k)]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def to_dict(self) -> dict[str, object]:
        """Plain dict (written beside the table as setting.json)."""
        return asdict(self)


def content_key(example: HasContent) -> str:
    """Row key of an example within a setting: a hash of its id, prompt and response."""
    payload = json.dumps([example.id, example.prompt, example.response])
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CacheLookup:
    """What the cache holds of a list of examples: the content keys found and their scores
    (aligned), and warnings to show (never raised)."""

    keys: list[str]
    scores: TokenScores
    warnings: list[str] = field(default_factory=list)


class ScoreCache:
    """Scored examples per setting in the columnar store at `path` (default
    `<cache_dir()>/scores`)."""

    def __init__(self, path: str | Path | None = None) -> None:
        root = Path(path) if path else cache_dir() / STORE_DIR
        self.store = ScoreStore(root)
        self.path = root

    def lookup(
        self,
        setting: ScoreSetting,
        examples: Sequence[HasContent],
        keys: Sequence[str] | None = None,
    ) -> CacheLookup:
        """Stored scores of `examples` under `setting` (each content once, in input order);
        `keys`, when given, are their `content_key`s."""
        keys = [content_key(ex) for ex in examples] if keys is None else list(keys)
        wanted = list(dict.fromkeys(keys))
        read = self.store.read(setting.key(), wanted)
        return CacheLookup(keys=read.keys, scores=read.scores, warnings=list(read.warnings))

    def put(self, setting: ScoreSetting, scores: TokenScores) -> list[str]:
        """Store scores under `setting` (each example keyed by its content); warnings of a
        compaction that met an unreadable fragment."""
        if scores.top_k != setting.top_k and len(scores):
            raise ValueError(f"records have top-{scores.top_k}, the setting top-{setting.top_k}")
        keys = [
            content_key(_Content(i, p, r))
            for i, p, r in zip(scores.ids, scores.prompts, scores.responses, strict=True)
        ]
        first = list({k: i for i, k in reversed(list(enumerate(keys)))}.values())
        if len(first) < len(keys):
            first.sort()
            scores, keys = scores.take(first), [keys[i] for i in first]
        return self.store.write(setting.key(), keys, scores, info=setting.to_dict())

    def compact(self) -> list[str]:
        """Merge each setting's fragments into one (warnings for unreadable fragments)."""
        return self.store.compact()

    def __bool__(self) -> bool:
        return True  # an empty cache is still a cache (`if cache:` must not mean "has rows")

    def __len__(self) -> int:
        return self.store.count()

    def clear(self) -> None:
        """Remove every stored score."""
        self.store.clear()


@dataclass(frozen=True)
class _Content:
    id: str
    prompt: str
    response: str
