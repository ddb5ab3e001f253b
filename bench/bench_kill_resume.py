"""Resume equivalence under SIGKILL at random moments (issue 23), on the tiny test model.

Training jobs of one config (tests/kill_resume.py's: 6 examples, 8 steps, a checkpoint every 2
steps, an evaluation round every 3 on the `during` suite limited to one item per task) run as a
user's queued job does: `JobRegistry.submit`, its own process group. Each is SIGKILLed (the
whole group) at moments drawn at random over an uninterrupted run's length, counted from each
attempt's start, and resumed each time with `JobRegistry.resume`; a trial ends when an attempt
finishes before its moment, and a new job starts, until `--kills` kills are made. An
uninterrupted job of the same config is the reference. Every trial must end with the same final
step, every step recorded once in metrics.jsonl, no corrupt checkpoint and the same adapter
weights (`check_run`).

Each kill is labelled with where the job was: its phase from run_state.json (preparing data,
training step k, evaluating step k, final evaluation, saving) and "checkpoint" when a
checkpoint was being written (a `checkpoints/.staging` folder left behind).

    python bench/bench_kill_resume.py                  # 20 kills, seed 0
    python bench/bench_kill_resume.py --kills 5 --seed 1 --out /tmp/kr.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402


def make_tiny_model(folder: Path) -> Path:
    """The test suite's tiny model (tests/conftest.py: 2 layers, 64 wide, SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer

    from core.model.loading import prepare_embedded_model
    from tests.factories import save_tiny_llama

    return save_tiny_llama(folder, AutoTokenizer.from_pretrained(prepare_embedded_model()))


def where(run_dir: Path) -> str:
    """The job's phase as the kill found it."""
    from core.jobs.state import read_state

    state = read_state(run_dir)
    if state is None:
        return "starting"
    step = f" {state.step}" if state.step is not None else ""
    return f"{state.phase.value}{step}"


def run_job(registry, config: dict, label: str) -> tuple[str, Path]:
    job = registry.submit("train", config, device="cpu", label=label)
    return job.id, Path(job.run_dir)


def wait_final(registry, job_id: str, timeout: float = 3600):
    return registry.wait(job_id, timeout=timeout, poll=0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temp one)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="plens-kill-resume-"))
    os.environ["PLENS_RUNS_DIR"] = str(work / "runs")
    os.environ.setdefault("PLENS_CACHE_DIR", str(work / "cache"))
    from core.jobs.registry import FAILED, RUNNING, SUCCEEDED, JobRegistry
    from core.jobs.runfiles import read_metrics
    from tests import kill_resume as kr

    model = make_tiny_model(work / "tiny")
    config = json.loads(kr.write_config(work / "cfg", str(model)).read_text())
    registry = JobRegistry(work / "runs")

    started = time.monotonic()
    ref_id, reference = run_job(registry, config, "uninterrupted")
    ref_job = wait_final(registry, ref_id)
    length = time.monotonic() - started
    if ref_job.status != SUCCEEDED:
        print(f"error: the uninterrupted run failed: {ref_job.error}", file=sys.stderr)
        return 1
    print(f"uninterrupted run: {length:.0f} s", flush=True)

    rng = random.Random(args.seed)
    kills: list[dict] = []
    trials: list[dict] = []
    problems: list[str] = []
    # trials: a fresh job each, killed at moments drawn over an uninterrupted run's length
    # (from each attempt's start) and resumed, until one attempt ends before its moment
    while len(kills) < args.kills:
        trial = len(trials) + 1
        job_id, run = run_job(registry, config, f"killed, trial {trial}")
        made = 0
        while len(kills) < args.kills:
            while (job := registry.get(job_id)).status == "queued" or (
                job.status == RUNNING and not job.pid
            ):
                time.sleep(0.05)  # the clock starts when the attempt's process does
            delay = rng.uniform(0.5, length)
            t0 = time.monotonic()
            while time.monotonic() - t0 < delay:
                if registry.get(job_id).status not in (RUNNING, "queued"):
                    break
                time.sleep(0.05)
            job = registry.get(job_id)
            if job.status != RUNNING or not job.pid:
                break  # the attempt ended before the moment drawn: the trial is over
            moment = where(run)
            os.killpg(job.pid, signal.SIGKILL)
            t_kill = time.monotonic() - t0
            while registry.get(job_id).status == RUNNING:
                time.sleep(0.1)
            if (run / "checkpoints" / ".staging").is_dir():
                moment += " (checkpoint being written)"
            step = max(
                (r["step"] for r in read_metrics(run) if r.get("kind") == "train"), default=0
            )
            kills.append(
                {"trial": trial, "after_s": round(t_kill, 2), "where": moment, "last_step": step}
            )
            made += 1
            print(
                f"kill {len(kills)} (trial {trial}): after {t_kill:.1f} s, {moment}, "
                f"last logged step {step}",
                flush=True,
            )
            assert registry.get(job_id).status == FAILED
            registry.resume(job_id)
        final = wait_final(registry, job_id)
        found = [f"job ended {final.status}: {final.error}"] if final.status != SUCCEEDED else []
        found = found or kr.check_run(run, reference)
        problems += [f"trial {trial}: {p}" for p in found]
        trials.append({"trial": trial, "kills": made, "problems": found})
        print(f"trial {trial}: {made} kills, {'PASS' if not found else found}", flush=True)
    phases = Counter(k["where"].split(" ")[0] for k in kills)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "kills": len(kills),
        "by_phase": dict(phases),
        "while_checkpointing": sum("checkpoint being written" in k["where"] for k in kills),
        "uninterrupted_s": round(length, 1),
        "total_s": round(time.monotonic() - started, 1),
        "trials": len(trials),
        "problems": problems,
        "trial_log": trials,
        "kill_log": kills,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "kill_log"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
