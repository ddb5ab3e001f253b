"""How numbers are written wherever they appear: page cards, chart markers and hovers, tables,
the CLI, logs and the report. One rule per kind of number, so a card and the chart beside it
always print the same text:

- plain values: 3 significant digits ("5.25", "0.176", "1,234" from 1,000 up);
- shares (fractions in [0, 1]): percent with one decimal ("38.3%");
- the masking threshold τ: as a plain value ("5.25");
- changes: signed, fixed decimals ("+0.13", "-2.6"), and an interval as "+0.13 [+0.05, +0.22]";
- counts: thousands separators ("1,234");
- durations: "1h05m", "3m07s", "42s";
- anything unknown: "–".

Charts pass these strings as marker text or hover data instead of d3 formats of their own.
"""

from __future__ import annotations

import math

#: What an unknown or missing number prints as, everywhere.
MISSING = "–"


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def num(value: float | None, digits: int = 3) -> str:
    """A plain value to `digits` significant digits ("5.25", "0.176", "12.5"); 1,000 and up as
    whole numbers with separators ("1,234")."""
    if _missing(value):
        return MISSING
    value = float(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value == 0:
        return "0"
    text = f"{value:.{digits}g}"
    if "e" in text:  # tiny values: keep them readable rather than scientific
        return f"{value:.{digits}e}"
    return text


def tau(value: float | None) -> str:
    """The masking threshold τ (a perplexity), as every page and chart prints it."""
    return num(value)


def share(value: float | None, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percent ("38.3%")."""
    if _missing(value):
        return MISSING
    return f"{100 * float(value):.{digits}f}%"


def signed(value: float | None, digits: int = 2) -> str:
    """A change with its sign ("+0.13", "-2.6")."""
    if _missing(value):
        return MISSING
    value = float(value)
    if round(value, digits) == 0:
        value = 0.0  # no "-0.00"
    return f"{value:+.{digits}f}"


def interval(mean: float | None, low: float | None, high: float | None, digits: int = 2) -> str:
    """A change and its interval: "+0.13 [+0.05, +0.22]" (just the change when the bounds are
    unknown)."""
    if _missing(mean):
        return MISSING
    if _missing(low) or _missing(high):
        return signed(mean, digits)
    return f"{signed(mean, digits)} [{signed(low, digits)}, {signed(high, digits)}]"


def value_text(
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    unit: str = "",
    digits: int = 3,
    *,
    percent: bool = False,
    signed: bool = False,
) -> str:
    """A measured value (not a change) with its 95% interval: "0.042 [0.035, 0.050] nats",
    "93.3% [91.0, 95.4]" (`percent`: a share 0-1 shown in %), "0.042 nats (no interval)" or
    "–"; `signed` writes the sign (a Δ such as the Δ NLL of the base's answers)."""
    if _missing(value):
        return MISSING
    scale, digits = (100.0, 1) if percent else (1.0, digits)
    pattern = f"{{:{'+' if signed else ''}.{digits}f}}"
    unit = "%" if percent else (f" {unit}" if unit else "")
    text = pattern.format(scale * float(value))
    if not _missing(low) and not _missing(high):
        bounds = f"[{pattern.format(scale * float(low))}, {pattern.format(scale * float(high))}]"
        return f"{text}{'%' if percent else ''} {bounds}{'' if percent else unit}"
    return f"{text}{unit} (no interval)"


def count(value: int | float | None) -> str:
    """A count with thousands separators ("1,234")."""
    if _missing(value):
        return MISSING
    return f"{int(round(float(value))):,}"


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
