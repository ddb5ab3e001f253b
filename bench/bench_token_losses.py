"""Benchmark: each token loss's training step time against nll's, in one run (issue #21 part 5).

The same model (the embedded SmolLM2-135M, one fresh copy per loss), the same training rows
(MBPP train, method gt, built once), the same batches in the same order (a sequential sampler
instead of the trainer's length-grouped one, so every loss trains batch k on the same rows) and
the same batch size and LoRA setting. Each loss trains through the real trainer
(`core.training.trainer.build_trainer`, `TokenLossTrainer`), all of them at once in one process,
taking turns step by step: a callback lets one trainer run one optimizer step while the others
wait, then hands the turn to the next loss. So step k of every loss runs within a minute of the
others, and a change of the machine's load (a shared machine) lands on every loss alike instead
of on whichever ran during it. A step is timed from `on_step_begin` to `on_step_end`: the
forward, the base model's pass where the loss needs it, the backward and the optimizer (batch
loading and logging are outside). The `--warmup` first steps of each loss are dropped and the
median of the rest is taken (wall time; the JSON also keeps this process's CPU time, which
counts the other trainers' work between their steps too), and, since step k of each loss ran
right after step k of the one before, each step's ratio to nll's same step, whose quartiles
show how much the machine's load moved the steps.

Targets: the losses that need the base model's pass (soft_stm, kl, asft) at most 1.7x nll's step
time, the others (dft, eaft) at most 1.1x.

Memory: every trainer thread would get a malloc arena of its own, each keeping the peak of its
loss's step (24 GB for six losses here, until the machine stopped the bench), so the script
re-runs itself with MALLOC_ARENA_MAX=2 and returns freed memory after each step (malloc_trim).

On a GPU (`--device cuda`, or auto when one is there) every step boundary synchronises the
device, so the times are the device's. Run:

    nice -n 10 .venv/bin/python bench/bench_token_losses.py [--steps 12] [--warmup 2]
        [--batch 4] [--max-length 256] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "MALLOC_ARENA_MAX" not in os.environ:  # before torch: one arena per thread grows unbounded
    os.environ["MALLOC_ARENA_MAX"] = "2"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from core import fmt  # noqa: E402
from core.model.loading import load_model, resolve_device  # noqa: E402
from core.training.config import BASE_LOSSES, LOSSES, TrainConfig  # noqa: E402
from core.training.data import build_training_data  # noqa: E402
from core.training.trainer import build_trainer, resolve_precision  # noqa: E402

#: step time against nll's that each loss should stay within
TARGET_BASE = 1.7  # the losses that run the base model too (soft_stm, kl, asft)
TARGET_OTHER = 1.1  # dft, eaft
#: how long a trainer waits for its turn before the bench gives up (a stuck trainer)
TURN_TIMEOUT_S = 1800.0


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def trim_memory() -> None:
    """Give the memory freed by the last step back to the system (glibc; a no-op elsewhere)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def target(loss: str) -> float:
    return TARGET_BASE if loss in BASE_LOSSES else TARGET_OTHER


class Turns:
    """One trainer steps at a time, the losses in rotation; a trainer that ends (or fails)
    leaves the rotation."""

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self.pos = 0
        self.failed: str | None = None
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.failed is not None or self.order[self.pos] == name,
                timeout=TURN_TIMEOUT_S,
            )
            if self.failed is not None or not ok:
                raise RuntimeError(f"{name}: stopped ({self.failed or 'no turn in time'})")

    def done(self) -> None:
        with self.cond:
            self.pos = (self.pos + 1) % len(self.order)
            self.cond.notify_all()

    def leave(self, name: str, error: str | None = None) -> None:
        with self.cond:
            if error is not None:
                self.failed = f"{name} failed: {error}"
            if name in self.order:
                index = self.order.index(name)
                self.order.remove(name)
                if index < self.pos:
                    self.pos -= 1
                if self.order:
                    self.pos %= len(self.order)
            self.cond.notify_all()


class StepTimer(TrainerCallback):
    """Waits for this loss's turn at each step's start, times the step (wall and process CPU
    seconds) and passes the turn on at its end."""

    def __init__(self, name: str, turns: Turns, device: torch.device) -> None:
        self.name, self.turns, self.device = name, turns, device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.load: list[float] = []
        self._start = (0.0, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.turns.wait(self.name)
        self._sync()
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._sync()
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])
        self.load.append(os.getloadavg()[0])
        print(
            f"[time] {self.name} step {len(self.wall)}: {self.wall[-1]:.2f} s wall, "
            f"{self.cpu[-1]:.2f} s CPU, load {self.load[-1]:.2f}",
            flush=True,
        )
        trim_memory()  # outside the timed step, before the next loss's turn
        self.turns.done()
        control.should_save = False  # no checkpoint at the end: it would overlap another's step
        return control


def _train(trainer: Any, name: str, turns: Turns, errors: dict[str, str]) -> None:
    try:
        trainer.train()
    except Exception as exc:  # reported after the others stop
        errors[name] = f"{type(exc).__name__}: {exc}"
        turns.leave(name, errors[name])
    else:
        turns.leave(name)


def paired_ratios(report: dict[str, Any], loss: str) -> list[float]:
    """Step k of `loss` over step k of nll, for every timed step (warm-up dropped): the two
    ran one after the other, so a change of the machine's load cancels in the ratio."""
    rows = {row["loss"]: row for row in report["rows"]}
    skip = report["warmup"]
    return [
        a / b
        for a, b in zip(
            rows[loss]["wall_steps"][skip:], rows["nll"]["wall_steps"][skip:], strict=False
        )
    ]


