"""The benchmark (gradreg.bench): exact FLOP counts, the CPU peak-memory method, the result's structure, the CLI.

No timing is asserted anywhere: times and their ratios depend on the machine and its load; they are reported.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from gradreg import bench

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
    assert set(bench.FLOP_UNITS) == set(bench.METHODS)
    for method, formula in bench.FLOP_UNITS.items():
        assert formula(depth) == expected.get(method, formula(depth))


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
    for k in range(2):
        extra = out["peak_bytes"]["forward"][k] - out["peak_bytes"]["two-passes"][k]
        assert P <= extra <= P + 64 * 64 * 4, (extra, P)


# ------------------------------------------------------------------------------------------------ structure


def test_benchmark_result_structure():
    result = bench.benchmark("mlp", depth=2, width=32, batch_size=8, repeats=1, warmup=1, progress=False)
    assert list(result.results) == list(bench.METHODS)
    for name, r in result.results.items():
        assert r.ok, (name, r.error)
        assert len(r.times_s) == 1 and r.times_s[0] > 0
        assert r.peak_bytes >= r.resident_bytes > 0
        assert r.flops > 0
    assert result.time_ratio("sgd") == 1.0
    assert result.flop_units("sgd") == 5 and result.flop_units("forward") == 10 and result.flop_units("double") == 13
    assert result.memory_ratio("sgd") == 1.0
    table = result.table()
    for label in bench.LABELS.values():
        assert label in table
    assert "forward/two-passes time" in table
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # strict JSON: NaN became null
    assert set(data) == {"workload", "config", "machine", "methods", "headline"}
    assert set(data["methods"]) == set(bench.METHODS)
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


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gradreg.bench", "--model", "mlp", "--depth", "2", "--batch-size", "8",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # e.g. runpy's "found in sys.modules" for a module run with -m
    assert "F-GR" in proc.stdout and "DB-GR" in proc.stdout and "two passes" in proc.stdout
    data = json.loads(out.read_text())
    assert data["config"]["depth"] == 2 and data["config"]["batch_size"] == 8
    assert data["methods"]["double"]["flop_units"] == 13


def test_cli_measures_a_model_of_your_own(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def tiny():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gradreg.bench", "--model", "my_models:tiny", "--input-shape", "3,2,2",
         "--num-classes", "5", "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--no-memory",
         "--methods", "sgd,forward,double"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "my_models:tiny, batch 4" in proc.stdout and "DB-GR" in proc.stdout


def test_a_model_of_your_own_needs_an_input_shape():
    with pytest.raises(ValueError, match="input_shape is required"):
        bench.make_workload("gradreg.models:resnet18_cifar")
