"""Statistics for `popo bench`: repetitions, median and spread, paired ratios, refusal.

Every benchmark figure is a ratio of two things measured in the same run, repetition by repetition
(the two sides alternate, so a slow phase of a shared machine hits both). A ratio is the median of
the per-repetition ratios; its spread is (max - min) / median of those ratios. When the spread is
above `max_spread` the runs disagree too much for one number to mean anything, and the ratio is
refused: the table says so and the JSON records `refused: true` instead of a misleading figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_MAX_SPREAD = 0.5
"""Refuse a ratio whose repetitions differ by more than half its median (max - min)."""


def spread(xs: Sequence[float]) -> float:
    """(max - min) / |median|: 0 when every repetition agrees; inf for a zero median."""
    if not xs:
        raise ValueError("spread of no values")
    med = statistics.median(xs)
    if med == 0:
        return 0.0 if max(xs) == min(xs) else float("inf")
    return (max(xs) - min(xs)) / abs(med)


@dataclass(frozen=True)
class Summary:
    """Median, min, max and spread of the repetitions of one measurement."""

    values: list[float]
    median: float
    min: float
    max: float
    spread: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> Summary:
        xs = [float(x) for x in xs]
        return cls(xs, statistics.median(xs), min(xs), max(xs), spread(xs))

    def fmt(self, spec: str = ",.0f", scale: float = 1.0) -> str:
        """`median [min, max]`, each multiplied by `scale` (e.g. 1e3 for ms)."""
        m, lo, hi = (scale * v for v in (self.median, self.min, self.max))
        return f"{m:{spec}} [{lo:{spec}}, {hi:{spec}}]"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Ratio:
    """Paired ratio numerator[i] / denominator[i] over repetitions i, or a refusal."""

    values: list[float]
    """Per-repetition ratios."""
    median: float
    min: float
    max: float
    spread: float
    max_spread: float
    refused: bool
    target: str | None = None
    """The issue's target, as text (e.g. `>= 0.9`), for the table and the JSON."""
    meets_target: bool | None = None
    """None when refused or without a target."""

    def fmt(self, spec: str = ".2f") -> str:
        if self.refused:
            return f"refused: runs disagree (spread {self.spread:.2f})"
        return f"{self.median:{spec}} [{self.min:{spec}}, {self.max:{spec}}]"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_ratio(
    numerator: Sequence[float],
    denominator: Sequence[float],
    max_spread: float = DEFAULT_MAX_SPREAD,
    target: str | None = None,
) -> Ratio:
    """Ratio of two measurements taken in the same repetitions (`numerator[i] / denominator[i]`).

    target: `>= x` or `<= x`; recorded with whether the median meets it (never when refused).
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"paired ratio needs equal, non-empty runs: {len(numerator)} vs {len(denominator)}"
        )
    rs = [float(a) / float(b) for a, b in zip(numerator, denominator, strict=True)]
    s = Summary.of(rs)
    refused = s.spread > max_spread
    meets = None
    if target is not None and not refused:
        op, x = target.split()
        meets = s.median >= float(x) if op == ">=" else s.median <= float(x)
    return Ratio(rs, s.median, s.min, s.max, s.spread, max_spread, refused, target, meets)


def alternate(
    fns: Mapping[str, Callable[[], float]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every measurement once per repetition, round-robin, after `warmup` unrecorded rounds.

    Each fn returns its figure for one repetition (seconds, tokens/s, ...). Round-robin puts the
    two sides of every ratio in the same stretch of time, which is what makes pairing them fair.
    """
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            v = fn()
            if r >= warmup:
                out[name].append(float(v))
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes (perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (what BENCHMARKS.md holds), cells as given."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class BenchResult:
    """What one `popo bench` subcommand produces: a table, ratios and raw figures for the JSON."""

    name: str
    title: str
    header: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    ratios: dict[str, Ratio] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        return markdown_table(self.header, self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "table": {"header": self.header, "rows": self.rows},
            "ratios": {k: r.to_json() for k, r in self.ratios.items()},
            "figures": self.figures,
            "notes": self.notes,
        }
