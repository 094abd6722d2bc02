"""The phase breakdown (gradreg.bench.phases, bench.breakdown): attribution of profiler ranges to phases.

The engine of this branch does not mark its phases yet, so the tests use steppers of their own that emit the
engine's range names around work of known minimum duration (``time.sleep`` sleeps at least as long as asked,
whatever the load: only lower bounds are asserted on times) and check the bookkeeping exactly: nested ranges are
counted once, the parts add up to the profiled step, ranges outside the step are ignored.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch.profiler import record_function

from gradreg import bench
from gradreg.bench.phases import exclusive_times, ordered_labels

MS = 1e-3


def test_exclusive_times_of_nested_intervals():
    intervals = [(0, 100, "pass1"), (10, 30, "check"), (100, 160, "pass2"), (120, 150, "check"),
                 (125, 135, "inner"), (170, 180, "base step")]
    out = exclusive_times(intervals)
    assert out == {"pass1": 80, "check": 20 + 20, "pass2": 30, "inner": 10, "base step": 10}
    assert sum(out.values()) == 100 + 60 + 10  # the top-level intervals, counted once


def test_ordered_labels():
    labels = {"restore", "pass1", "base step", "gradreg-new", "pass3", "rest", "total", "zero_grad", "check"}
    assert ordered_labels(labels) == ["pass1", "pass3", "check", "restore", "gradreg-new", "zero_grad",
                                      "base step", "rest"]


SLEEP_MS = {"pass1": 6, "perturb": 2, "pass2": 6, "check": 3, "combine": 2, "restore": 2}


class PhasedStepper:
    """A stand-in for an engine that marks its phases: a known minimum time in each range, check nested in pass2."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.base = torch.optim.SGD([self.weight], lr=0.1)

    def step(self):
        self.base.zero_grad()
        for name in ("pass1", "perturb", "pass2", "combine", "restore"):
            with record_function(f"gradreg:{name}"):
                time.sleep(SLEEP_MS[name] * MS)
                if name == "pass2":
                    with record_function("gradreg:check"):
                        time.sleep(SLEEP_MS["check"] * MS)
        self.weight.grad = torch.ones(3)
        self.base.step()


def test_profiled_step_attributes_each_range_once():
    stepper = PhasedStepper()
    with record_function("gradreg:pass1"):  # a range outside the step is not counted
        time.sleep(5 * MS)
    split = bench.profiled_step(stepper, torch.device("cpu"))
    assert set(split) == {*SLEEP_MS, "zero_grad", "base step", "rest", "total"}
    for name, ms in SLEEP_MS.items():
        assert split[name] >= ms * MS, (name, split[name])
    assert split["total"] >= sum(SLEEP_MS.values()) * MS
    assert math.isclose(sum(v for k, v in split.items() if k != "total"), split["total"], abs_tol=1e-9)
    assert split["rest"] >= 0 and split["base step"] > 0


def test_breakdown_of_rows_with_and_without_ranges(monkeypatch):
    """two-passes marks pass1/pass2 itself; a GR row is given the engine's ranges by a stand-in step."""
    original = bench.Stepper.step

    def step(self):
        if self.method != "forward":
            return original(self)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("gradreg:pass1"):
            self.closure().backward()
        with record_function("gradreg:perturb"):
            time.sleep(1 * MS)
        with record_function("gradreg:pass2"):
            self.closure().backward()
        self.base.step()

    monkeypatch.setattr(bench.Stepper, "step", step)
    result = bench.breakdown("mlp", depth=2, width=16, batch_size=4, rounds=3, warmup=1,
                             methods=("two-passes", "forward", "double"))
    labels = result.labels()
    assert labels[:3] == ["pass1", "perturb", "pass2"] and labels[-3:] == ["zero_grad", "base step", "rest"]
    for row in ("two-passes", "forward", "double"):
        assert len(result[row].times_s) == len(result[row].splits) == 3
    assert result.median_ms("forward", "perturb") >= 1.0
    assert result.median_ms("two-passes", "perturb") == 0.0
    for split in result["double"].splits:  # the real engine marks its passes: DB's two passes, check, restore
        assert {"pass1", "pass2", "check", "restore", "zero_grad", "base step", "rest", "total"} <= set(split)
    table = result.table()
    assert "no gradreg:* range recorded" not in table
    assert "F-GR − 2 passes" in table and "profiled / unprofiled" in table
    assert result.profiler_overhead("forward") > 0
    data = result.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["breakdown"]["forward"]["median_ms"]["perturb"] >= 1.0


def test_breakdown_records_a_failing_row(monkeypatch):
    original = bench.Stepper.step

    def step(self):
        if self.method == "forward":
            raise RuntimeError("boom")
        original(self)

    monkeypatch.setattr(bench.Stepper, "step", step)
    result = bench.breakdown("mlp", depth=2, width=16, batch_size=4, rounds=1, warmup=0)
    assert result["forward"].error == "RuntimeError: boom" and result["forward"].splits == []
    assert result["two-passes"].ok and "F-GR: failed: RuntimeError: boom" in result.table()


def test_breakdown_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.breakdown("mlp", rounds=0)
    with pytest.raises(ValueError, match="method must be one of"):
        bench.breakdown("mlp", methods=("two-passes", "fgr"))


def test_profiled_and_unprofiled_steps_alternate(monkeypatch):
    """Neither kind of step always comes first in its round (the first step after the other rows runs colder)."""
    from gradreg.bench import measure

    order = []
    monkeypatch.setattr(measure, "timed_step", lambda s, d: order.append("plain") or 1.0)
    monkeypatch.setattr(measure, "profiled_step", lambda s, d: order.append("profiled") or {"rest": 1.0, "total": 1.0})
    result = bench.breakdown("mlp", depth=1, width=4, batch_size=2, rounds=4, warmup=0, methods=("sgd",))
    assert order == ["plain", "profiled", "profiled", "plain"] * 2
    assert result.profiler_overhead("sgd") == 1.0
