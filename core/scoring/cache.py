"""On-disk cache of scored examples (SQLite, one row per example and scoring setting).

The key joins the model fingerprint (with dtype), the chat template, the perplexity convention,
the scoring settings and the example's own content, so asking again for the same data is instant,
and scoring a superset only computes the new examples. Several processes may read and write at
once (SQLite WAL); a crash mid-write never leaves a half row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import zlib
from pathlib import Path

from core.data.records import Example, ScoredExample
from core.model.loading import cache_dir

SCHEMA_VERSION = 1


def score_key(
    model_key: str,
    template_fp: str,
    convention: str,
    max_length: int,
    top_k: int,
    example: Example,
) -> str:
    """Cache key of one example scored under one setting."""
    payload = json.dumps(
        [SCHEMA_VERSION, model_key, template_fp, convention, max_length, top_k]
        + [example.id, example.prompt, example.response]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class ScoreCache:
    """Key -> ScoredExample store in a single SQLite file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "scores.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value BLOB)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys: list[str]) -> dict[str, ScoredExample]:
        """The cached records among `keys`."""
        found: dict[str, ScoredExample] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, value FROM scores WHERE key IN ({marks})", chunk)
                for key, value in rows:
                    found[key] = ScoredExample.from_dict(json.loads(zlib.decompress(value)))
        return found

    def put_many(self, items: dict[str, ScoredExample]) -> None:
        """Store records (one transaction)."""
        rows = [
            (key, zlib.compress(json.dumps(rec.to_dict()).encode(), 3))
            for key, rec in items.items()
        ]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)", rows)

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def clear(self) -> None:
        """Remove every cached score."""
        with self._connect() as db:
            db.execute("DELETE FROM scores")
