"""How numbers are written wherever they appear (pages, CLI, logs, the report)."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    """Durations as "1h05m", "3m07s" or "42s" ("" when unknown)."""
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
