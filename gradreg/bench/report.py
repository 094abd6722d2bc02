"""What a benchmark run measured, as a table for people and a dictionary (JSON) for programs.

Time ratios are medians over rounds of *paired* ratios t_row / t_reference, both timed in the same round (robust
against load that changes between rounds); memory and FLOP ratios are plain quotients.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from gradreg.bench.phases import PHASES, ordered_labels
from gradreg.methods import LABELS, METHODS


@dataclass
class MethodResult:
    """One row's measurements; ``error`` (and ``notes``, what gradreg added to it) when the row failed."""

    method: str
    label: str
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    resident_bytes: int | None = None
    flops: int | None = None
    #: Seconds per phase of each profiled round (``gradreg.bench.phases``), with ``"rest"`` and ``"total"``.
    splits: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else math.nan

    @property
    def iqr_s(self) -> tuple[float, float]:
        if len(self.times_s) < 2:
            return (self.median_s, self.median_s)
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return (q[0], q[2])

    def fail(self, exc: BaseException) -> None:
        """Record ``exc``; a row that failed reports the failure, not partial measurements."""
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.error = text[:300]
        self.notes = [str(n) for n in getattr(exc, "__notes__", [])]
        self.times_s.clear()
        self.splits.clear()
        self.peak_bytes = self.resident_bytes = self.flops = None


