"""Benchmark: what evaluation during training costs, as a share of training wall time.

Trains the embedded model with the cpu-quick preset (STM-free GT labels; the method does not
change step time) through `core.training.trainer.run_training`, with `core.training.callbacks.EvalCallback`
running the "during" suite at step 0, every `--every` steps and at the end, and an EMPTY
evaluation cache (so step 0 is computed, the worst case). Reports, from the same run:

- training seconds (wall time of the run minus the callback's time) and the per-step median;
- evaluation seconds per round and in total;
- overhead = evaluation / training (target: at most 25%), and the same without the step-0 round
  (what a second run with the same model and suite pays: step 0 then comes from the cache).

Run: ``.venv/bin/python bench/bench_eval_overhead.py [--every 12] [--max-steps N] [--suite during]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.eval.runner import EvalCache  # noqa: E402
from core.eval.suites import get_suite  # noqa: E402
from core.jobs.runfiles import read_metrics  # noqa: E402
from core.model.loading import EMBEDDED_FINGERPRINT  # noqa: E402
from core.training.callbacks import EvalCallback  # noqa: E402
from core.training.config import TrainConfig  # noqa: E402
from core.training.trainer import run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=12, help="evaluate every N steps")
    parser.add_argument("--max-steps", type=int, default=None, help="shorten the run")
    parser.add_argument("--suite", default="during")
    args = parser.parse_args()

    overrides = {"task": "mbpp", "split": "train", "device": "cpu"}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    config = TrainConfig.from_preset("cpu-quick", **overrides)
    suite = get_suite(args.suite)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        callback = EvalCallback(
            suite,
            run,
            args.every,
            model_name="default",
            fingerprint=EMBEDDED_FINGERPRINT,
            cache=EvalCache(Path(tmp) / "eval_cache.sqlite"),  # empty: step 0 is computed
        )
        start = time.monotonic()
        run_training(config, run, callbacks=[callback])
        total = time.monotonic() - start
        records = read_metrics(run)
    rounds = [(r["step"], r["seconds"]) for r in records if r["kind"] == "eval_summary"]
    step_times = [r["time"] for r in records if r["kind"] == "train"]
    steps = len(step_times)
    evaluation = callback.seconds
    training = total - evaluation
    after_base = sum(s for step, s in rounds if step != 0)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"date: {dt.date.today()}, load average at the end: {load[0]:.1f}")
    print(f"preset cpu-quick, {steps} steps, suite {suite.name}, every {args.every} steps")
    print(f"run wall time: {total:.1f}s; training (run minus evaluation): {training:.1f}s")
    print(f"training per step (mean): {training / max(1, steps):.1f}s")
    for step, seconds in rounds:
        print(f"  eval round at step {step}: {seconds:.1f}s")
    print(f"evaluation total: {evaluation:.1f}s ({len(rounds)} rounds)")
    print(f"overhead, cold cache (step 0 computed): {100 * evaluation / training:.1f}%")
    print(f"overhead, warm cache (step 0 from cache): {100 * after_base / training:.1f}%")
    if rounds:
        print(f"median round: {statistics.median(s for _, s in rounds):.1f}s")


if __name__ == "__main__":
    main()
