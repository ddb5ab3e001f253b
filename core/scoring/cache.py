"""The score cache: scored examples on disk, per scoring setting, keyed by example content.

A scoring setting is what makes two scores of the same text differ: the model fingerprint (with
dtype), the chat template, the perplexity convention, the context length and the top-k width
(`ScoreSetting`). Each setting is one table of the columnar store (`core/scoring/store.py`:
Parquet fragments), whose rows are keyed by the example's content (`content_key`: id, prompt,
response). So asking again for the same data is instant, scoring a superset only computes the
new examples, and changing the setting or an example's text misses.

Before the store, scores lived in `<cache_dir()>/scores.sqlite`, one zlib-compressed JSON
record per (setting, content) hash (`LegacyScoreCache`, `score_key`). That file is read through:
an example missing from the store is looked up there, and a hit is copied into the store (the
old file is only read, never changed). The old keys are one-way hashes that do not name their
setting, so the file cannot be migrated in one pass; each setting migrates as it is asked for.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import zlib
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from core.data.records import ScoredExample
from core.io import cache_dir
from core.kvstore import KVCache
from core.scoring.store import ScoreStore
from core.scoring.tokens import TokenScores

SCHEMA_VERSION = 1  # of the legacy SQLite keys
STORE_DIR = "scores"
LEGACY_FILE = "scores.sqlite"
_CHUNK = 500


class _HasContent(Protocol):
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


def content_key(example: _HasContent) -> str:
    """Row key of an example within a setting: a hash of its id, prompt and response."""
    payload = json.dumps([example.id, example.prompt, example.response])
    return hashlib.sha256(payload.encode()).hexdigest()


def score_key(
    model_key: str,
    template_fp: str,
    convention: str,
    max_length: int,
    top_k: int,
    example: _HasContent,
) -> str:
    """Key of one example under one setting in the legacy SQLite cache."""
    payload = json.dumps(
        [SCHEMA_VERSION, model_key, template_fp, convention, max_length, top_k]
        + [example.id, example.prompt, example.response]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _encode(record: ScoredExample) -> bytes:
    return zlib.compress(json.dumps(record.to_dict()).encode(), 3)


def _decode(value: bytes | str) -> ScoredExample:
    raw = value.encode() if isinstance(value, str) else value
    return ScoredExample.from_dict(json.loads(zlib.decompress(raw)))


class LegacyScoreCache(KVCache[ScoredExample]):
    """The pre-store cache: key (`score_key`) -> ScoredExample in `scores.sqlite`
    (zlib-compressed JSON). Kept to read old caches through, and for the benchmark baseline."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(
            Path(path) if path else cache_dir() / LEGACY_FILE,
            "scores",
            encode=_encode,
            decode=_decode,
        )


@dataclass
class CacheLookup:
    """What the cache holds of a list of examples: the content keys found and their scores
    (aligned), how many came from the legacy file, and warnings to show (never raised)."""

    keys: list[str]
    scores: TokenScores
    n_migrated: int = 0
    warnings: list[str] = field(default_factory=list)


_DEFAULT = object()


class ScoreCache:
    """Scored examples per setting in the columnar store at `path` (default
    `<cache_dir()>/scores`), reading through the legacy SQLite file `legacy` (default: the app's
    `scores.sqlite` for the default store, none for a store elsewhere; None: none)."""

    def __init__(self, path: str | Path | None = None, *, legacy: object = _DEFAULT) -> None:
        root = Path(path) if path else cache_dir() / STORE_DIR
        self.store = ScoreStore(root)
        if legacy is _DEFAULT:
            legacy = None if path else cache_dir() / LEGACY_FILE
        self.legacy: Path | None = Path(legacy) if legacy is not None else None  # type: ignore[arg-type]
        self.path = root

    def lookup(
        self,
        setting: ScoreSetting,
        examples: Sequence[_HasContent],
        keys: Sequence[str] | None = None,
    ) -> CacheLookup:
        """Stored scores of `examples` under `setting` (each content once, in input order);
        `keys`, when given, are their `content_key`s."""
        keys = [content_key(ex) for ex in examples] if keys is None else list(keys)
        wanted = list(dict.fromkeys(keys))
        read = self.store.read(setting.key(), wanted)
        result = CacheLookup(keys=read.keys, scores=read.scores, warnings=list(read.warnings))
        if self.legacy is None or not self.legacy.is_file() or len(read.keys) == len(wanted):
            return result
        have = set(read.keys)
        missing: dict[str, _HasContent] = {}
        for ex, key in zip(examples, keys, strict=True):
            if key not in have:
                missing.setdefault(key, ex)
        migrated, notes = self._read_legacy(setting, missing)
        result.warnings += notes
        if migrated:
            keys = list(migrated)
            records = TokenScores.from_examples(list(migrated.values()), top_k=setting.top_k)
            result.warnings += self.store.write(
                setting.key(), keys, records, info=setting.to_dict()
            )
            joined = TokenScores.concat([read.scores, records])
            position = {k: i for i, k in enumerate(read.keys + keys)}
            order = [k for k in wanted if k in position]
            result.keys = order
            result.scores = joined.take([position[k] for k in order])
            result.n_migrated = len(keys)
        return result

    def _read_legacy(
        self, setting: ScoreSetting, missing: dict[str, _HasContent]
    ) -> tuple[dict[str, ScoredExample], list[str]]:
        """Records of `missing` (content key -> example) in the legacy file; bad rows skipped
        with a warning."""
        old = {
            score_key(
                setting.model_key,
                setting.template_fp,
                setting.convention,
                setting.max_length,
                setting.top_k,
                ex,
            ): key
            for key, ex in missing.items()
        }
        found: dict[str, ScoredExample] = {}
        bad = 0
        legacy = self.legacy
        assert legacy is not None
        try:
            with closing(sqlite3.connect(legacy, timeout=30)) as db:
                keys = list(old)
                for start in range(0, len(keys), _CHUNK):
                    chunk = keys[start : start + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    query = f"SELECT key, value FROM scores WHERE key IN ({marks})"
                    for key, value in db.execute(query, chunk):
                        try:
                            record = _decode(value)
                            TokenScores.from_examples([record], top_k=setting.top_k)
                        except (zlib.error, ValueError, TypeError, KeyError):
                            bad += 1
                            continue
                        found[old[key]] = record
        except sqlite3.Error as exc:
            return found, [f"score cache: cannot read the old cache {legacy} ({exc})."]
        notes = []
        if bad:
            notes.append(
                f"score cache: {bad} unreadable record(s) in the old cache {legacy} are scored again."
            )
        return found, notes

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
        """Remove every stored score (the legacy file is left alone)."""
        self.store.clear()


@dataclass(frozen=True)
class _Content:
    id: str
    prompt: str
    response: str