def paired_median(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_k / b_k (NaN when either list is empty)."""
    if not a or not b:
        return math.nan
    return statistics.median(x / y for x, y in zip(a, b))


def _pair(results: dict[str, MethodResult], method: str, reference: str) -> tuple[MethodResult, MethodResult] | None:
    """Both rows, if both were measured without error."""
    a, b = results.get(method), results.get(reference)
    return None if a is None or b is None or not (a.ok and b.ok) else (a, b)


def _time_ratio(results: dict[str, MethodResult], method: str, reference: str) -> float:
    pair = _pair(results, method, reference)
    return math.nan if pair is None else paired_median(pair[0].times_s, pair[1].times_s)


def _machine_line(config: dict[str, Any], machine: dict[str, Any]) -> str:
    c, m = config, machine
    return (f"device {m['device']} ({m['threads']} threads), torch {m['torch']}, {c['repeats']} rounds after "
            f"{c['warmup']} warm-up; load average {m['load_before']} before, {m['load_after']} after")


@dataclass
class BenchResult:
    """Everything one benchmark run measured; ``table()`` prints it, ``to_dict()`` is what the JSON holds."""

    workload: str
    config: dict[str, Any]
    machine: dict[str, Any]
    results: dict[str, MethodResult]

    def __getitem__(self, method: str) -> MethodResult:
        return self.results[method]

    def time_ratio(self, method: str, reference: str = "sgd") -> float:
        """Median over rounds of t_method / t_reference, both timed in the same round."""
        return _time_ratio(self.results, method, reference)

    def memory_ratio(self, method: str, reference: str = "sgd") -> float:
        pair = _pair(self.results, method, reference)
        if pair is None or pair[0].peak_bytes is None or pair[1].peak_bytes is None:
            return math.nan
        return pair[0].peak_bytes / pair[1].peak_bytes

    def flop_ratio(self, method: str, reference: str = "sgd") -> float:
        pair = _pair(self.results, method, reference)
        if pair is None or not pair[0].flops or not pair[1].flops:
            return math.nan
        return pair[0].flops / pair[1].flops

    def flop_units(self, method: str) -> float:
        """MLP only: FLOPs in units of one (batch × width) @ (width × width) product."""
        r = self.results.get(method)
        if self.config.get("model") != "mlp" or r is None or r.flops is None:
            return math.nan
        return r.flops / (2 * self.config["batch_size"] * self.config["width"] ** 2)

    def headline(self) -> dict[str, float]:
        """The ratios the project's performance floors are stated in."""
        return {
            "forward/two-passes time": self.time_ratio("forward", "two-passes"),
            "forward/double time": self.time_ratio("forward", "double"),
            "forward/func-db time": self.time_ratio("forward", "func-db"),
            "usam/two-passes time": self.time_ratio("usam", "two-passes"),
            "sam/two-passes time": self.time_ratio("sam", "two-passes"),
            "sam/plain-sam time": self.time_ratio("sam", "plain-sam"),
            "forward/sgd memory": self.memory_ratio("forward"),
            "double/sgd memory": self.memory_ratio("double"),
        }

    def table(self) -> str:
        c, m = self.config, self.machine
        lines = [
            f"gradreg.bench: {self.workload}, batch {c['batch_size']}, {c['parameters'] / 1e6:.2f} M parameters, "
            f"{c.get('dtype', '')}, attention={c['attention']}",
            _machine_line(c, m),
            "",
            f"{'method':<16}{'ms/step':>10}{'IQR':>16}{'×SGD':>7}{'×2-pass':>9}{'peak MiB':>11}{'×SGD':>7}"
            f"{'GFLOP':>9}{'×SGD':>7}",
        ]
        lines += [self._row(name, r) for name, r in self.results.items()]
        lines.append("")
        lines.append(
            "ratios: time = median over rounds of paired ratios; memory = peak bytes (held at the step's start + "
            "highest level of allocations during it)"
        )
        lines.append("  ".join(f"{k} {v:.2f}" for k, v in self.headline().items() if not math.isnan(v)))
        return "\n".join(lines)

    def _row(self, name: str, r: MethodResult) -> str:
        if not r.ok:
            return f"{r.label:<16}  failed: {r.error}"
        lo, hi = r.iqr_s

        def ratio(value: float, width: int) -> str:  # a reference that was not measured: a dash, not "nan"
            return f"{'—':>{width}}" if math.isnan(value) else f"{value:>{width}.2f}"

        mem = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:>11.1f}{ratio(self.memory_ratio(name), 7)}"
        flops = "" if r.flops is None else f"{r.flops / 1e9:>9.2f}{ratio(self.flop_ratio(name), 7)}"
        return (
            f"{r.label:<16}{1e3 * r.median_s:>10.1f}{f'{1e3 * lo:.1f}–{1e3 * hi:.1f}':>16}"
            f"{ratio(self.time_ratio(name), 7)}{ratio(self.time_ratio(name, 'two-passes'), 9)}" + mem + flops
        )

    def to_dict(self) -> dict[str, Any]:
        methods = {}
        for name, r in self.results.items():
            lo, hi = r.iqr_s
            methods[name] = {
                "label": r.label, "error": r.error, "notes": r.notes, "times_s": r.times_s, "median_s": r.median_s,
                "q25_s": lo, "q75_s": hi,
                "time_ratio_sgd": self.time_ratio(name), "time_ratio_two_passes": self.time_ratio(name, "two-passes"),
                "peak_bytes": r.peak_bytes, "resident_bytes": r.resident_bytes,
                "memory_ratio_sgd": self.memory_ratio(name),
                "flops": r.flops, "flop_ratio_sgd": self.flop_ratio(name), "flop_units": self.flop_units(name),
            }
        data = {"workload": self.workload, "config": self.config, "machine": self.machine, "methods": methods,
                "headline": self.headline()}
        return json_safe(data)


_ROW_NAMES = {"zero_grad": "zero_grad (base optimizer)", "base step": "step (base optimizer)",
              "rest": "rest (outside every range)", "total": "profiled step", "unprofiled": "unprofiled step"}


