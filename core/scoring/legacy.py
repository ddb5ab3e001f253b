"""The score cache before the columnar store, and the `python -m core migrate` step that carries
it into the store. Nothing else reads it: the score cache reads the store alone.

Until the store (issue #16), scores lived in `<cache_dir()>/scores.sqlite`: one zlib-compressed
JSON `ScoredExample` per key (`LegacyScoreCache`), the key a sha256 of the schema version, the
model key (fingerprint|dtype), the chat template's fingerprint, the convention, the context
length, the top-k width and the example's id, prompt and response (`score_key`).

The key is a one-way hash and a record names its text, convention and top-k width but not its
model, template or context length, so a record is carried over under the setting that gives its
key back exactly, among these candidates:

- every setting the store already holds (its `setting.json`: one scored since the store exists,
  or read through from the old file before this step replaced that);
- with `--model NAME`: NAME's fingerprint under each dtype, its chat template and its context
  length (and each length the store knows).

A record no candidate gives back cannot be placed without knowing what scored it. The old file
is then kept as `scores.sqlite.migrated` (never deleted) with every record in it;
`python -m core migrate --model NAME` reads those kept files too, for the records NAME scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from core.data.records import ScoredExample
from core.io import MIGRATED_SUFFIX, MigrationStep, cache_dir, migrated_name
from core.kvstore import KVCache
from core.scoring.cache import (
    SCHEMA_VERSION,
    STORE_DIR,
    HasContent,
    ScoreCache,
    ScoreSetting,
    content_key,
)
from core.scoring.store import ScoreStore
from core.scoring.tokens import TokenScores

LEGACY_FILE = "scores.sqlite"
#: An old cache file a migration kept (`migrated_name`): scores.sqlite.migrated[-N]
_KEPT = re.compile(rf"^{re.escape(LEGACY_FILE + MIGRATED_SUFFIX)}(-\d+)?$")
DEFAULT_TOP_K = 5  # the width a record without tokens is tried at, besides the store's
_BATCH = 256  # records per store write


def score_key(
    model_key: str,
    template_fp: str,
    convention: str,
    max_length: int,
    top_k: int,
    example: HasContent,
) -> str:
    """Key of one example under one setting in the old SQLite cache."""
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
    """The old cache: key (`score_key`) -> ScoredExample in `scores.sqlite` (zlib-compressed
    JSON). What `migrate_score_cache` reads, what tests write old caches with, and the
    benchmark's baseline."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(
            Path(path) if path else cache_dir() / LEGACY_FILE,
            "scores",
            encode=_encode,
            decode=_decode,
        )


def legacy_score_note(root: str | Path | None = None) -> str | None:
    """One line for the user when `<root>/scores.sqlite` (root: the cache folder) is there and
    not migrated; None otherwise. A stat, cheap enough for every page run."""
    path = Path(root or cache_dir()) / LEGACY_FILE
    if not path.is_file():
        return None
    return (
        f"An old score cache ({path}) has not been migrated: its scores are not used. "
        "Run `python -m core migrate` to copy them into the score store."
    )


# --------------------------------------------------------------------------- migration


@dataclass(frozen=True)
class KeyParts:
    """What an old key holds besides the record's own text, convention and top-k: one
    candidate setting for an old record."""

    model_key: str
    template_fp: str
    max_length: int


@dataclass
class _Tally:
    copied: int = 0
    present: int = 0
    unknown: int = 0
    unreadable: int = 0
    settings: set[ScoreSetting] = field(default_factory=set)


def store_candidates(store: ScoreStore | None) -> tuple[set[KeyParts], set[int]]:
    """The key parts and top-k widths of every setting the store holds (`setting.json`)."""
    parts: set[KeyParts] = set()
    widths: set[int] = set()
    for key in store.settings() if store is not None else ():
        info = store.setting_info(key)
        if info is None:
            continue
        try:
            model, template, length = info["model_key"], info["template_fp"], info["max_length"]
            parts.add(KeyParts(str(model), str(template), int(length)))
            widths.add(int(info["top_k"]))
        except (TypeError, KeyError, ValueError):
            continue
    return parts, widths


