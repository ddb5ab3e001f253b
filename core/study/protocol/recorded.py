"""What the project recorded on its own machine: the CPU sweep of ground truth's settings
(`docs/cpu_forgetting.json`, from bench/bench_cpu_forgetting.py) and the cpu preset's protocol
(`docs/cpu_protocol.json`, from bench/record_protocol.py), which the Start and Reproduce pages
show beside the user's own protocols. Tests point `CPU_SWEEP_JSON` / `CPU_PROTOCOL_JSON` of this
module elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.io import app_root, read_json
from core.stats import Interval

#: The CPU sweep of ground truth's settings (bench/bench_cpu_forgetting.py --write): what the
#: cpu preset can show on the embedded model, with machine and date (in the wheel too: `app_root`).
CPU_SWEEP_JSON = app_root() / "docs" / "cpu_forgetting.json"


def sweep_verdict(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which swept settings make ground truth forget detectably out of domain (an OOD paired
    interval against the base model below zero, in the metric's bad direction), and a sentence
    saying so. `rows` as in `bench/bench_cpu_forgetting.py`: "setting" and "paired" (task metric
    -> interval dict with "role" and "higher_is_better")."""
    forgetting: dict[str, list[str]] = {}
    fields = set(Interval.__dataclass_fields__)
    for row in rows:
        for name, stat in (row.get("paired") or {}).items():
            if stat.get("role") != "ood":
                continue
            interval = Interval(**{k: v for k, v in stat.items() if k in fields})
            if interval.verdict(bool(stat.get("higher_is_better", True))) == "worse":
                forgetting.setdefault(str(row["setting"]), []).append(name)
    if not rows:
        text = "No setting of the sweep has finished yet."
    elif forgetting:
        text = (
            "Ground truth forgets detectably out of domain in: "
            + "; ".join(f"{key} ({', '.join(names)})" for key, names in forgetting.items())
            + f". That is {len(forgetting)} of {len(rows)} settings tried, each on one seed "
            "with an interval over items only: with several settings and tasks, one can exclude "
            "zero by chance, so more seeds of that setting are the confirmation."
        )
    else:
        text = (
            f"No setting of the sweep ({len(rows)} tried) made ground truth forget detectably "
            "out of domain: every OOD interval against the base model includes zero or shows a "
            "gain, so on this model and budget the protocol cannot show STM preventing "
            "forgetting; it can only bound it."
        )
    return {"forgetting": forgetting, "text": text}


def sweep_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The sweep as table rows of text: the factors, then each task's paired change against
    the base model as "estimate [low, high]" (accuracies in points, NLL in nats; a starred
    cell's interval excludes zero)."""
    out = []
    for row in rows:
        cells: dict[str, str] = {}
        for key, value in row.items():
            if key == "paired":
                continue
            cells[key] = (
                "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
            )
        for name, stat in (row.get("paired") or {}).items():
            est, low, high = stat.get("estimate"), stat.get("low"), stat.get("high")
            if est is None or low is None or high is None:
                cells[name] = "-"
                continue
            star = "*" if low > 0 or high < 0 else ""
            cells[name] = f"{est:+.2f} [{low:+.2f}, {high:+.2f}]{star}"
        out.append(cells)
    return out


def load_cpu_sweep(path: Path | None = None) -> dict[str, Any] | None:
    """The recorded CPU sweep (None when the file is missing or unreadable)."""
    data = read_json(path or CPU_SWEEP_JSON)
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


#: The cpu preset's protocol as run on the project's machine (bench/record_protocol.py): its
#: results.json plus machine, date and time, which the Start and Reproduce pages show as the
#: recorded measurement beside any protocol run on the user's machine.
CPU_PROTOCOL_JSON = app_root() / "docs" / "cpu_protocol.json"


def load_cpu_protocol(path: Path | None = None) -> dict[str, Any] | None:
    """The recorded cpu-preset protocol (None when the file is missing or unreadable)."""
    data = read_json(path or CPU_PROTOCOL_JSON)
    ok = isinstance(data, dict) and isinstance(data.get("arms"), dict) and "machine" in data
    return data if ok else None
