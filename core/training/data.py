"""What reaches the trainer: pre-tokenized (input_ids, labels) rows, with labels from
`core.masking.rules.labels_for` and nowhere else."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data.records import ScoredExample
from core.data.sources import load_source
from core.data.userdata import load_user_data
from core.errors import DataError, LensError
from core.jobs.runfiles import StatusFn
from core.jobs.state import as_reporter
from core.model.encoding import encode_pair
from core.scoring.tokens import TokenScores
from core.training.config import TrainConfig

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The pre-tokenized rows the trainer sees, and what building them did."""

    rows: list[dict[str, Any]]
    source: str
    method: str
    mask: str
    tau: float | None = None
    n_examples: int = 0
    n_response_tokens: int = 0
    n_trainable_tokens: int = 0
    n_truncated: int = 0
    n_fully_masked: int = 0
    fully_masked_ids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    scores: str = ""

    @property
    def labels_sha256(self) -> str:
        """sha256 of the rows the trainer sees: each row's id, input ids and labels, in order.

        Two runs (or the processes of one multi-process run) with the same digest trained on the
        same tokens under the same mask."""
        import hashlib

        import numpy as np

        digest = hashlib.sha256()
        for row in self.rows:
            ids = np.asarray(row["input_ids"], dtype="<i8")
            labels = np.asarray(row["labels"], dtype="<i8")
            name = str(row["id"]).encode("utf-8")
            digest.update(np.asarray([len(name), ids.size, labels.size], dtype="<i8").tobytes())
            digest.update(name)
            digest.update(ids.tobytes())
            digest.update(labels.tobytes())
        return digest.hexdigest()

    @property
    def masked_share(self) -> float:
        """Pooled share of response tokens that carry no loss."""
        if not self.n_response_tokens:
            return float("nan")
        return 1.0 - self.n_trainable_tokens / self.n_response_tokens

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for summary.json and the log."""
        share = self.masked_share
        return {
            "source": self.source,
            "method": self.method,
            "mask": self.mask,
            "tau": self.tau,
            "n_examples": self.n_examples,
            "n_response_tokens": self.n_response_tokens,
            "n_trainable_tokens": self.n_trainable_tokens,
            "masked_share": None if math.isnan(share) else share,
            "n_fully_masked": self.n_fully_masked,
            "fully_masked_ids": self.fully_masked_ids[:100],
            "n_truncated": self.n_truncated,
            "n_skipped": len(self.skipped),
            "skipped": [{"id": i, "reason": r} for i, r in self.skipped[:100]],
            "scores": self.scores,
            "labels_sha256": self.labels_sha256,
        }

    def describe(self) -> str:
        """One line for the log and the UI."""
        share = self.masked_share
        text = (
            f"{self.n_examples} examples, {self.n_response_tokens} response tokens, "
            f"{self.n_trainable_tokens} trained"
        )
        if self.method != "gt" or share > 0:
            text += f" ({100 * share:.1f}% masked, {self.mask})"
        text += f"; {self.n_fully_masked} examples have no trainable token (kept, no loss)"
        if self.n_truncated:
            text += f"; {self.n_truncated} truncated to max_length"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped"
        return text


def _is_masked_export(folder: Path) -> bool:
    from core.masking.export import MANIFEST_JSON, MASKED_JSONL  # lazy: heavy (pyarrow)

    return (folder / MANIFEST_JSON).is_file() and (folder / MASKED_JSONL).is_file()


def _generated_examples_file(folder: Path) -> Path | None:
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") not in ("self_output", "rephrase"):
        return None
    return folder / str(manifest.get("examples", "examples.jsonl"))


def load_training_examples(config: TrainConfig) -> tuple[Any, list[dict[str, Any]] | None]:
    """(Dataset of examples, None), or (None, masked-export rows) for a masked export folder."""

    if config.task:
        return load_source(task=config.task, split=config.split, limit=config.limit), None
    path = Path(str(config.data)).expanduser()
    if path.is_dir():
        if _is_masked_export(path):
            from core.masking.export import load_masked_dataset  # lazy: heavy (pyarrow)

            if config.method != "gt":
                raise LensError(
                    f"{path.name} is a masked export: its labels already carry a mask. Train it "
                    "with method gt (every label as given), or mask the original data instead."
                )
            rows, _manifest = load_masked_dataset(path)
            return None, rows[: config.limit] if config.limit else rows
        examples_file = _generated_examples_file(path)
        if examples_file is None:
            raise DataError(
                f"{path} is neither a masked export (manifest.json + masked.jsonl) nor a "
                "generated set (manifest.json of kind self_output/rephrase)."
            )
        return load_user_data(
            examples_file, "prompt", "response", id_col="id", limit=config.limit
        ), None
    if not path.is_file():
        raise DataError(f"Training data not found: {path}")
    return (
        load_user_data(
            path, config.prompt_col, config.response_col, id_col=config.id_col, limit=config.limit
        ),
        None,
    )


def _unscored_record(example: Any, enc: Any) -> Any:
    """A `ScoredExample` shell (ids + response start, no scores) so GT labels also come from
    `labels_for`."""

    return ScoredExample(
        id=example.id,
        prompt=example.prompt,
        response=example.response,
        convention="prompt",
        token_ids=list(enc.input_ids),
        tokens=[],
        response_start=enc.response_start,
        logprob=[],
        rank=[],
        top_ids=[],
        top_tokens=[],
        top_logprobs=[],
        truncated=enc.truncated,
    )


def _score_for_training(
    lm: Any, examples: Sequence[Any], max_length: int, status: StatusFn | None
) -> tuple[list[Any], list[tuple[str, str]], str]:
    """Score with the original model, reusing the score cache; ids equal `encode_pair`'s at
    `max_length`. Examples that fit the model context are looked up at the model's context
    length first (the key the app uses); only longer ones are scored again truncated."""
    from core.scoring.cache import ScoreCache  # lazy: heavy (pyarrow)
    from core.scoring.score import score_examples  # lazy: heavy (pyarrow)

    cache = ScoreCache()
    reporter = as_reporter(status)

    def progress(done: int, total: int) -> None:
        if reporter is not None:
            reporter.preparing("scoring with the original model", done, total, "examples")

    full = score_examples(lm, examples, cache=cache, progress=progress)
    by_id = {rec.id: rec for rec in full.examples}
    too_long = [
        ex for ex in examples if ex.id in by_id and len(by_id[ex.id].token_ids) > max_length
    ]
    n_cached, n_scored = full.n_cached, full.n_scored
    if too_long:
        cut = score_examples(lm, too_long, cache=cache, max_length=max_length, progress=progress)
        by_id.update({rec.id: rec for rec in cut.examples})
        n_cached, n_scored = n_cached + cut.n_cached, n_scored + cut.n_scored
    records = [by_id[ex.id] for ex in examples if ex.id in by_id]
    note = (
        f"{len(records)} scored under {lm.cache_key} ({n_cached} from cache, {n_scored} computed)"
    )
    return records, list(full.skipped), note


def build_training_data(
    config: TrainConfig, lm: Any, *, status: StatusFn | None = None
) -> TrainingData:
    """Load the configured examples and turn them into (input_ids, labels) rows."""
    import numpy as np

    from core.masking.rules import compute_masks, labels_for  # lazy: heavy (pyarrow)

    if status:
        status("loading data")
    dataset, export_rows = load_training_examples(config)
    if export_rows is not None:
        return _rows_from_export(config, export_rows)
    examples = list(dataset.examples)
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise DataError("Training examples must have unique ids.")
    data = TrainingData(rows=[], source=dataset.report.summary(), method=config.method, mask="none")
    if config.method == "gt":
        records = []
        for ex in examples:
            if not ex.response.strip():
                data.skipped.append((ex.id, "empty response"))
                continue
            enc = encode_pair(
                lm.tokenizer,
                ex.prompt,
                ex.response,
                max_length=min(config.max_length, lm.max_length),
            )
            records.append(_unscored_record(ex, enc))
        masks = [np.zeros(rec.n_response, dtype=bool) for rec in records]
    else:
        records, data.skipped, data.scores = _score_for_training(
            lm, examples, min(config.max_length, lm.max_length), status
        )
        if not records:
            raise DataError("No example could be scored, so there is nothing to train on.")
        result = compute_masks(TokenScores.from_examples(records), config.mask_config())
        masks = list(result.masks)
        data.mask = result.config.describe()
        data.tau = result.tau
    for rec, mask in zip(records, masks, strict=True):
        labels = labels_for(rec, np.asarray(mask, dtype=bool))
        _add_row(data, rec.id, list(rec.token_ids), labels, rec.n_response, rec.truncated)
    if not data.rows:
        raise DataError("No training examples left (all empty?).")
    return data


def _add_row(
    data: TrainingData,
    example_id: str,
    input_ids: list[int],
    labels: list[int],
    n_response: int,
    truncated: bool,
) -> None:
    trainable = sum(1 for t in labels if t != IGNORE_INDEX)
    data.rows.append(
        {"id": example_id, "input_ids": input_ids, "labels": labels, "n_response": n_response}
    )
    data.n_examples += 1
    data.n_response_tokens += n_response
    data.n_trainable_tokens += trainable
    data.n_truncated += int(truncated)
    if trainable == 0:
        data.n_fully_masked += 1
        data.fully_masked_ids.append(example_id)


def _rows_from_export(config: TrainConfig, rows: list[dict[str, Any]]) -> TrainingData:
    """Rows of a masked export: its labels were built by `labels_for` when it was exported."""
    data = TrainingData(
        rows=[], source=f"masked export {Path(str(config.data)).name}", method="gt", mask="export"
    )
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if len(ids) != len(labels):
            raise DataError(f"Export row {row.get('id')!r}: input_ids and labels differ in length.")
        truncated = len(ids) > config.max_length
        n_response = int(row.get("n_response", len(ids) - int(row.get("response_start", 0))))
        if truncated:
            ids, labels = ids[: config.max_length], labels[: config.max_length]
            n_response = max(0, len(ids) - int(row.get("response_start", 0)))
        _add_row(data, str(row["id"]), ids, labels, n_response, truncated)
    if not data.rows:
        raise DataError("The masked export holds no examples.")
    masked = data.n_response_tokens - data.n_trainable_tokens
    data.mask = f"from export ({masked} response tokens masked)"
    return data
