"""The typed metrics.jsonl records (core.jobs.metrics): what writers put on disk parses back to
the same record, lines in the format earlier versions wrote still read, and what is not a known
record is skipped rather than breaking a page."""

from __future__ import annotations

import json

from core.jobs.metrics import (
    DataRecord,
    DoneRecord,
    EvalRecord,
    EvalSummaryRecord,
    StartRecord,
    TrainRecord,
    loss_by_step,
    of_kind,
    parse_record,
    parse_records,
)
from core.jobs.runfiles import append_metric, read_metrics, read_records, run_progress


def test_every_kind_round_trips_through_the_file(tmp_path):
    written = [
        StartRecord(step=0, time=1.0, max_steps=4, epochs=1.0),
        TrainRecord(step=1, time=2.0, epoch=0.25, loss=2.5, lr=1e-3, grad_norm=0.7),
        EvalRecord(step=1, time=2.5, task="arc_easy", metric="acc", value=None, n=12, role="ood"),
        EvalSummaryRecord(step=1, time=2.6, bwt=-8.3, ti=None, notes=["no target score"]),
        DataRecord(time=3.0, fields={"n_examples": 4, "masked_share": 0.25}),
        DoneRecord(step=4, time=9.0, fields={"train_loss_last": 1.9}),
    ]
    for record in written:
        append_metric(tmp_path, record)
    assert read_records(tmp_path) == written
    raw = read_metrics(tmp_path)
    assert raw[1] == {
        "kind": "train",
        "step": 1,
        "time": 2.0,
        "epoch": 0.25,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.7,
    }
    assert raw[2]["value"] is None and "value" in raw[2]  # a None score is still written
    assert raw[4] == {"kind": "data", "time": 3.0, "n_examples": 4, "masked_share": 0.25}


def test_lines_in_the_earlier_format_still_read_and_junk_is_skipped(tmp_path):
    lines = [
        {"kind": "start", "step": 0, "max_steps": 6, "epochs": 2.0, "time": 10.0},
        {"kind": "train", "step": 2, "epoch": 0.3, "time": 12.0, "loss": 3.0, "lr": 0.1},
        {"kind": "train", "step": 2, "epoch": 0.3, "time": 14.0, "loss": 2.0, "lr": 0.1},
        {"kind": "future_kind", "step": 3},
        {"kind": "train", "step": "x"},
        ["not", "an", "object"],
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + '{"kind": "train", "st'
    )
    records = read_records(tmp_path)
    assert [type(r) for r in records] == [StartRecord, TrainRecord, TrainRecord]
    assert loss_by_step(records) == {2: 2.0}  # the latest record of a resumed step wins
    progress = run_progress(read_metrics(tmp_path))  # raw dicts and typed records alike
    assert (progress.step, progress.max_steps, progress.last_loss) == (2, 6, 2.0)
    assert progress.eta_seconds == (6 - 2) * (14.0 - 10.0) / 2
    newer = parse_record({"kind": "eval", "task": "mbpp", "added_later": 1})
    assert newer is not None and newer.task == "mbpp" and newer.time == 0.0
    assert of_kind(parse_records(lines), TrainRecord)[0].loss == 3.0