def _match(
    key: str, record: ScoredExample, candidates: Sequence[KeyParts], widths: Sequence[int]
) -> ScoreSetting | None:
    """The setting whose old key of `record` is `key`, if a candidate gives it back."""
    ks = [len(record.top_ids[0])] if record.top_ids else list(widths)
    for parts in candidates:
        for k in ks:
            old = score_key(
                parts.model_key, parts.template_fp, record.convention, parts.max_length, k, record
            )
            if old == key:
                return ScoreSetting(
                    parts.model_key, parts.template_fp, record.convention, parts.max_length, k
                )
    return None


@contextmanager
def _old_rows(path: Path, *, dry_run: bool) -> Iterator[Iterator[tuple[str, bytes]]]:
    """The (key, value) rows of an old cache file. Without a journal beside it, it is opened
    immutable (no -wal / -shm file made). A journal with rows (left by a process that died) is
    folded into the file first, as closing the old cache did, and read through a normal
    connection; in a dry run a copy of both is read instead."""
    wal = Path(f"{path}-wal")
    with tempfile.TemporaryDirectory(prefix="plens-migrate-") as tmp:
        if wal.is_file() and wal.stat().st_size:
            if dry_run:
                source = Path(tmp) / path.name
                shutil.copy2(path, source)
                shutil.copy2(wal, Path(f"{source}-wal"))
                db = sqlite3.connect(source, timeout=30)
            else:
                db = sqlite3.connect(path, timeout=30)
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            uri = f"file:{quote(str(path.resolve()))}?immutable=1"
            db = sqlite3.connect(uri, uri=True, timeout=30)
        with closing(db):
            yield iter(db.execute("SELECT key, value FROM scores"))


def _flush(
    store: ScoreStore | None,
    cache: ScoreCache | None,
    setting: ScoreSetting,
    records: list[ScoredExample],
    tally: _Tally,
) -> list[str]:
    """Write the records the store lacks under `setting` (without a cache, a dry run: count
    them only)."""
    keys = {content_key(r): r for r in records}
    have = store.stored_keys(setting.key(), keys) if store is not None else set()
    new = [r for k, r in keys.items() if k not in have]
    tally.present += len(records) - len(new)
    tally.copied += len(new)
    if new:
        tally.settings.add(setting)
    records.clear()
    if cache is None or not new:
        return []
    return cache.put(setting, TokenScores.from_examples(new, top_k=setting.top_k))


def _convert(
    path: Path,
    store: ScoreStore | None,
    cache: ScoreCache | None,
    candidates: Sequence[KeyParts],
    widths: Sequence[int],
    *,
    dry_run: bool,
) -> tuple[_Tally, list[str]]:
    """Copy the records of one old file that a candidate places into the store (with
    `cache` None, a dry run: count them)."""
    tally = _Tally()
    warnings: list[str] = []
    pending: dict[ScoreSetting, list[ScoredExample]] = {}
    with _old_rows(path, dry_run=dry_run) as rows:
        for key, value in rows:
            try:
                record = _decode(value)
                setting = _match(str(key), record, candidates, widths)
                if setting is not None:
                    TokenScores.from_examples([record], top_k=setting.top_k)  # well-formed?
            except (zlib.error, ValueError, TypeError, KeyError):
                tally.unreadable += 1
                continue
            if setting is None:
                tally.unknown += 1
                continue
            batch = pending.setdefault(setting, [])
            batch.append(record)
            if len(batch) >= _BATCH:
                warnings += _flush(store, cache, setting, batch, tally)
    for setting, batch in pending.items():
        warnings += _flush(store, cache, setting, batch, tally)
    return tally, warnings


