"""Tables of finished runs: mean ± standard error over seeds, and differences paired by seed.

For n seeds with values a_s, the mean is ā = Σ a_s / n and its standard error s/√n with the sample standard
deviation s (n − 1 in the denominator). Two settings A and B trained with the same seeds share the
initialization and the data order, so their difference is measured seed by seed: d_s = a_s − b_s, and the
confidence interval of the mean difference is Student's t-interval

    d̄ ± t_{(1+c)/2, n−1} · s_d / √n,

the interval of a paired t-test (``scipy.stats.ttest_rel``). It assumes the d_s are independent draws from a
normal distribution; with five seeds that is an assumption, not a check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gradreg._optional import require
from gradreg.experiments.config import RunConfig
from gradreg.experiments.runner import RunRecord


def final_value(record: RunRecord, metric: str = "test_acc") -> float:
    """The run's final ``metric`` (NaN for a diverged run)."""
    if metric not in record.final:
        raise ValueError(f"metric must be one of {sorted(record.final)}, got {metric!r}")
    value = record.final[metric]
    return math.nan if value is None else float(value)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error s/√n (NaN standard error for a single value)."""
    array = np.asarray(values, dtype=float)
    if len(array) == 0:
        raise ValueError("values is empty")
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else math.nan
    return float(array.mean()), se


@dataclass(frozen=True)
class Row:
    """One setting (a config without its seed) over its seeds."""

    setting: RunConfig
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    mean: float
    se: float
    diverged: int

    @property
    def label(self) -> str:
        return self.setting.label()


def group(records: Iterable[RunRecord]) -> dict[RunConfig, list[RunRecord]]:
    """Records grouped by setting (the config with seed 0), seeds sorted, in order of first appearance."""
    groups: dict[RunConfig, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(dataclasses.replace(record.config, seed=0), []).append(record)
    return {k: sorted(v, key=lambda r: r.config.seed) for k, v in groups.items()}


def summarize(records: Iterable[RunRecord], metric: str = "test_acc") -> list[Row]:
    """Mean ± standard error of the final ``metric`` per setting. A setting with a diverged seed has mean NaN."""
    rows = []
    for setting, runs in group(records).items():
        values = tuple(final_value(r, metric) for r in runs)
        mean, se = mean_se(values)
        rows.append(Row(setting, tuple(r.config.seed for r in runs), values, mean, se,
                        sum(bool(r.final.get("diverged")) for r in runs)))
    return rows


def best(rows: Iterable[Row], *, by: str = "method", higher: bool = True) -> dict[str, Row]:
    """The row with the highest (``higher=False``: lowest) mean per value of the config field ``by``.

    Settings whose mean is NaN (a diverged seed) are never chosen.
    """
    sign = 1.0 if higher else -1.0
    chosen: dict[str, Row] = {}
    for row in rows:
        key = getattr(row.setting, by)
        if math.isfinite(row.mean) and (key not in chosen or sign * row.mean > sign * chosen[key].mean):
            chosen[key] = row
    return chosen


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a_s − b_s over the shared seeds, its standard error, and the t-interval at ``confidence``."""

    mean: float
    se: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(a: Row, b: Row, *, confidence: float = 0.95) -> PairedDifference:
    """The difference A − B paired by seed, with Student's t confidence interval (see the module docstring)."""
    stats = require("scipy.stats", extra="book", purpose="The t-interval of gradreg.experiments.paired_difference")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    by_seed_b = dict(zip(b.seeds, b.values))
    diffs = np.array([v - by_seed_b[s] for s, v in zip(a.seeds, a.values) if s in by_seed_b])
    if len(diffs) < 2:
        raise ValueError(f"paired_difference needs at least 2 seeds shared by both settings, got {len(diffs)}")
    mean, se = mean_se(diffs)
    half = float(stats.t.ppf((1 + confidence) / 2, len(diffs) - 1)) * se
    return PairedDifference(mean, se, mean - half, mean + half, len(diffs), confidence)


def format_table(rows: Iterable[Row], *, scale: float = 100.0, unit: str = "%") -> str:
    """A plain-text table: setting, seeds, mean ± s.e. (times ``scale``), diverged runs."""
    lines = [f"{'setting':32s} {'seeds':>5s} {'mean ± s.e. (' + unit + ')':>18s} {'diverged':>8s}"]
    for row in rows:
        lines.append(f"{row.label:32s} {len(row.seeds):5d} {scale * row.mean:9.2f} ± {scale * row.se:5.2f}  "
                     f"{row.diverged:8d}")
    return "\n".join(lines)
