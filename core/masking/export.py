"""Exporting a masked training set (JSONL, a `datasets` folder and a manifest), reading it back,
and the `mask` command's file-to-file path."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core import __version__ as CORE_VERSION
from core.data.records import ScoredExample
from core.errors import LensError
from core.io import (
    cache_dir,
    iter_jsonl,
    read_jsonl,
    replace_dir_atomic,
    write_bytes_atomic,
    write_text_atomic,
)
from core.masking.config import MaskConfig
from core.masking.rules import (
    IGNORE_INDEX,
    MaskResult,
    MaskStats,
    compute_masks,
    mask_stats,
)
from core.scoring.tokens import TokenScores

MANIFEST_VERSION = 1

MASKED_JSONL = "masked.jsonl"
HF_DATASET_DIR = "hf_dataset"
MANIFEST_JSON = "manifest.json"


# --------------------------------------------------------------------------- export


def _first_difference(a: np.ndarray, b: np.ndarray, offsets: np.ndarray) -> int:
    """The example (by `offsets`) of the first position where `a` and `b` differ."""
    flat = int(np.flatnonzero(a != b)[0])
    return int(np.searchsorted(offsets, flat, side="right")) - 1


def _check_alignment(scores: TokenScores, result: MaskResult) -> None:
    """Refuse masks of other examples, another order or other scores (one-line errors)."""
    if len(scores) != len(result):
        raise LensError(f"{len(scores)} examples but masks for {len(result)}")
    for ex_id, mask_id in zip(scores.ids, result.ids, strict=True):
        if ex_id != mask_id:
            raise LensError(
                f"examples and masks are in a different order ({ex_id!r} vs {mask_id!r})"
            )
    if not np.array_equal(scores.offsets, result.index.offsets):
        bad = int(np.flatnonzero(scores.n_response != result.index.n_response)[0])
        raise LensError(f"example {scores.ids[bad]!r}: mask length does not match its response")
    if not np.array_equal(scores.ppl(), result.index.ppl):
        bad = _first_difference(scores.ppl(), result.index.ppl, scores.offsets)
        raise LensError(f"example {scores.ids[bad]!r}: masks were computed from different scores")


def _flat_labels(scores: TokenScores, result: MaskResult) -> np.ndarray:
    """`labels_for` of every example at once, aligned with `scores.token_ids` (int64)."""
    labels = scores.token_ids.astype(np.int64)
    lengths = np.diff(scores.token_offsets)
    example = np.repeat(np.arange(len(scores), dtype=np.int64), lengths)
    position = np.arange(labels.size, dtype=np.int64) - scores.token_offsets[:-1][example]
    labels[position < scores.response_start[example]] = IGNORE_INDEX
    starts = scores.token_offsets[:-1] + scores.response_start
    response = np.arange(scores.n_tokens, dtype=np.int64)
    response += np.repeat(starts - scores.offsets[:-1], scores.n_response)
    labels[response[result.flat]] = IGNORE_INDEX
    return labels


def _masked_columns(scores: TokenScores, result: MaskResult) -> tuple[np.ndarray, np.ndarray]:
    """Flat labels and the masked count per example, after the alignment checks."""
    _check_alignment(scores, result)
    return _flat_labels(scores, result), scores.per_example_count(result.flat)


def _iter_rows(
    scores: TokenScores, labels: np.ndarray, n_masked: np.ndarray
) -> Iterator[dict[str, Any]]:
    """The `masked_rows` rows, one at a time."""
    off, start, n_resp = scores.token_offsets, scores.response_start, scores.n_response
    for i in range(len(scores)):
        a, b = int(off[i]), int(off[i + 1])
        yield {
            "id": scores.ids[i],
            "messages": [
                {"role": "user", "content": scores.prompts[i]},
                {"role": "assistant", "content": scores.responses[i]},
            ],
            "input_ids": scores.token_ids[a:b].tolist(),
            "labels": labels[a:b].tolist(),
            "response_start": int(start[i]),
            "n_response": int(n_resp[i]),
            "n_masked": int(n_masked[i]),
        }


def _arrow_columns(scores: TokenScores, labels: np.ndarray, n_masked: np.ndarray) -> Any:
    """The export rows as one Arrow table, built from the columns (the same table, column
    types and values as `datasets.Dataset.from_list` of `masked_rows`, which stores the column
    named input_ids as int32)."""
    import pyarrow as pa

    n = len(scores)
    contents = [
        text for pair in zip(scores.prompts, scores.responses, strict=True) for text in pair
    ]
    roles = pa.array(["user", "assistant"] * n, type=pa.string())
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
        pa.StructArray.from_arrays(
            [roles, pa.array(contents, type=pa.string())], ["role", "content"]
        ),
    )
    token_offsets = pa.array(scores.token_offsets.astype(np.int32))
    return pa.table(
        {
            "id": pa.array(list(scores.ids), type=pa.string()),
            "messages": messages,
            "input_ids": pa.ListArray.from_arrays(
                token_offsets, pa.array(scores.token_ids.astype(np.int32))
            ),
            "labels": pa.ListArray.from_arrays(token_offsets, pa.array(labels)),
            "response_start": pa.array(scores.response_start.astype(np.int64)),
            "n_response": pa.array(scores.n_response.astype(np.int64)),
            "n_masked": pa.array(n_masked.astype(np.int64)),
        }
    )


def masked_rows(scores: TokenScores, result: MaskResult) -> list[dict[str, Any]]:
    """The export rows: id, messages, input_ids, labels, response_start, n_response, n_masked
    (the labels of all examples computed at once, as `labels_for` gives them one by one)."""
    return list(_iter_rows(scores, *_masked_columns(scores, result)))


def _jsonl_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def masked_jsonl_bytes(scores: TokenScores, result: MaskResult) -> bytes:
    """The ``masked.jsonl`` content of an export (UTF-8, one `masked_rows` row per line)."""
    return _jsonl_bytes(_iter_rows(scores, *_masked_columns(scores, result)))


def _digest_part(h: Any, name: str, data: bytes) -> None:
    h.update(f"{name}:{len(data)}:".encode())
    h.update(data)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def scores_fingerprint(scores: TokenScores) -> str:
    """sha256 of the scored examples' content (ids, texts, sources, metas, token ids and texts,
    scores, in order), written into the manifest as ``source_fingerprint``.

    Computed on the columns, as fixed-width little-endian arrays plus canonical JSON of the texts and the text of every token id used,
    so scores read back from a ``score`` JSONL and the same scores taken from the app's store
    give the same fingerprint, whichever way they were produced. (Until issue #16 it hashed each
    record's JSON: about 3 ms per example, half a minute for 10k; exports written then carry
    that older digest.) Top-k log-probs count as float32, the precision the store keeps.
    """
    s = scores
    h = hashlib.sha256(b"perplexity-lens scores v2\n")
    for name in ("ids", "prompts", "responses", "conventions", "sources", "metas"):
        _digest_part(h, name, _json_bytes(list(getattr(s, name))))
    arrays = {
        "token_offsets": (s.token_offsets, "<i8"),
        "token_ids": (s.token_ids, "<i8"),
        "response_start": (s.response_start, "<i8"),
        "offsets": (s.offsets, "<i8"),
        "logprob": (s.logprob, "<f8"),
        "rank": (s.rank, "<i8"),
        "top_ids": (s.top_ids, "<i8"),
        "top_logprobs": (s.top_logprobs, "<f4"),
        "truncated": (s.truncated, "u1"),
    }
    for name, (values, dtype) in arrays.items():
        array = np.ascontiguousarray(values, dtype=dtype)
        _digest_part(h, f"{name}{list(array.shape)}", array.tobytes())
    ids = np.concatenate([s.token_ids.reshape(-1), s.top_ids.reshape(-1)]).astype(np.int64)
    if ids.size and ids.min() >= 0:
        used = np.flatnonzero(np.bincount(ids))
    else:  # empty, or ids no tokenizer has (a hand-made file): sort instead
        used = np.unique(ids)
    _digest_part(h, "vocab", _json_bytes([used.tolist(), s.texts(used) if used.size else []]))
    return h.hexdigest()


def _build_manifest(
    result: MaskResult, stats: MaskStats, extra: Mapping[str, Any] | None, content_sha: str
) -> dict[str, Any]:
    cfg = result.config
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "mode": cfg.mode,
        "tau": result.tau,
        "target_share": cfg.target_share,
        "percentile_rule": cfg.percentile_rule if cfg.mode == "percentile" else None,
        "k_percent": cfg.k_percent if cfg.mode == "percentile" else None,
        "seed": int(cfg.seed),
        **stats.summary(),
        "share_denominator": "response tokens pooled over the dataset, end-of-turn included",
        "files": {"jsonl": MASKED_JSONL, "hf_dataset": HF_DATASET_DIR},
        "masked_jsonl_sha256": content_sha,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "core_version": CORE_VERSION,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise LensError(f"manifest_extra key {key!r} clashes with a built-in manifest field")
        manifest[key] = value
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise LensError(f"manifest_extra is not JSON-serialisable: {err}") from None
    return manifest


def _prepare_target(out: Path, overwrite: bool) -> bool:
    """Check whether ``out`` may be written; return True if an existing export is replaced."""
    if out.exists() and not out.is_dir():
        raise LensError(f"{out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise LensError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not (out / MANIFEST_JSON).is_file():
        raise LensError(f"{out} is not empty and is not a masked export; refusing to replace it")
    return True


def export_masked_dataset(
    scores: TokenScores,
    mask_result: MaskResult,
    out_dir: str | os.PathLike[str],
    manifest_extra: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``masked.jsonl``, ``hf_dataset/`` and ``manifest.json`` into ``out_dir`` atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the
    end, so ``out_dir`` is either absent/unchanged or a complete export. An existing non-empty
    ``out_dir`` is refused unless ``overwrite=True``, and even then only if it holds a previous
    export (a ``manifest.json``), never an arbitrary directory. Returns ``out_dir``.
    Labels are computed for all examples at once and the `datasets` table is built straight
    from the arrays (the table `datasets.Dataset.from_list` makes of `masked_rows`).
    """
    import datasets  # heavy import, only needed here

    out = Path(out_dir).expanduser().absolute()
    _prepare_target(out, overwrite)
    labels, n_masked = _masked_columns(scores, mask_result)
    jsonl = _jsonl_bytes(_iter_rows(scores, labels, n_masked))
    table = _arrow_columns(scores, labels, n_masked)
    stats = mask_stats(mask_result)
    manifest = _build_manifest(
        mask_result, stats, manifest_extra, hashlib.sha256(jsonl).hexdigest()
    )

    manifest_bytes = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def build(folder: Path) -> None:
        write_bytes_atomic(folder / MASKED_JSONL, jsonl)
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            dataset = datasets.Dataset(datasets.table.InMemoryTable(table))
            dataset.save_to_disk(str(folder / HF_DATASET_DIR))
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        write_text_atomic(folder / MANIFEST_JSON, manifest_bytes)
        _prepare_target(out, overwrite)  # still allowed now that the export is complete

    return replace_dir_atomic(out, build)


