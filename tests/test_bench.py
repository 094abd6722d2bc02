"""The benchmark (gradreg.bench): exact FLOP counts, the CPU peak-memory method, the result's structure.

The command line is tested in test_bench_cli.py, the phase breakdown in test_bench_breakdown.py.
No timing is asserted anywhere: times and their ratios depend on the machine and its load; they are reported.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradreg import bench
from gradreg.methods import LABELS, METHODS

DEPTHS = (2, 4, 8, 16, 32)


# ------------------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("depth", DEPTHS)
def test_mlp_flop_counts_are_3L_6L_9L(depth):
    """Bias-free ReLU MLP, every layer width × width: SGD 3L−1, F-GR 6L−2, DB 9L−5 products (exactly)."""
    for method, expected in (("sgd", 3 * depth - 1), ("forward", 6 * depth - 2), ("double", 9 * depth - 5)):
        units = bench.mlp_flop_units(method, depth=depth, width=64, batch_size=8)
        assert units == expected, f"{method} at depth {depth}: {units} units, expected {expected}"


def test_mlp_flop_counts_of_the_other_methods():
    depth = 4
    expected = {"two-passes": 6 * depth - 2, "backward": 6 * depth - 2, "central": 9 * depth - 3,
                "func-db": 12 * depth - 4}
    for method, units in expected.items():
        assert bench.mlp_flop_units(method, depth=depth, width=64, batch_size=8) == units, method
    assert set(bench.FLOP_UNITS) == set(bench.ROWS) == set(bench.FLOP_FORMULAS)


@pytest.mark.parametrize("depth", (1, 3, 7))
def test_flop_model_formulas(depth):
    """The model's functions are the formulas their docstrings and FLOP_FORMULAS state (an independent closed form)."""
    closed = {"sgd": (3, -1), "two-passes": (6, -2), "forward": (6, -2), "backward": (6, -2), "central": (9, -3),
              "double": (9, -5), "func-db": (12, -4)}
    for row, (a, b) in closed.items():
        assert bench.FLOP_UNITS[row](depth) == a * depth + b, row
        assert bench.FLOP_FORMULAS[row] == f"{a}L−{-b}", row


@pytest.mark.parametrize("depth", (2, 5))
def test_double_backprop_phases(depth):
    """DB = forward L + gradient graph 2L − 1 + double backward 6L − 4 (= 9L − 5)."""
    phases = bench.mlp_phase_units(depth=depth, width=32, batch_size=4)
    assert phases == {"forward": depth, "backward": 2 * depth - 1, "double backward": 6 * depth - 4}


def test_flop_units_do_not_depend_on_batch_or_width():
    a = bench.mlp_flop_units("double", depth=3, width=32, batch_size=4)
    b = bench.mlp_flop_units("double", depth=3, width=96, batch_size=24)
    assert a == b == 9 * 3 - 5


# ------------------------------------------------------------------------------------------------ memory


