"""On-disk cache of scored examples (SQLite, one row per example and scoring setting).

The key joins the model fingerprint (with dtype), the chat template, the perplexity convention,
the scoring settings and the example's own content, so asking again for the same data is instant,
and scoring a superset only computes the new examples. Several processes may read and write at
once (SQLite WAL); a crash mid-write never leaves a half row.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

from core.data.records import Example, ScoredExample
from core.io import cache_dir
from core.kvstore import KVCache

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


def _encode(record: ScoredExample) -> bytes:
    return zlib.compress(json.dumps(record.to_dict()).encode(), 3)


def _decode(value: bytes | str) -> ScoredExample:
    raw = value.encode() if isinstance(value, str) else value
    return ScoredExample.from_dict(json.loads(zlib.decompress(raw)))


class ScoreCache(KVCache[ScoredExample]):
    """Key -> ScoredExample store in `<cache_dir()>/scores.sqlite` (zlib-compressed JSON)."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(
            Path(path) if path else cache_dir() / "scores.sqlite",
            "scores",
            encode=_encode,
            decode=_decode,
        )
