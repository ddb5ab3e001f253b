"""Model-generated responses: a persistent store of on-demand generations, and discovery of
generated datasets (Self-Output, Rephrase) written by data-generation jobs.

On-demand generations (the Explore page's "generate the model's own answer") live in one SQLite
file, `<cache_dir()>/generated.sqlite`, one row per (model, example id, prompt, generation
settings). Generating is slow on a CPU (a few tokens per second), so a stored answer is reused
for the same model and settings and survives a server restart. The model key is
`LoadedModel.cache_key` (fingerprint + dtype): greedy output can change with the dtype.

Generated datasets are folders `<cache_dir()>/generated_sets/<name>/` holding

- `manifest.json`: {"format": 1, "kind": "self_output" | "rephrase", "data_key": ...,
  "model": ..., "model_fingerprint": ..., "settings": {...}, "created": ISO time,
  "examples": "examples.jsonl", "n_examples": N, "note": ...}, plus, for sets written by
  `core.datagen.run`, an optional "provenance" object (version, student/teacher model, seed,
  selection rule and convention, acceptance rate, prompts kept/dropped, tokens, seconds)
- `examples.jsonl`: one {"id", "prompt", "response", "meta"} per kept example; `prompt` is the
  ORIGINAL instruction (Rephrase pairs the rewritten answer with it), `id` the source example's id.

`data_key` names the data the set was made from, independent of how many examples a view
loads: "task:<name>/<split>" for built-in tasks (`task_data_key`) and "file:<content hash>" for
user files (`file_data_key`). Pages join a set's examples to the examples on screen by id and
prompt (`prompt_hash`), so a set made from the full split matches any first-N view of it.

No Streamlit imports here.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.data.records import Example, prompt_hash
from core.errors import DataError, LensError
from core.io import (
    cache_dir,
    iter_jsonl,
    replace_dir_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)
from core.kvstore import use_wal
from core.model.generation import Generation, GenerationConfig, generate_responses
from core.model.loading import LoadedModel
from core.scoring.score import score_examples
from core.scoring.tokens import TokenScores

GENERATED_SET_KINDS = ("self_output", "rephrase")
MANIFEST_FORMAT = 1
_SETTINGS_FIELDS = tuple(GenerationConfig.__dataclass_fields__)

ProgressFn = Callable[[int, int], None]


def settings_json(config: GenerationConfig) -> str:
    """Canonical JSON of the generation settings (part of every store key)."""
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_settings(settings: dict[str, Any]) -> GenerationConfig:
    """Rebuild a `GenerationConfig` from stored settings (unknown keys are ignored)."""
    return GenerationConfig(**{k: v for k, v in settings.items() if k in _SETTINGS_FIELDS})


def settings_label(config: GenerationConfig) -> str:
    """Short human description: "greedy, ≤256 tok" or "sampled T=0.7 top-p=0.95 seed 0, ≤256 tok"."""
    if not config.do_sample:
        return f"greedy, ≤{config.max_new_tokens} tok"
    return (
        f"sampled T={config.temperature:g} top-p={config.top_p:g} seed {config.seed}, "
        f"≤{config.max_new_tokens} tok"
    )


@dataclass(frozen=True)
class StoredGeneration:
    """One generated response for one example under one model and one set of settings."""

    model_key: str
    example_id: str
    prompt_hash: str
    settings: dict[str, Any]
    text: str
    n_tokens: int
    finished: bool
    created: float

    @property
    def config(self) -> GenerationConfig:
        """The generation settings as a `GenerationConfig`."""
        return config_from_settings(self.settings)

    @property
    def label(self) -> str:
        """Short description of the settings (see `settings_label`)."""
        return settings_label(self.config)

    def as_example(self, source: Example) -> Example:
        """The source example with this generation as its response (for scoring)."""
        meta = {**source.meta, "generation": dict(self.settings), "finished": self.finished}
        return Example(id=source.id, prompt=source.prompt, response=self.text, meta=meta)


def generation_key(model_key: str, example_id: str, prompt: str, config: GenerationConfig) -> str:
    """Store key of one (model, example, prompt, settings) combination."""
    payload = json.dumps([model_key, example_id, prompt_hash(prompt), settings_json(config)])
    return hashlib.sha256(payload.encode()).hexdigest()


class GenerationStore:
    """SQLite store of generated responses (`<cache_dir()>/generated.sqlite` by default)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "generated.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            use_wal(db)
            db.execute(
                "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, model_key TEXT, "
                "example_id TEXT, prompt_hash TEXT, settings TEXT, text TEXT, n_tokens INTEGER, "
                "finished INTEGER, created REAL)"
            )
            db.execute(
                "CREATE INDEX IF NOT EXISTS by_example ON generations (model_key, example_id)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def save(
        self, model_key: str, example: Example, config: GenerationConfig, generation: Generation
    ) -> StoredGeneration:
        """Store (or replace) the generation of `example` under `model_key` and `config`."""
        stored = StoredGeneration(
            model_key=model_key,
            example_id=example.id,
            prompt_hash=prompt_hash(example.prompt),
            settings=config.to_dict(),
            text=generation.text,
            n_tokens=generation.n_tokens,
            finished=generation.finished,
            created=time.time(),
        )
        row = (
            generation_key(model_key, example.id, example.prompt, config),
            model_key,
            example.id,
            stored.prompt_hash,
            settings_json(config),
            stored.text,
            stored.n_tokens,
            int(stored.finished),
            stored.created,
        )
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        return stored

    def find(
        self, model_key: str, example: Example, config: GenerationConfig
    ) -> StoredGeneration | None:
        """The stored generation for exactly this model, example, prompt and settings."""
        key = generation_key(model_key, example.id, example.prompt, config)
        with self._connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM generations WHERE key = ?", (key,)).fetchone()
        return _from_row(row) if row else None

    def for_example(
        self, model_key: str, example_id: str, prompt: str | None = None
    ) -> list[StoredGeneration]:
        """All generations of one example under `model_key`, newest first; with `prompt`, only
        those made from that exact prompt."""
        query = f"SELECT {_COLUMNS} FROM generations WHERE model_key = ? AND example_id = ?"
        args: list[str] = [model_key, example_id]
        if prompt is not None:
            query += " AND prompt_hash = ?"
            args.append(prompt_hash(prompt))
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created DESC, rowid DESC", args).fetchall()
        return [_from_row(r) for r in rows]

    def for_examples(
        self, model_key: str, examples: Sequence[Example]
    ) -> dict[str, list[StoredGeneration]]:
        """Generations of many examples (id -> newest first), matched on id AND prompt."""
        wanted = {ex.id: prompt_hash(ex.prompt) for ex in examples}
        found: dict[str, list[StoredGeneration]] = {}
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM generations WHERE model_key = ? ORDER BY created DESC, rowid DESC",
                (model_key,),
            ).fetchall()
        for row in rows:
            stored = _from_row(row)
            if wanted.get(stored.example_id) == stored.prompt_hash:
                found.setdefault(stored.example_id, []).append(stored)
        return found

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM generations").fetchone()[0])


