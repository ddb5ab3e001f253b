"""What a killed training attempt leaves, and how the next one starts from it: half-written
checkpoints go, and the run's records are cut back to the checkpoint it resumes from (no
processes here; tests/test_kill_resume.py kills real ones)."""

from __future__ import annotations

import json

from core.jobs.runfiles import append_metric, eval_round_path, read_metrics
from core.training.checkpoints import clean_partial, keep_newest, rewind_metrics
from core.training.trainer import last_complete_checkpoint


def _checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 8)
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_what_a_kill_left_half_written_goes_and_complete_checkpoints_stay(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 2)
    _checkpoint(root, 4)
    _checkpoint(root, 6, complete=False)  # written in place by an older version
    _checkpoint(root / ".staging", 8, complete=False)  # being written when the kill came
    _checkpoint(root, 0).rename(root / ".deleting-checkpoint-0")  # being deleted
    (root / "README.md").write_text("model card")
    removed = clean_partial(root)
    assert removed == [".deleting-checkpoint-0", ".staging", "checkpoint-6"]
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(root).name == "checkpoint-4"
    assert clean_partial(root) == [] and clean_partial(tmp_path / "none") == []
    keep_newest(root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "checkpoint-4"]


def test_a_resumed_run_records_every_step_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"kind": "data", "n_examples": 6},
        {"kind": "start", "step": 0, "max_steps": 8},
        {"kind": "eval", "step": 0, "task": "arc", "metric": "acc", "value": 0.5},
        {"kind": "eval_summary", "step": 0, "bwt": 0.0},
        *({"kind": "train", "step": s, "loss": 1.0} for s in (1, 2)),
        {"kind": "checkpoint", "step": 2},
        {"kind": "eval", "step": 3, "task": "arc", "metric": "acc", "value": 0.6},
        {"kind": "eval_summary", "step": 3, "bwt": 0.1},
        *({"kind": "train", "step": s, "loss": 1.0} for s in (3, 4)),
        {"kind": "done", "step": 4},
    ]
    for record in records:
        append_metric(run, record)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 5, "lo')  # cut off by the kill
    for step in (0, 3):
        eval_round_path(run, step).parent.mkdir(exist_ok=True)
        eval_round_path(run, step).write_text(json.dumps({"step": step}))
    assert rewind_metrics(run, 2) == 6  # eval, summary and 2 train at 3-4, done, the cut line
    kept = read_metrics(run)
    assert [(r["kind"], r.get("step")) for r in kept] == [
        ("data", None),
        ("start", 0),
        ("eval", 0),
        ("eval_summary", 0),
        ("train", 1),
        ("train", 2),
        ("checkpoint", 2),
    ]
    assert eval_round_path(run, 0).is_file() and not eval_round_path(run, 3).exists()
    assert rewind_metrics(run, 2) == 0  # nothing more to cut
    assert rewind_metrics(tmp_path / "fresh", 0) == 0  # a first attempt has no records
