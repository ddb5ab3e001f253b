"""Checkpoints that are whole or absent, and a run folder rewound to its last one.

transformers' Trainer writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG
state, then trainer_state.json) and deletes old ones with `shutil.rmtree`: a job killed while
saving leaves a folder that looks finished but is not, and one killed while deleting leaves
half of an old checkpoint. Here a checkpoint is written into `checkpoints/.staging/`, every file
fsynced, and renamed into place in one step; an old one is renamed aside
(`.deleting-checkpoint-N`) before it is deleted. A killed run leaves only those two kinds of
leftovers, which `clean_partial` removes when the run starts again. A run killed after its last
checkpoint (during the final evaluation or while the adapter is saved) resumes from it and trains
nothing more: transformers alone would train one step past `max_steps` then.

`rewind_metrics` makes a resumed run's metrics.jsonl and `eval/` what an uninterrupted run
would have written up to the checkpoint it resumes from: the steps after it are trained (and
evaluated) again, so their records from the killed attempt go, and every step is recorded once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from core.io import write_jsonl_atomic
from core.jobs.runfiles import (
    METRICS_JSONL,
    checkpoint_step,
    checkpoints,
    eval_round_path,
    eval_round_steps,
    read_metrics,
)

STAGING = ".staging"  # checkpoints/.staging/checkpoint-N: being written
DELETING = ".deleting-"  # checkpoints/.deleting-checkpoint-N: being deleted

#: Records that belong to one training step; those after the resumed step are written again.
STEP_KINDS = ("train", "checkpoint", "eval", "eval_summary")


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` and the folder entries themselves to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no half of it is ever left under its own name."""
    if not folder.exists():
        return
    doomed = folder.with_name(DELETING + folder.name)
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def clean_partial(checkpoints_dir: str | Path) -> list[str]:
    """Remove what a killed run left in `checkpoints/`: the staging folder, folders being
    deleted, and `checkpoint-N` folders without trainer_state.json (written in place by an
    older version). Returns their names."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        partial = entry.name == STAGING or entry.name.startswith(DELETING)
        unfinished = (
            checkpoint_step(entry) is not None and not (entry / "trainer_state.json").is_file()
        )
        if entry.is_dir() and (partial or unfinished):
            if partial:
                shutil.rmtree(entry)
            else:
                discard(entry)
            removed.append(entry.name)
    return removed


def keep_newest(checkpoints_dir: str | Path, limit: int | None) -> None:
    """Delete all but the `limit` newest complete checkpoints (by step)."""
    if not limit or limit < 1:
        return
    found = checkpoints(checkpoints_dir, complete=True)
    for folder in found[: max(0, len(found) - limit)]:
        discard(folder)


def with_atomic_checkpoints(trainer_cls: type) -> type:
    """A subclass of a transformers `Trainer` class whose checkpoints are written whole or not
    at all, and rotated without leaving half of an old one (see the module docstring), and
    whose resume from the final step's checkpoint trains no further step."""

    class AtomicCheckpoints(trainer_cls):  # type: ignore[misc, valid-type]
        _staging = False

        def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
            # transformers 5.23 resumed at global_step == max_steps mid-epoch skips the trained
            # batches and trains the next one before it checks max_steps: step max_steps + 1
            if self.state.global_step >= self.state.max_steps > 0:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

        def _get_output_dir(self, trial: Any) -> str:
            out = super()._get_output_dir(trial)
            return os.path.join(out, STAGING) if self._staging else out

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            root = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            staged = root / STAGING / name
            if self.args.should_save and staged.exists():
                shutil.rmtree(staged)
            self.accelerator.wait_for_everyone()
            self._staging = True
            try:  # transformers writes (and rotates, alone there) under .staging/
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = False
            self.accelerator.wait_for_everyone()  # every rank's RNG state is in
            if self.args.should_save:
                _fsync_tree(staged)
                target = root / name
                discard(target)  # the same step saved again after a resume
                os.replace(staged, target)
                with contextlib.suppress(OSError):  # nothing is being written any more
                    staged.parent.rmdir()
                _fsync_dir(root)
                keep_newest(root, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()

    AtomicCheckpoints.__name__ = AtomicCheckpoints.__qualname__ = f"Atomic{trainer_cls.__name__}"
    return AtomicCheckpoints


def rewind_metrics(run_dir: str | Path, step: int) -> int:
    """Make the run folder's records what an uninterrupted run had written when it reached
    `step` (the checkpoint a resumed run starts from; 0 without one): step records after it,
    "done" records and lines cut off by a kill are dropped from metrics.jsonl (rewritten
    atomically), and evaluation rounds after it leave `eval/`. Returns the records dropped."""
    run = Path(run_dir)
    path = run / METRICS_JSONL
    if not path.is_file():
        return 0
    records = read_metrics(run)
    kept = [
        r
        for r in records
        if r.get("kind") != "done"
        and not (r.get("kind") in STEP_KINDS and int(r.get("step") or 0) > step)
    ]
    lines = len([ln for ln in path.read_bytes().splitlines() if ln.strip()])
    if len(kept) != lines:
        write_jsonl_atomic(path, kept)
    for later in eval_round_steps(run):
        if later > step:
            eval_round_path(run, later).unlink(missing_ok=True)
    return lines - len(kept)