_COLUMNS = "model_key, example_id, prompt_hash, settings, text, n_tokens, finished, created"


def _from_row(row: tuple[Any, ...]) -> StoredGeneration:
    model_key, example_id, p_hash, settings, text, n_tokens, finished, created = row
    return StoredGeneration(
        model_key=model_key,
        example_id=example_id,
        prompt_hash=p_hash,
        settings=json.loads(settings),
        text=text,
        n_tokens=int(n_tokens),
        finished=bool(finished),
        created=float(created),
    )


def generate_and_store(
    lm: LoadedModel,
    examples: Sequence[Example],
    config: GenerationConfig,
    *,
    chunk_size: int = 4,
    store: GenerationStore | None = None,
    progress: ProgressFn | None = None,
) -> list[StoredGeneration]:
    """The model's own response to each example's prompt, generated only where none is stored.

    Generates in chunks of `chunk_size` prompts and saves each chunk as it finishes, so an
    interrupted run keeps its finished answers. Returns one generation per example, in order
    (with `num_return_sequences > 1` only the first sample of each prompt is stored).
    """
    store = store or GenerationStore()
    key = lm.cache_key
    results: dict[int, StoredGeneration] = {}
    todo: list[int] = []
    for i, ex in enumerate(examples):
        found = store.find(key, ex, config)
        if found is None:
            todo.append(i)
        else:
            results[i] = found
    total = len(examples)
    if progress:
        progress(len(results), total)
    for start in range(0, len(todo), max(1, chunk_size)):
        chunk = todo[start : start + max(1, chunk_size)]
        outputs = generate_responses(lm, [examples[i].prompt for i in chunk], config)
        for i, samples in zip(chunk, outputs, strict=True):
            results[i] = store.save(key, examples[i], config, samples[0])
        if progress:
            progress(len(results), total)
    return [results[i] for i in range(total)]


