"""Where does ground truth forget on a CPU? A one-factor-at-a-time sweep of the protocol's
ground-truth arm on the embedded model (issue #15, item 7).

Each setting is one `python -m core protocol --methods gt --seeds 0` run (its own folder,
resumable: a finished setting is read back, not retrained), evaluated at step 0 and at the end
on the `protocol` suite. The table gives, per setting, the paired change against the base model
on the same items with its 95% interval (bootstrap over items; one seed): ARC-Easy validation
accuracy (570 questions, lm-eval's format) and the full-token reference NLL of each task.

    python bench/bench_cpu_forgetting.py                # the whole grid, then the table
    python bench/bench_cpu_forgetting.py --only center  # one setting
    python bench/bench_cpu_forgetting.py --table        # the table of what has finished
    python bench/bench_cpu_forgetting.py --table --write docs/cpu_forgetting.json

`--write` keeps the table (with machine and date) where the Reproduce page reads it
(`core.study.protocol.CPU_SWEEP_JSON`), so the page says what the cpu preset can show.

The centre is full fine-tuning at lr 1e-4 for 2 epochs over 64 MBPP problems; each other
setting changes one factor (LoRA, learning rate, epochs, data size), and a second round
combines the factors that forgot most in the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402

CENTER = {"finetune": "full", "learning_rate": 1e-4, "epochs": 2.0, "limit": 64}
GRID: dict[str, dict[str, object]] = {
    "center": {},
    "lora": {"finetune": "lora", "learning_rate": 1e-3},
    "lr2e-5": {"learning_rate": 2e-5},
    "epochs1": {"epochs": 1.0},
    "n32": {"limit": 32},
    "lr3e-4": {"learning_rate": 3e-4},
    "epochs4": {"epochs": 4.0},
    # a second round around the setting that forgot most in the first
    "lr3e-4-epochs3": {"learning_rate": 3e-4, "epochs": 3.0},
}
COMMON = ["--methods", "gt", "--seeds", "0", "--suite", "protocol", "--max-length", "256"]


def settings(key: str) -> dict[str, object]:
    """The full setting of one grid point."""
    return {**CENTER, **GRID[key]}


def flags(values: dict[str, object]) -> list[str]:
    out = []
    for name, value in values.items():
        out += [
            f"--{name.replace('_', '-')}",
            f"{value:g}" if isinstance(value, float) else str(value),
        ]
    return out


def folder_name(key: str) -> str:
    return f"sweep-gt-{key}"


def run_setting(key: str) -> float:
    """Run (or resume) one setting; returns its wall seconds."""
    started = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "core",
        "protocol",
        *COMMON,
        *flags(settings(key)),
        "--name",
        folder_name(key),
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=False)
    return time.monotonic() - started


def rows() -> list[dict[str, object]]:
    """One row per finished setting: its factors and the paired changes against the base."""
    from core.jobs.runfiles import runs_dir
    from core.study.protocol import RESULTS_JSON

    out: list[dict[str, object]] = []
    for key in GRID:
        path = runs_dir() / folder_name(key) / RESULTS_JSON
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        row: dict[str, object] = {"setting": key, **settings(key), "max_length": 256}
        gt = results["arms"].get("gt", {})
        train_s = gt.get("measures", {}).get("train s", {}).get("mean")
        row["train s"] = None if train_s is None else round(train_s)
        row["final loss"] = gt.get("measures", {}).get("final loss", {}).get("mean")
        row["paired"] = {
            f"{p['task']} {p['metric']}": {
                **p["interval"],
                "role": p["role"],
                "higher_is_better": p["higher_is_better"],
            }
            for p in results.get("paired_base", [])
        }
        out.append(row)
    return out


def table_markdown(found: list[dict[str, object]]) -> str:
    """The sweep as a Markdown table (the protocol's own table writer)."""
    from core.study.protocol import markdown_table, sweep_table

    return "\n".join(markdown_table(sweep_table(found))) or "(no finished setting yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(GRID), help="run these settings")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--write", type=Path, help="also keep the table as JSON here")
    args = parser.parse_args()
    if not args.table:
        for key in args.only or list(GRID):
            took = run_setting(key)
            print(f"{key}: {took:.0f} s", flush=True)
    from core.study.protocol import sweep_verdict

    found = rows()
    print(table_markdown(found))
    verdict = sweep_verdict(found)
    print(verdict["text"])
    if args.write:
        sweep = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "model": "embedded SmolLM2-135M-Instruct",
            "suite": "protocol",
            "seeds": [0],
            "rows": found,
            **verdict,
        }
        args.write.write_text(json.dumps(sweep, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