def test_peak_allocated_measures_known_allocations():
    n = 1_000_000  # float32: 4 MB

    def fn():
        a = torch.ones(n)
        b = torch.ones(n // 2)  # level 6 MB: the peak
        del a  # 2 MB
        c = torch.ones(n)  # 6 MB again, not above
        del b, c

    assert bench.peak_allocated(fn) == 6 * n // 1


def test_peak_allocated_counts_frees_of_earlier_memory():
    """Freeing what ``before()`` allocated lowers the level: the peak is relative to the start of ``fn``."""
    n = 1_000_000
    held = {}

    def before():
        held["x"] = torch.ones(2 * n)  # 8 MB, allocated before fn

    def fn():
        del held["x"]  # level −8 MB
        a = torch.ones(n)  # −4 MB
        b = torch.ones(3 * n)  # +8 MB: the peak
        del a, b

    assert bench.peak_allocated(fn, before=before) == 8 * n


def test_peak_allocated_of_a_step_matches_the_tensors_it_creates():
    """An SGD step on a linear model whose .grad was set to None: the peak includes the new gradient."""
    model = torch.nn.Linear(1000, 1000, bias=False)
    x = torch.randn(10, 1000)

    def step():
        model.weight.grad = None
        model(x).sum().backward()

    step()
    peak = bench.peak_allocated(step, before=step)
    # the old gradient (4 MB) is freed, the new one (4 MB) allocated, plus small activations
    assert 0 <= peak <= 10 * 1000 * 4 * 4, peak
    assert bench.storage_bytes([model.weight, model.weight.grad, model.weight.grad.view(-1)]) == 2 * 4_000_000


def test_memory_by_batch_structure_and_the_extra_buffer():
    """F-GR holds one more parameter-sized buffer (the perturbed parameters) than two plain passes."""
    out = bench.memory_by_batch([4, 16], depth=3, width=64)
    assert out["batch_size"] == [4, 16] and set(out["peak_bytes"]) == {"sgd", "two-passes", "forward", "double"}
    P = out["parameter_bytes"]
    assert P == 3 * 64 * 64 * 4
    assert len(out["activation_bytes"]) == 2 and 0 < out["activation_bytes"][0] < out["activation_bytes"][1]
    for k in range(2):
        extra = out["peak_bytes"]["forward"][k] - out["peak_bytes"]["two-passes"][k]
        assert P <= extra <= P + 64 * 64 * 4, (extra, P)


def test_activation_bytes_of_a_known_model():
    """A bias-free ReLU MLP keeps, for the backward pass, the L − 1 ReLU outputs (ReLU saves its output, which is
    also the next layer's saved input) and the log-softmax output — L tensors of batch × width — and the loss's
    two scalars (the loss and nll_loss's total weight). The input x is not allocated by the forward pass."""
    for depth, width, batch in ((3, 64, 16), (5, 32, 7)):
        workload = bench.make_workload("mlp", depth=depth, width=width, batch_size=batch)
        A = bench.activation_bytes(bench.Stepper("sgd", workload))
        assert A == depth * batch * width * 4 + 2 * 4, (depth, width, batch, A)


def test_memory_model():
    P = 8.0
    assert bench.memory_model(P, 0.0) == pytest.approx(4 / 3)
    assert bench.memory_model(P, P) == pytest.approx(5 / 3)  # the maximum, where A = P
    assert bench.memory_model(P, 100 * P) == pytest.approx(104 / 102)
    assert max(bench.memory_model(P, a) for a in (0.5 * P, 0.9 * P, 1.1 * P, 2 * P)) < 5 / 3


# ------------------------------------------------------------------------------------------------ structure


def test_benchmark_result_structure():
    result = bench.benchmark("mlp", depth=2, width=32, batch_size=8, repeats=1, warmup=1, progress=False)
    assert list(result.results) == list(bench.ROWS)
    for name, r in result.results.items():
        assert r.ok, (name, r.error)
        assert len(r.times_s) == 1 and r.times_s[0] > 0
        assert r.peak_bytes >= r.resident_bytes > 0
        assert r.flops > 0
    assert result.time_ratio("sgd") == 1.0
    assert result.flop_units("sgd") == 5 and result.flop_units("forward") == 10 and result.flop_units("double") == 13
    assert result.memory_ratio("sgd") == 1.0
    table = result.table()
    for row in bench.ROWS:
        assert LABELS[row] in table
    assert "forward/two-passes time" in table
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # strict JSON: NaN became null
    assert set(data) == {"workload", "config", "machine", "methods", "headline"}
    assert set(data["methods"]) == set(bench.ROWS)
    row = data["methods"]["forward"]
    for key in ("median_s", "q25_s", "q75_s", "time_ratio_sgd", "time_ratio_two_passes", "peak_bytes",
                "resident_bytes", "memory_ratio_sgd", "flops", "flop_ratio_sgd", "flop_units", "times_s", "error"):
        assert key in row
    assert data["config"]["batch_size"] == 8 and data["config"]["depth"] == 2
    assert set(data["headline"]) == set(result.headline())


def test_benchmark_records_a_failing_method_and_goes_on(monkeypatch):
    original = bench.Stepper.step

    def step(self):
        if self.method == "double":
            raise RuntimeError("no double backward here")
        original(self)

    monkeypatch.setattr(bench.Stepper, "step", step)
    result = bench.benchmark("mlp", depth=2, width=16, batch_size=4, repeats=2, warmup=1, progress=False,
                             methods=("sgd", "forward", "double"))
    assert result["double"].error == "RuntimeError: no double backward here"
    assert result["double"].times_s == [] and result["double"].peak_bytes is None
    assert result["forward"].ok and len(result["forward"].times_s) == 2
    assert "failed: RuntimeError" in result.table()
    assert math.isnan(result.time_ratio("forward", "double"))
    assert result.to_dict()["headline"]["forward/double time"] is None


def test_resnet_and_transformer_steps_run():
    """Every method takes a step on tiny batches (flash attention without double backward: recorded, not raised)."""
    res = bench.benchmark("resnet18", batch_size=2, repeats=1, warmup=0, memory=False, flops=False,
                          progress=False, methods=("sgd", "forward", "func-db"))
    assert all(r.ok for r in res.results.values()), {k: r.error for k, r in res.results.items()}
    tr = bench.benchmark("transformer", batch_size=2, seq_len=8, d_model=32, repeats=1, warmup=0, memory=False,
                         flops=False, progress=False, attention="math")
    assert all(r.ok for r in tr.results.values()), {k: r.error for k, r in tr.results.items()}


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="model must be one of"):
        bench.make_workload("vgg")
    with pytest.raises(ValueError, match="method must be one of"):
        bench.benchmark("mlp", methods=("sgd", "adam"))
    with pytest.raises(ValueError, match="attention must be one of"):
        bench.benchmark("mlp", attention="flash")


