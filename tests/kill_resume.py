"""Kill a training run with SIGKILL and resume it: the harness of tests/test_kill_resume.py
(moments named in advance) and bench/bench_kill_resume.py (moments drawn at random).

`python -m tests.kill_resume [--kill-at MOMENT] -- train --config C --run-dir R` runs the CLI's
`train` command in this process, as a user's `python -m core train ...` would, and SIGKILLs
itself at MOMENT (the real signal: nothing is flushed or cleaned up):

- ``data``: while the training data is prepared (the examples scored, the mask not yet built);
- ``step:N``: in the middle of step N (its forward and backward done, the update not);
- ``checkpoint:N``: while checkpoint-N is written (weights and optimizer saved, RNG and trainer
  state not yet);
- ``eval:N``: during the evaluation round at step N (its results file written, its records not
  yet in metrics.jsonl).

Resuming is the same command again: `run_training` continues from the run folder's last
complete checkpoint. `check_run` says what differs from an uninterrupted run of the same config.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.factories import TRAIN_ROWS as ROWS

ROOT = Path(__file__).resolve().parents[1]


#: Float tolerance of "the same adapter": the resumed run repeats the same float32 operations
#: in the same order on the CPU, so this only absorbs summation-order noise.
WEIGHT_ATOL = 1e-6


def write_config(folder: Path, model: str, **overrides: Any) -> Path:
    """A tiny training config (6 examples, 2 per step, 8 steps, a checkpoint every 2 steps, an
    evaluation round every 3 on one item per task) and its data file, in `folder`."""
    from core.training.config import TrainConfig

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    values: dict[str, Any] = dict(
        model=model,
        device="cpu",
        precision="fp32",
        task=None,
        data=str(data),
        id_col="id",
        max_length=64,
        method="stm",
        target_share=0.3,
        batch_size=2,
        learning_rate=1e-3,
        max_steps=8,
        save_every=2,
        save_total_limit=2,
        eval_every=3,
        eval_suite={"suite": "during", "limit": 1},
        seed=3,
    )
    values.update(overrides)
    config = TrainConfig.from_preset("paper", **values)
    path = folder / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=1), encoding="utf-8")
    return path


def train_argv(config: Path, run_dir: Path) -> list[str]:
    """The CLI arguments of one attempt (the first one and every resume alike)."""
    return ["train", "--config", str(config), "--run-dir", str(run_dir)]


def attempt(
    argv: list[str],
    kill_at: str | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    log: Path | None = None,
) -> int:
    """Run one attempt in a fresh process; its exit code (-9 when it killed itself)."""
    cmd = [sys.executable, "-m", "tests.kill_resume"]
    if kill_at:
        cmd += ["--kill-at", kill_at]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(
            [*cmd, "--", *argv],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    finally:
        if log:
            out.close()
    return proc.returncode


# ------------------------------------------------------------------------------ the checks


def adapter_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def corrupt_checkpoints(run_dir: Path) -> list[str]:
    """Why each checkpoint, or anything half-written beside them, cannot be resumed from."""
    import torch

    problems = []
    root = run_dir / "checkpoints"
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if not entry.is_dir():  # TRL's model card (README.md) sits beside them
            continue
        if not entry.name.startswith("checkpoint-"):
            problems.append(f"{entry.name}: left beside the checkpoints")
            continue
        try:
            json.loads((entry / "trainer_state.json").read_text())
            adapter_weights(entry)
            torch.load(entry / "optimizer.pt", weights_only=True)
            torch.load(entry / "scheduler.pt", weights_only=True)
            torch.load(entry / "rng_state.pth", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the finding
            problems.append(f"{entry.name}: {type(exc).__name__}: {str(exc)[:120]}")
    return problems


def check_run(run_dir: Path, reference: Path) -> list[str]:
    """What differs between a killed-and-resumed run and the uninterrupted `reference`: the
    final step, each step's records in metrics.jsonl (once each), the evaluation rounds,
    corrupt checkpoints, and the final adapter's weights."""
    import torch

    from core.jobs.runfiles import read_metrics

    problems = []
    done, ref_done = _summary(run_dir), _summary(reference)
    if done is None:
        return ["no summary.json: the run did not finish"]
    if done["final_step"] != ref_done["final_step"]:
        problems.append(f"final step {done['final_step']}, uninterrupted {ref_done['final_step']}")
    records, ref_records = read_metrics(run_dir), read_metrics(reference)
    for kind, key in (
        ("train", lambda r: r["step"]),
        ("checkpoint", lambda r: r["step"]),
        ("eval", lambda r: (r["step"], r["task"], r["metric"])),
        ("eval_summary", lambda r: r["step"]),
        ("done", lambda r: r["step"]),
    ):
        got = Counter(key(r) for r in records if r.get("kind") == kind)
        want = Counter(key(r) for r in ref_records if r.get("kind") == kind)
        twice = sorted(k for k, n in got.items() if n > 1)
        if twice:
            problems.append(f"{kind} records more than once: {twice[:6]}")
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            problems.append(f"{kind} records missing {missing[:6]}, extra {extra[:6]}")
    train = {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}
    ref_train = {r["step"]: r["loss"] for r in ref_records if r.get("kind") == "train"}
    off = [s for s in ref_train if s in train and abs(train[s] - ref_train[s]) > 1e-5]
    if off:
        problems.append(f"losses differ from the uninterrupted run at steps {off}")
    problems += corrupt_checkpoints(run_dir)
    weights, ref_weights = (
        adapter_weights(run_dir / "adapter"),
        adapter_weights(reference / "adapter"),
    )
    if set(weights) != set(ref_weights):
        problems.append("the final adapter holds other tensors than the uninterrupted one")
    else:
        worst = max(float((weights[k] - ref_weights[k]).abs().max()) for k in weights)
        if not torch.isfinite(torch.tensor(worst)) or worst > WEIGHT_ATOL:
            problems.append(f"final adapter weights differ by up to {worst:.3g}")
    return problems


def _summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ the hooks


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(moment: str) -> None:
    """Arrange for this process to SIGKILL itself at `moment` (see the module docstring)."""
    what, _, n = moment.partition(":")
    step = int(n) if n else None
    if what == "data":
        import core.masking.rules as rules

        def compute_masks(*args: Any, **kwargs: Any) -> Any:
            _die()

        rules.compute_masks = compute_masks
    elif what == "step":
        from transformers import Trainer

        original_step = Trainer.training_step

        def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
            loss = original_step(self, *args, **kwargs)
            if self.state.global_step == step - 1:
                _die()
            return loss

        Trainer.training_step = training_step
    elif what == "checkpoint":
        from transformers import Trainer

        original_rng = Trainer._save_rng_state

        def save_rng_state(self: Any, output_dir: Any) -> Any:
            if self.state.global_step == step:
                _die()
            return original_rng(self, output_dir)

        Trainer._save_rng_state = save_rng_state
    elif what == "eval":
        import core.training.callbacks as callbacks
        from core.jobs.runfiles import eval_round_path

        original_write = callbacks.write_json_atomic

        def write_json_atomic(path: Any, *args: Any, **kwargs: Any) -> Any:
            out = original_write(path, *args, **kwargs)
            if Path(path).name == eval_round_path(".", step).name:
                _die()
            return out

        callbacks.write_json_atomic = write_json_atomic
    else:
        raise SystemExit(f"error: unknown moment {moment!r} (data, step:N, checkpoint:N, eval:N)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kill_resume")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    if args.kill_at:
        install(args.kill_at)
    from core.cli import main as core_main

    return core_main(cli)


if __name__ == "__main__":
    sys.exit(main())