def _set_aside(path: Path) -> Path:
    """Rename the old file to `<name>.migrated` (a journal that still holds rows goes with it,
    as `<name>.migrated-wal`, where SQLite looks for it; an empty one and the -shm index, which
    SQLite rebuilds, are removed)."""
    aside = migrated_name(path)
    os.replace(path, aside)
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if wal.is_file():
        if wal.stat().st_size:
            os.replace(wal, Path(f"{aside}-wal"))
        else:
            wal.unlink()
    shm.unlink(missing_ok=True)
    return aside


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def old_score_files(root: str | Path, *, kept: bool = False) -> list[Path]:
    """The old cache `<root>/scores.sqlite` if it is there, and with `kept` the old caches a
    migration kept (`scores.sqlite.migrated`, `scores.sqlite.migrated-2`, ...)."""
    root = Path(root)
    found = [root / LEGACY_FILE] if (root / LEGACY_FILE).is_file() else []
    if kept:
        pattern = f"{LEGACY_FILE}{MIGRATED_SUFFIX}*"
        found += [p for p in sorted(root.glob(pattern)) if _KEPT.match(p.name) and p.is_file()]
    return found


def migrate_score_cache(
    root: str | Path,
    *,
    models: Iterable[KeyParts] = (),
    dry_run: bool = False,
) -> list[MigrationStep]:
    """Carry `<root>/scores.sqlite` (root: the cache folder) into the store `<root>/scores`
    and keep the old file as `scores.sqlite.migrated`; with `models` (the key parts of models
    named with `--model`), also the records of kept `.migrated` files that those place. Each
    file gives one line; a dry run writes and renames nothing."""
    root = Path(root)
    old = root / LEGACY_FILE
    given = list(models)
    files = old_score_files(root, kept=bool(given))
    if not files:
        return []
    store_root = root / STORE_DIR
    cache = None if dry_run else ScoreCache(store_root)
    store = cache.store if cache is not None else None
    if store is None and store_root.is_dir():
        store = ScoreStore(store_root)
    parts, widths = store_candidates(store)
    lengths = {p.max_length for p in parts}
    parts |= set(given) | {KeyParts(m.model_key, m.template_fp, n) for m in given for n in lengths}
    candidates = sorted(parts, key=lambda p: (p.model_key, p.template_fp, p.max_length))
    tries = sorted(widths | {DEFAULT_TOP_K})
    steps = []
    for path in files:
        try:
            tally, warnings = _convert(path, store, cache, candidates, tries, dry_run=dry_run)
        except sqlite3.Error as exc:
            text = f"{path}: cannot read it as an old score cache ({exc}); left as it is"
            steps.append(MigrationStep(path, text, converted=False))
            continue
        aside = path
        if path == old:
            aside = migrated_name(path) if dry_run else _set_aside(path)
        text = _score_line(path, aside, tally, warnings, dry_run)
        steps.append(MigrationStep(path, text, converted=bool(tally.copied) or path == old))
    return steps


def _score_line(path: Path, aside: Path, tally: _Tally, warnings: list[str], dry_run: bool) -> str:
    would = "would copy" if dry_run else "copied"
    text = f"{path}: {would} {_plural(tally.copied, 'scored example')}"
    if tally.settings:
        text += f" ({_plural(len(tally.settings), 'scoring setting')})"
    text += " into the score store"
    if tally.present:
        text += f", {tally.present} already there"
    if aside != path:
        text += f"; {'would keep' if dry_run else 'kept'} the old file as {aside.name}"
    left = []
    if tally.unknown:
        left.append(
            f"{_plural(tally.unknown, 'record')} of a model not known here (give it: "
            "`python -m core migrate --model NAME`)"
        )
    if tally.unreadable:
        left.append(f"{tally.unreadable} unreadable")
    if left:
        text += f"; left in {aside.name}: " + ", ".join(left)
    if warnings:
        text += f" ({'; '.join(warnings)})"
    return text