@dataclass
class Breakdown:
    """Where each row's step time goes (:func:`~gradreg.bench.breakdown`): per round, one unprofiled step
    (``times_s``) and one profiled step split into phases (``splits``, ``gradreg.bench.phases``)."""

    workload: str
    config: dict[str, Any]
    machine: dict[str, Any]
    results: dict[str, MethodResult]

    def __getitem__(self, method: str) -> MethodResult:
        return self.results[method]

    def labels(self) -> list[str]:
        """The phases any row recorded, in step order, then the optimizer's ranges and ``rest``."""
        return ordered_labels({k for r in self.results.values() for s in r.splits for k in s})

    def median_ms(self, method: str, label: str) -> float:
        """Median over rounds of the milliseconds ``method`` spent in ``label`` (0 in a round without it);
        ``label="total"``: the profiled step, ``"unprofiled"``: the step without the profiler."""
        r = self.results[method]
        values = r.times_s if label == "unprofiled" else [s.get(label, 0.0) for s in r.splits]
        return 1e3 * statistics.median(values) if values and r.ok else math.nan

    def time_ratio(self, method: str, reference: str = "two-passes") -> float:
        """Median over rounds of the unprofiled t_method / t_reference, both timed in the same round."""
        return _time_ratio(self.results, method, reference)

    def profiler_overhead(self, method: str) -> float:
        """Median over rounds of profiled / unprofiled step time, both taken in the same round."""
        r = self.results[method]
        return paired_median([s["total"] for s in r.splits], r.times_s) if r.ok else math.nan

    def table(self) -> str:
        c, m = self.config, self.machine
        rows = [name for name, r in self.results.items() if r.ok]
        diffs = [name for name in rows if name in METHODS] if "two-passes" in rows else []
        head = [LABELS[n] for n in rows] + [f"{LABELS[n]} − 2 passes" for n in diffs]
        widths = [max(12, len(h) + 2) for h in head]
        lines = [
            f"gradreg.bench --breakdown: {self.workload}, batch {c['batch_size']}, {c['parameters'] / 1e6:.2f} M "
            f"parameters, {c.get('dtype', '')}",
            _machine_line(c, m),
            "",
            f"{'ms per step, median of rounds':<32}" + "".join(f"{h:>{w}}" for h, w in zip(head, widths)),
        ]
        for label in [*self.labels(), "total", "unprofiled"]:
            values = [self.median_ms(n, label) for n in rows]
            values += [self.median_ms(n, label) - self.median_ms("two-passes", label) for n in diffs]
            cells = "".join(f"{v:>{w}.2f}" for v, w in zip(values, widths))
            lines.append(f"{_ROW_NAMES.get(label, label):<32}{cells}")
        lines.append(f"{'profiled / unprofiled':<32}" + "".join(
            f"{self.profiler_overhead(n):>{w}.2f}" for n, w in zip(rows, widths)))
        lines += ["", *self.notes()]
        return "\n".join(lines)

    def notes(self) -> list[str]:
        """How to read the table, and what it cannot show."""
        out = [f"{r.label}: failed: {r.error}" for r in self.results.values() if not r.ok]
        out += [f"{r.label}: no gradreg:* range recorded, so its whole step is 'rest' (this engine does not mark "
                f"its phases)" for n, r in self.results.items()
                if r.ok and n in METHODS and not any(k in PHASES for s in r.splits for k in s)]
        out += [
            "phases: exclusive host wall-clock time inside the profiler ranges gradreg:<phase> (and the base "
            "optimizer's own ranges); medians of the parts need not add up to the median of the total.",
            "the profiler adds a cost per recorded operation: compare 'profiled step' with 'unprofiled step' "
            "(same rounds); a phase of many small operations is inflated most.",
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        rows = {
            name: {"label": r.label, "error": r.error, "times_s": r.times_s, "splits_s": r.splits,
                   "median_ms": {label: self.median_ms(name, label) for label in [*self.labels(), "total",
                                                                                 "unprofiled"]},
                   "profiler_overhead": self.profiler_overhead(name)}
            for name, r in self.results.items()
        }
        return json_safe({"workload": self.workload, "config": self.config, "machine": self.machine,
                          "breakdown": rows})


def new_results(methods: list[str]) -> dict[str, MethodResult]:
    """An empty :class:`MethodResult` per row, labelled from ``gradreg.methods.LABELS``."""
    return {m: MethodResult(m, LABELS[m]) for m in methods}


def json_safe(value: Any) -> Any:
    """NaN → None (strict JSON), tuples → lists, anything else unknown → its string."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
