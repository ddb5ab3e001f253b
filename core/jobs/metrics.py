"""The records of a run's `metrics.jsonl`, typed: one frozen dataclass per "kind".

Training, evaluation and data generation append one JSON object per line
(`core.jobs.runfiles.append_metric`); the pages, the protocol and the report read them back.
This module is the one description of those records:

- ``start``: a (re)start of training (`step`, `max_steps`, `epochs`, `world_size`: the number
  of training processes) or of a generation run (`done`, `total` prompts);
- ``train``: one logged training step (`loss`, `lr`, `epoch`; `grad_norm`, `token_accuracy`,
  `entropy`, `num_tokens` when the trainer logs them; the token weights trained with since the
  last record: `weight_mean` over the tokens in the loss, `weight_share` = sum of weights /
  response tokens (masked ones included), `weight_hist` (counts in 10 equal bins over [0, 1],
  `core.training.losses.WEIGHT_BINS`) and, for the KL losses, `kl`, the mean KL per token);
- ``checkpoint``: a checkpoint written at `step`;
- ``eval``: one task's metric at a step (`task`, `metric`, `value`, `n` items, `role` "target"
  or "ood");
- ``eval_summary``: TI / BWT at a step, with their paired 95% intervals over items, and the
  round's `seconds`;
- ``data``: what reached the trainer (source, mask, token counts; free-form `fields`);
- ``generate`` / ``done``: generation progress counts, or the end of a run (free-form
  `fields`, e.g. `set`, `train_loss_last`).

`record.to_dict()` is the exact JSON line the files hold (optional fields that are None are
left out); `parse_records()` reads lines back, skipping unknown kinds and malformed records, so
a file from an older or newer writer never breaks a reader.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="MetricRecord")


@dataclass(frozen=True)
class MetricRecord:
    """Base: every record has a kind, a wall-clock `time` and (mostly) a training `step`."""

    KIND: ClassVar[str] = ""
    #: fields written only when not None
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    step: int | None = None
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record's metrics.jsonl line."""
        out: dict[str, Any] = {"kind": self.KIND}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "fields":
                out.update(value)
            elif value is not None or f.name not in self.OPTIONAL:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """The record of one parsed line. Keys it does not know go to `fields` where the kind has
        it and are ignored otherwise (a newer writer may add some)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names and k != "fields"}
        if "fields" in names:
            values["fields"] = {k: v for k, v in data.items() if k not in names and k != "kind"}
        if values.get("step") is not None:
            values["step"] = int(values["step"])
        values["time"] = float(values.get("time") or 0.0)  # unknown, not "now"
        return cls(**values)


@dataclass(frozen=True)
class StartRecord(MetricRecord):
    KIND: ClassVar[str] = "start"
    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "step",
        "max_steps",
        "epochs",
        "world_size",
        "done",
        "total",
    )

    max_steps: int | None = None
    epochs: float | None = None
    #: training processes (1 unless launched with `accelerate launch --num_processes N`)
    world_size: int | None = None
    done: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class TrainRecord(MetricRecord):
    KIND: ClassVar[str] = "train"
    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "grad_norm",
        "token_accuracy",
        "entropy",
        "num_tokens",
        "weight_mean",
        "weight_share",
        "weight_hist",
        "kl",
    )

    epoch: float = 0.0
    loss: float | None = None
    lr: float = 0.0
    grad_norm: float | None = None
    token_accuracy: float | None = None
    entropy: float | None = None
    num_tokens: float | None = None
    weight_mean: float | None = None
    weight_share: float | None = None
    weight_hist: list[int] | None = None
    kl: float | None = None


@dataclass(frozen=True)
class CheckpointRecord(MetricRecord):
    KIND: ClassVar[str] = "checkpoint"


@dataclass(frozen=True)
class EvalRecord(MetricRecord):
    KIND: ClassVar[str] = "eval"

    task: str = ""
    metric: str = ""
    value: float | None = None
    n: int = 0
    role: str = ""


@dataclass(frozen=True)
class EvalSummaryRecord(MetricRecord):
    KIND: ClassVar[str] = "eval_summary"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("bwt_low", "bwt_high", "ti_low", "ti_high", "seconds")

    bwt: float | None = None
    ti: float | None = None
    nll_easy_change: float | None = None
    notes: list[str] = field(default_factory=list)
    #: paired 95% interval over items of BWT and TI (%), when the results carry per-item scores
    bwt_low: float | None = None
    bwt_high: float | None = None
    ti_low: float | None = None
    ti_high: float | None = None
    #: how long the round took (the training callback's rounds; training ETAs leave it out)
    seconds: float | None = None


@dataclass(frozen=True)
class FreeFormRecord(MetricRecord):
    """A record whose facts vary by writer: they are kept in `fields`, written flat."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("step",)

    fields: dict[str, Any] = field(default_factory=dict)


class DataRecord(FreeFormRecord):
    KIND: ClassVar[str] = "data"


class GenerateRecord(FreeFormRecord):
    KIND: ClassVar[str] = "generate"


class DoneRecord(FreeFormRecord):
    KIND: ClassVar[str] = "done"


KINDS: dict[str, type[MetricRecord]] = {
    cls.KIND: cls
    for cls in (
        StartRecord,
        TrainRecord,
        CheckpointRecord,
        EvalRecord,
        EvalSummaryRecord,
        DataRecord,
        GenerateRecord,
        DoneRecord,
    )
}


def parse_record(data: Any) -> MetricRecord | None:
    """The typed record of one metrics.jsonl object, or None (unknown kind, wrong types)."""
    if not isinstance(data, dict):
        return None
    cls = KINDS.get(str(data.get("kind")))
    if cls is None:
        return None
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError):
        return None


def parse_records(rows: Iterable[Any]) -> list[MetricRecord]:
    """The typed records among `rows` (see `parse_record`), in order."""
    return [r for r in (parse_record(row) for row in rows) if r is not None]


def of_kind(records: Iterable[MetricRecord], kind: type[R]) -> list[R]:
    """The records of one kind, in order."""
    return [r for r in records if isinstance(r, kind)]


def as_records(rows: Iterable[Any]) -> list[MetricRecord]:
    """`rows` as typed records: records pass through, dicts are parsed (see `parse_record`)."""
    out = []
    for row in rows:
        record = row if isinstance(row, MetricRecord) else parse_record(row)
        if record is not None:
            out.append(record)
    return out


def loss_by_step(records: Iterable[Any]) -> dict[int, float]:
    """Training loss per step; the latest record of a step wins (a resumed run logs some steps
    twice)."""
    return {
        int(r.step or 0): float(r.loss)
        for r in of_kind(as_records(records), TrainRecord)
        if r.loss is not None
    }


def latest(records: Iterable[Any], kind: type[R]) -> R | None:
    """The last record of one kind, or None."""
    found = of_kind(as_records(records), kind)
    return found[-1] if found else None
