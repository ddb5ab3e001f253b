"""The one formatting rule (core/fmt.py): what a card, a chart marker, a table and the CLI print."""

import math

from core import fmt


def test_plain_values_have_three_significant_digits() -> None:
    assert fmt.num(5.24648) == "5.25"
    assert fmt.num(0.17634) == "0.176"
    assert fmt.num(12.0) == "12"
    assert fmt.num(1234.4) == "1,234"
    assert fmt.num(0) == "0"
    assert fmt.num(None) == fmt.MISSING and fmt.num(math.nan) == fmt.MISSING


def test_tau_prints_one_way() -> None:
    assert fmt.tau(5.24648) == fmt.num(5.24648) == "5.25"
    assert fmt.tau(2.5) == "2.5"


def test_shares_are_percent_with_one_decimal() -> None:
    assert fmt.share(0.38333) == "38.3%"
    assert fmt.share(0.999) == "99.9%"
    assert fmt.share(None) == "–"


def test_changes_and_intervals_are_signed() -> None:
    assert fmt.signed(0.1349) == "+0.13"
    assert fmt.signed(-2.63, 1) == "-2.6"
    assert fmt.signed(-0.001) == "+0.00"  # never "-0.00"
    assert fmt.interval(0.13, 0.05, 0.22) == "+0.13 [+0.05, +0.22]"
    assert fmt.interval(-1.05, -2.8, 0.7) == "-1.05 [-2.80, +0.70]"
    assert fmt.interval(0.13, None, None) == "+0.13"


def test_counts_and_durations() -> None:
    assert fmt.count(12345) == "12,345"
    assert fmt.duration(3907) == "1h05m" and fmt.duration(187) == "3m07s"
    assert fmt.duration(42) == "42s" and fmt.duration(None) == ""
