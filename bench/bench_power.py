"""Per suite: n per task and the minimal detectable paired change (80% power, 5% two-sided).

For a paired accuracy change on n items, the standard error is sqrt((p_d - delta^2) / n), with
p_d the share of discordant items (right on one side, wrong on the other); at small changes
the detectable change is about (z_0.975 + z_0.8) * sqrt(p_d / n). p_d is a property of the two
models, not of the suite: fine-tuning that moves few answers has p_d near 0.1, a large change
0.3 or more. The table gives the detectable change at p_d = 0.1, 0.2 and 0.3, in points.

    .venv/bin/python bench/bench_power.py          # Markdown table for docs/BENCHMARKS.md
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data.tasks import load_task  # noqa: E402
from core.eval.suites import REF_PPL, SUITES  # noqa: E402
from core.stats import Z_80, Z_975  # noqa: E402

DISCORDANCE = (0.1, 0.2, 0.3)


def detectable_points(n: int, discordant: float) -> float:
    """Smallest paired accuracy change (points) detectable on n items."""
    return 100 * (Z_975 + Z_80) * math.sqrt(discordant / n)


def main() -> None:
    head = " | ".join(f"p_d={p:g}" for p in DISCORDANCE)
    print(f"| suite | task | role | scorer | n | detectable change, points ({head}) |")
    print("|---|---|---|---|---|---|")
    for name, build in SUITES.items():
        suite = build()
        for spec in suite.specs():
            size = spec.n or len(load_task(spec.task, spec.split).examples)
            if spec.scorer == REF_PPL:
                cells = "(a continuous NLL: see the paired interval of a real run)"
            else:
                cells = " / ".join(f"{detectable_points(size, p):.1f}" for p in DISCORDANCE)
            role = suite.role(spec.name)
            print(f"| {name} | {spec.name} | {role} | {spec.scorer} | {size} | {cells} |")


if __name__ == "__main__":
    main()