# --------------------------------------------------------------------------------------------
# Generated datasets (Self-Output, Rephrase)
# --------------------------------------------------------------------------------------------


def task_data_key(task: str, split: str) -> str:
    """Data key of a built-in task split (independent of how many examples are loaded)."""
    return f"task:{task}/{split}"


def file_data_key(path: str | Path) -> str:
    """Data key of a user data file: a hash of its content, so renaming it changes nothing."""
    digest = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]
    return f"file:{digest}"


def generated_sets_dir() -> Path:
    """Folder holding one subfolder per generated dataset."""
    return cache_dir() / "generated_sets"


@dataclass
class GeneratedSet:
    """A generated dataset on disk (its manifest; examples are read on demand)."""

    name: str
    kind: str
    path: Path
    data_key: str
    model: str
    model_fingerprint: str
    created: str
    settings: dict[str, Any] = field(default_factory=dict)
    n_examples: int = 0
    note: str = ""
    examples_file: str = "examples.jsonl"
    # what made the set (core.datagen.run): version, models, seed, acceptance rate, time cost, ...
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The data-source label used in charts and tables ("self_output" or "rephrase")."""
        return self.kind

    def load_examples(self) -> list[Example]:
        """The set's examples (raises DataError if the file is missing or malformed)."""
        path = self.path / self.examples_file
        if not path.is_file():
            raise DataError(f"Generated set '{self.name}': {self.examples_file} is missing.")
        examples = []
        try:
            rows = list(iter_jsonl(path, strict=True))
        except LensError as exc:
            raise DataError(f"Generated set '{self.name}': {exc}") from None
        for n, row in rows:
            try:
                examples.append(
                    Example(
                        id=str(row["id"]),
                        prompt=str(row["prompt"]),
                        response=str(row["response"]),
                        meta=dict(row.get("meta") or {}),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(
                    f"Generated set '{self.name}': line {n} of {self.examples_file} is not a "
                    f"valid example ({type(exc).__name__}: {exc})."
                ) from None
        return examples


def _read_manifest(folder: Path) -> GeneratedSet:
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder.name}: unreadable manifest.json ({exc}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{folder.name}: manifest.json is not a JSON object.")
    kind = data.get("kind")
    if kind not in GENERATED_SET_KINDS:
        raise DataError(
            f"{folder.name}: kind {kind!r} is not one of {', '.join(GENERATED_SET_KINDS)}."
        )
    return GeneratedSet(
        name=folder.name,
        kind=kind,
        path=folder,
        data_key=str(data.get("data_key", "")),
        model=str(data.get("model", "")),
        model_fingerprint=str(data.get("model_fingerprint", "")),
        created=str(data.get("created", "")),
        settings=dict(data.get("settings") or {}),
        n_examples=int(data.get("n_examples", 0) or 0),
        note=str(data.get("note", "")),
        examples_file=str(data.get("examples", "examples.jsonl")),
        provenance=dict(data.get("provenance") or {}),
    )


def list_generated_sets(
    data_key: str | None = None,
    *,
    model_fingerprint: str | None = None,
    problems: list[str] | None = None,
) -> list[GeneratedSet]:
    """Generated datasets in `generated_sets_dir()`, newest first.

    With `data_key`, only sets made from that data; with `model_fingerprint`, only sets made by
    that model. Folders whose manifest cannot be read are skipped and described, one line each,
    in `problems` when a list is given (so the caller can show them).
    """
    root = generated_sets_dir()
    if not root.is_dir():
        return []
    sets = []
    for folder in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
        try:
            gset = _read_manifest(folder)
        except DataError as exc:
            if problems is not None:
                problems.append(str(exc))
            continue
        if data_key is not None and gset.data_key != data_key:
            continue
        if model_fingerprint is not None and gset.model_fingerprint != model_fingerprint:
            continue
        sets.append(gset)
    sets.sort(key=lambda s: s.created, reverse=True)
    return sets


def write_generated_set(
    name: str,
    kind: str,
    examples: Sequence[Example],
    *,
    data_key: str,
    model: str,
    model_fingerprint: str,
    settings: dict[str, Any] | None = None,
    note: str = "",
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a generated dataset folder atomically (the format `list_generated_sets` reads).

    Replaces an existing set of the same name. `provenance` (optional) is stored as the
    manifest's "provenance" object. Returns the folder.
    """
    if kind not in GENERATED_SET_KINDS:
        raise DataError(f"kind must be one of {', '.join(GENERATED_SET_KINDS)}, got {kind!r}.")
    if not name or "/" in name or name.startswith("."):
        raise DataError(f"Invalid generated-set name {name!r}.")
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "data_key": data_key,
        "model": model,
        "model_fingerprint": model_fingerprint,
        "settings": dict(settings or {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "examples": "examples.jsonl",
        "n_examples": len(examples),
        "note": note,
    }
    if provenance:
        manifest["provenance"] = dict(provenance)

    def build(folder: Path) -> None:
        write_jsonl_atomic(folder / "examples.jsonl", (ex.to_dict() for ex in examples))
        write_json_atomic(folder / "manifest.json", manifest)

    return replace_dir_atomic(generated_sets_dir() / name, build)


def match_examples(generated: Sequence[Example], shown: Sequence[Example]) -> dict[str, Example]:
    """Generated examples whose id AND prompt match an example in `shown` (id -> example)."""
    wanted = {ex.id: ex.prompt for ex in shown}
    return {ex.id: ex for ex in generated if wanted.get(ex.id) == ex.prompt}


def settings_group(stored: StoredGeneration, n_settings: int) -> str:
    """Data-source name of a generated answer: "generated", or with its settings if several."""
    return "generated" if n_settings == 1 else f"generated ({stored.label})"


def generate_and_score(
    lm: LoadedModel,
    example: Example,
    config: GenerationConfig,
    *,
    store: GenerationStore | None = None,
    cache: Any = None,
) -> tuple[StoredGeneration, Any]:
    """Generate (or reuse the stored) answer of `lm` to `example`, store it, and score it:
    (the stored answer, its `ScoredExample`, or None when it cannot be scored)."""
    [stored] = generate_and_store(lm, [example], config, store=store)
    run = score_examples(lm, [stored.as_example(example)], source="generated", cache=cache)
    return stored, (run.examples[0] if run.examples else None)


def answers_by_settings(
    found: dict[str, list[StoredGeneration]], sources: Sequence[Example]
) -> dict[str, list[tuple[StoredGeneration, Example]]]:
    """Stored answers (`found`: example id -> answers) paired with the examples they answer,
    grouped by generation settings."""
    source_of = {ex.id: ex for ex in sources}
    by_settings: dict[str, list[tuple[StoredGeneration, Example]]] = {}
    for ex_id, stored_list in found.items():
        for stored in stored_list:
            by_settings.setdefault(stored.label, []).append((stored, source_of[ex_id]))
    return by_settings


def answers_signature(by_settings: dict[str, list[tuple[StoredGeneration, Example]]]) -> str:
    """Short fingerprint of grouped answers (which, with which settings, made when)."""
    keys = sorted((s.example_id, s.label, s.created) for v in by_settings.values() for s, _ in v)
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


def score_answers_by_settings(
    lm: LoadedModel, by_settings: dict[str, list[tuple[StoredGeneration, Example]]], *, cache: Any
) -> dict[str, TokenScores]:
    """Each settings group of stored answers scored as a data source (`settings_group`)."""
    groups = {}
    for pairs in by_settings.values():
        name = settings_group(pairs[0][0], len(by_settings))
        answers = [stored.as_example(source) for stored, source in pairs]
        groups[name] = score_examples(lm, answers, source=name, cache=cache).scores
    return groups


def score_generated_sets(
    lm: LoadedModel, sets: dict[str, GeneratedSet], shown: Sequence[Example], *, cache: Any
) -> dict[str, TokenScores]:
    """Each generated set (kind -> set) matched to the examples `shown` and scored."""
    groups = {}
    for kind, gset in sets.items():
        matched = match_examples(gset.load_examples(), shown)
        groups[kind] = score_examples(lm, list(matched.values()), source=kind, cache=cache).scores
    return groups