def load_masked_dataset(
    out_dir: str | os.PathLike[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read an export back: the ``masked.jsonl`` rows and the manifest."""
    out = Path(out_dir).expanduser()
    manifest_path, jsonl_path = out / MANIFEST_JSON, out / MASKED_JSONL
    if not manifest_path.is_file() or not jsonl_path.is_file():
        raise LensError(f"{out} is not a masked export (no {MANIFEST_JSON} or {MASKED_JSONL})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LensError(f"{manifest_path}: not valid JSON ({err.msg})") from None
    rows = read_jsonl(jsonl_path, strict=True)
    if manifest.get("n_examples") is not None and manifest["n_examples"] != len(rows):
        raise LensError(
            f"{out}: manifest lists {manifest['n_examples']} examples but the file has {len(rows)}"
        )
    return rows, manifest


# --------------------------------------------------------------------------- CLI entry


def _read_scores(scores_path: str | os.PathLike[str]) -> tuple[TokenScores, list[str]]:
    """The scores of a scores JSONL (its rows read as `ScoredExample` records, then one
    `TokenScores`) and the distinct scoring models its rows name.

    ``python -m core score`` writes a ``model`` field (fingerprint and dtype of the scorer) on
    every row; files from elsewhere may lack it, and then the model list is empty.
    """
    path = Path(scores_path).expanduser()
    if not path.is_file():
        raise LensError(f"scores file not found: {path}")
    required = ("id", "token_ids", "response_start", "logprob")
    examples: list[ScoredExample] = []
    models: set[str] = set()
    for lineno, data in iter_jsonl(path, strict=True):
        if not isinstance(data, dict):
            raise LensError(f"{path}:{lineno}: expected a JSON object per line")
        missing = [k for k in required if k not in data]
        if missing:
            raise LensError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        try:
            ex = ScoredExample.from_dict(data)
        except (TypeError, ValueError) as err:
            raise LensError(f"{path}:{lineno}: not a scored example ({err})") from None
        if len(ex.logprob) != ex.n_response:
            raise LensError(
                f"{path}:{lineno}: {len(ex.logprob)} log-probs for {ex.n_response} response tokens"
            )
        examples.append(ex)
        if data.get("model"):
            models.add(str(data["model"]))
    if not examples:
        raise LensError(f"{path}: no scored examples")
    try:
        scores = TokenScores.from_examples(examples)
    except ValueError as err:
        raise LensError(f"the scored examples are inconsistent: {err}") from None
    return scores, sorted(models)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_mask_cli(
    scores_path: str, out_dir: str, config: MaskConfig, *, overwrite: bool = False
) -> dict[str, Any]:
    """``python -m core mask`` (`core.masking.config.MaskCommandConfig`): read scores, mask
    with ``config``, export; return the written manifest.

    The manifest records the scoring ``model`` (from the rows' ``model`` field; None for files
    that lack it; scores of several models are refused), the ``source_fingerprint``
    (`scores_fingerprint`) and the scores file's path and sha256.
    """
    scores, models = _read_scores(scores_path)
    if len(models) > 1:
        raise LensError(
            f"the scores come from {len(models)} different models ({', '.join(models)}); "
            "perplexities of different models are not comparable, so mask each file separately"
        )
    result = compute_masks(scores, config)
    path = Path(scores_path).expanduser()
    extra = {
        "model": models[0] if models else None,
        "source_fingerprint": scores_fingerprint(scores),
        "source_scores_path": str(path.absolute()),
        "source_scores_sha256": _file_sha256(path),
        "conventions": sorted(set(scores.conventions)),
        "sources": sorted(set(scores.sources)),
    }
    out = export_masked_dataset(scores, result, out_dir, extra, overwrite=overwrite)
    return load_masked_dataset(out)[1]


def export_path(name: str) -> Path:
    """An absolute path as given; a relative name goes under <cache>/masked/."""
    name = name.strip()
    if not name:
        raise LensError("give the export folder a name")
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if ".." in path.parts:
        raise LensError("a relative export name may not contain '..'; give an absolute path")
    return cache_dir() / "masked" / path