def test_rows_and_schedule():
    """ROWS: the references around the one METHODS vocabulary; the timed rounds rotate the order."""
    assert bench.ROWS == ("sgd", "two-passes", *METHODS, "usam", "sam", "plain-sam", "func-db")
    from gradreg.bench.measure import schedule

    plan = schedule(["a", "b", "c"], warmup=1, repeats=3, memory=True, flops=False)
    assert plan == [("warm-up", "a"), ("warm-up", "b"), ("warm-up", "c"),
                    ("time", "a"), ("time", "b"), ("time", "c"), ("time", "b"), ("time", "c"), ("time", "a"),
                    ("time", "c"), ("time", "a"), ("time", "b"), ("memory", "a"), ("memory", "b"), ("memory", "c")]


def test_a_model_of_your_own_needs_an_input_shape():
    with pytest.raises(ValueError, match="input_shape is required"):
        bench.make_workload("gradreg.models:resnet18_cifar")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"depth": 0}, "depth must be an integer >= 1"),
    ({"width": -3}, "width must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_bad_sizes_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.make_workload("mlp", **kwargs)


def test_bad_rows_are_rejected():
    with pytest.raises(ValueError, match="methods is empty"):
        bench.benchmark("mlp", methods=())
    with pytest.raises(ValueError, match="lists a name twice"):
        bench.benchmark("mlp", methods=("sgd", "sgd"))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.benchmark("mlp", repeats=0)


def test_the_sam_rows_step_as_sam_and_plain_sam_is_the_textbook_step():
    """gradreg's SAM row and the benchmark's own textbook SAM step move the model the same way (no dropout or
    BatchNorm in the benchmark's MLP, so the textbook step is exact there), and USAM is F-GR at γ = ε = ρ."""
    from gradreg.bench.steppers import Stepper

    workload = bench.make_workload("mlp", depth=3, width=16, batch_size=8)
    steppers = {row: Stepper(row, workload) for row in ("sam", "plain-sam", "usam")}
    for _ in range(2):
        for s in steppers.values():
            s.step()
    sam, plain, usam = (list(steppers[r].model.parameters()) for r in ("sam", "plain-sam", "usam"))
    assert max(float((a - b).abs().max()) for a, b in zip(sam, plain)) <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(sam, usam)) > 1e-6  # normalized ≠ raw
