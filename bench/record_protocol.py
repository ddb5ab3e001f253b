"""Record a finished protocol's results as the project's measurement (docs/cpu_protocol.json),
which the Start and Reproduce pages show beside any protocol run on the user's machine.

    .venv/bin/python bench/record_protocol.py ~/.cache/perplexity-lens/runs/protocol-cpu

Adds the machine, the date, the protocol's span and each run's wall time to its results.json.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_name  # noqa: E402
from core.io import read_json, write_json_atomic  # noqa: E402
from core.study.protocol import CPU_PROTOCOL_JSON, RESULTS_JSON  # noqa: E402
from core.study.runs import load_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the protocol folder (holds results.json)")
    parser.add_argument("--out", type=Path, default=CPU_PROTOCOL_JSON)
    parser.add_argument("--note", default="", help="how the machine was loaded, etc.")
    args = parser.parse_args()
    results = read_json(args.folder.expanduser() / RESULTS_JSON)
    if not isinstance(results, dict):
        sys.exit(f"error: no results.json in {args.folder}")
    for entry in results.get("runs", []):
        if entry.get("status") == "succeeded":
            entry["wall_time_s"] = load_run(entry["run"]).summary.get("wall_time_s")
    results.pop("report", None)
    results.update(machine=f"{cpu_name()}, 2 cores", date=date.today().isoformat(), note=args.note)
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
