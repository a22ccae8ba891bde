"""scripts/bench_stats.py: the medians, spreads, fits and tables the benchmarks print."""

from __future__ import annotations

import pytest

from scripts.bench_stats import LinearFit, Spread, paired_ratios, table, verdict


def test_spread_is_median_and_range() -> None:
    s = Spread.of([3.0, 1.0, 10.0, 2.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.show(1) == "2.5 (1.0-10.0)"
    assert Spread.of([1500.0]).show() == "1,500 (1,500-1,500)"
    # A difference keeps its sign: "+-0.119" was once printed for a p50 under no addon's.
    assert Spread.of([-0.119, -4.183, 0.831]).show(3, signed=True) == "-0.119 (-4.183-0.831)"
    assert Spread.of([0.25]).show(2, signed=True) == "+0.25 (0.25-0.25)"


def test_spread_needs_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        Spread.of([])


def test_paired_ratios_compare_samples_of_the_same_round() -> None:
    # Round 2 is slow for both: paired, it does not look like a difference.
    s = paired_ratios([100.0, 50.0, 100.0], [50.0, 25.0, 50.0])
    assert (s.median, s.low, s.high) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="same length"):
        paired_ratios([1.0], [1.0, 2.0])


def test_linear_fit() -> None:
    fit = LinearFit.of([1, 2, 4, 8], [12, 14, 18, 26])
    assert fit.intercept == pytest.approx(10)
    assert fit.slope == pytest.approx(2)
    assert fit.r2 == pytest.approx(1)
    assert LinearFit.of([1, 2, 3, 4], [1, 4, 9, 16]).r2 < 1


def test_table_aligns_columns() -> None:
    text = table(["name", "n"], [("a", 1), ("longer", 100)])
    assert text.splitlines() == ["name      n", "------  ---", "a         1", "longer  100"]


def test_verdict_words() -> None:
    assert [verdict(True), verdict(False), verdict(None)] == ["met", "NOT MET", "n/a"]