def print_summary(report: dict[str, Any]) -> None:
    """The machine, the load and a Markdown table: each loss's median step, its ratio to nll's
    median (what the target is judged on) and the step-by-step ratios' median and quartiles."""
    during = report["load_during"]
    print(
        f"{report['machine']}, {report['device']}, {report['precision']}, torch "
        f"{report['torch']}, {report['torch_threads']} threads, nice {report['nice']}, "
        f"{report['date']}; batch {report['batch']} (about "
        f"{fmt.count(report['tokens_per_batch'])} tokens), {report['warmup']} + "
        f"{report['steps']} steps per loss; 1-minute load average "
        f"{fmt.num(report['load_before'][0])} before, {' / '.join(fmt.num(x) for x in during)} "
        "(min / median / max) during"
    )
    print(
        "| loss | base pass | median step | × nll | step by step × nll: median [quartiles] "
        "| target | met |"
    )
    print("|---|---|---:|---:|---|---|---|")
    for row in report["rows"]:
        ratios = paired_ratios(report, row["loss"])
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        spread = f"{statistics.median(ratios):.2f} [{low:.2f}, {high:.2f}]"
        goal = "" if row["target"] is None else f"≤ {row['target']:g}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "no")
        print(
            f"| {row['loss']} | {'yes' if row['base_pass'] else 'no'} | "
            f"{fmt.num(row['wall_s'])} s | {row['ratio']:.2f} | "
            f"{'' if row['loss'] == 'nll' else spread} | {goal} | {met} |"
        )
    print(f"wall time {fmt.duration(report['wall_time_s'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per loss")
    parser.add_argument("--warmup", type=int, default=2, help="first steps dropped")
    parser.add_argument("--batch", type=int, default=4, help="examples per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--show", type=Path, default=None, help="print a saved --json, no run")
    args = parser.parse_args()
    if args.show:
        print_summary(json.loads(args.show.read_text()))
        return

    device = resolve_device(args.device)
    total = args.warmup + args.steps
    base = TrainConfig.from_preset(
        "cpu-quick",
        task="mbpp",
        split="train",
        method="gt",
        limit=args.batch * total,
        max_length=args.max_length,
        batch_size=args.batch,
        max_steps=total,
        logging_steps=1,
        save_every=10**6,  # no checkpoint between the timed steps
        device=str(device),
    )
    named = [x.strip() for x in args.losses.split(",")]
    losses = ["nll", *(x for x in named if x and x != "nll")]
    load_before = os.getloadavg()
    started = time.time()
    lm = load_model(base.model, device=str(device), dtype="float32")
    data = build_training_data(base, lm)
    bf16 = resolve_precision(base.precision, device.type)
    del lm
    tokens = [
        sum(len(r["input_ids"]) for r in data.rows[i : i + args.batch])
        for i in range(0, len(data.rows), args.batch)
    ]
    print(
        f"{len(data.rows)} rows, {data.n_trainable_tokens} trained tokens, "
        f"{fmt.num(statistics.mean(tokens))} tokens per batch; batch {args.batch}, max_length "
        f"{args.max_length}, {args.warmup} + {args.steps} steps per loss, "
        f"{'bf16 autocast' if bf16 else 'fp32'} on {device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    turns = Turns(losses)
    timers: dict[str, StepTimer] = {}
    trainers: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loss in losses:
            config = dataclasses.replace(base, loss=loss)
            timers[loss] = StepTimer(loss, turns, device)
            trainer, _ = build_trainer(
                config,
                Path(tmp) / loss,
                lm=load_model(config.model, device=str(device), dtype="float32"),
                data=data,
                callbacks=[timers[loss]],
            )
            # the same rows in the same batches for every loss, whatever the RNG's state
            trainer._get_train_sampler = lambda *a, t=trainer, **k: SequentialSampler(
                t.train_dataset
            )
            trainers[loss] = trainer
        threads = [
            threading.Thread(target=_train, args=(trainers[x], x, turns, errors), daemon=True)
            for x in losses
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise SystemExit("; ".join(f"{k}: {v}" for k, v in errors.items()))

    def median(values: list[float]) -> float:
        return statistics.median(values[args.warmup :])

    ref_wall, ref_cpu = median(timers["nll"].wall), median(timers["nll"].cpu)
    rows = []
    for loss in losses:
        wall, cpu = median(timers[loss].wall), median(timers[loss].cpu)
        rows.append(
            {
                "loss": loss,
                "base_pass": loss in BASE_LOSSES,
                "steps": len(timers[loss].wall) - args.warmup,
                "wall_s": wall,
                "cpu_s": cpu,
                "ratio": wall / ref_wall,
                "cpu_ratio": cpu / ref_cpu,
                "target": None if loss == "nll" else target(loss),
                "met": None if loss == "nll" else wall / ref_wall <= target(loss),
                "wall_steps": timers[loss].wall,
            }
        )
    loads = [x for t in timers.values() for x in t.load]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report = {
        "date": dt.date.today().isoformat(),
        "machine": gpu or f"{cpu_name()}, {os.cpu_count()} cores",
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "nice": os.nice(0),
        "load_before": load_before,
        "load_during": [min(loads), statistics.median(loads), max(loads)],
        "batch": args.batch,
        "max_length": args.max_length,
        "tokens_per_batch": statistics.mean(tokens),
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "wall_time_s": time.time() - started,
    }
    print()
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
