"""Small statistics and table helpers for the benchmarks (``scripts/bench``).

Benchmarks on a shared 2-core machine are noisy: every number is reported as the
median of repeated, interleaved samples together with its spread (min-max), and
comparisons are made between samples taken in the same round (paired ratios), so
that a burst of noise slows both sides of a ratio alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and range of repeated samples."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        """The spread of at least one sample."""
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def show(self, digits: int = 0, scale: float = 1.0, signed: bool = False) -> str:
        """``median (low-high)``, each multiplied by ``scale``; ``signed``: the median
        with its sign, + included (a difference)."""
        m, lo, hi = self.median * scale, self.low * scale, self.high * scale
        sign = "+" if signed else ""
        return f"{m:{sign},.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Spread of ``numerators[i] / denominators[i]``: samples of the same round compared."""
    if len(numerators) != len(denominators):
        raise ValueError("paired samples must have the same length")
    return Spread.of([a / b for a, b in zip(numerators, denominators, strict=True) if b])


@dataclass(frozen=True, slots=True)
class LinearFit:
    """``y = intercept + slope * x`` by least squares, and how well it fits (``r2``)."""

    intercept: float
    slope: float
    r2: float

    @classmethod
    def of(cls, xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
        """Fit at least two points with distinct ``xs``."""
        slope, intercept = statistics.linear_regression(xs, ys)
        mean = statistics.fmean(ys)
        total = sum((y - mean) ** 2 for y in ys)
        residual = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
        return cls(intercept, slope, 1.0 - residual / total if total else 1.0)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def verdict(met: bool | None) -> str:
    """How a target reads in a results table."""
    return "n/a" if met is None else "met" if met else "NOT MET"
